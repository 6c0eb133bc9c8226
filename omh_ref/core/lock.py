"""One writer per output folder: ``with FolderLock(folder, "train"): ...``.

Every command that writes a folder (``train``, ``extract``, ``knn``, ``eval``, ``segment``, ``demo``,
``seeds``, ``recipe``) holds its lock from before its first write until it exits, on every path
(normal, error, Ctrl-C). A
second process that wants the folder is refused at once with one line naming the holder (pid,
host, command, start time), or, with ``wait=True``, waits for it (what a training run does while
another builds the KNN table it needs).

Mechanism: a lock file ``.omh-ref.lock`` created with ``O_CREAT | O_EXCL``, which is atomic on
local file systems and on NFS v3+ (``flock`` is not: several network file systems ignore it, and
Dask runs share folders over them). The file holds the holder's pid (with its start time, where
``/proc`` tells it), host, command, start time and a random token; a daemon thread touches it every
:data:`HEARTBEAT_S` seconds while it still holds the holder's token. A lock is stale, and taken
over with a message, when its heartbeat is older than :data:`STALE_S` seconds, or on the same host
at once when its pid no longer exists or is another process now (a reused pid: its start time
differs). So a holder stopped (Ctrl-Z) for longer than :data:`STALE_S` loses its folder.

Take-over renames the lock file aside (only one contender's rename succeeds) and then checks
what it moved: if that is the stale lock it judged, it is deleted and the contender creates its own
with ``O_EXCL``; if it is another (a rival took the stale lock over between the judging and the
rename), it is put back with a hard link, which fails rather than overwrite, and the lock is judged
again. So two processes that both find a stale lock cannot both win. A process releases only a lock
that still holds its own token. Dask workers that write their own rows of a job whose driver holds
the lock are not writers in this sense and take no lock.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from .errors import InputError

LOCK_NAME = ".omh-ref.lock"
HEARTBEAT_S = 10.0     # how often a holder touches its lock file
STALE_S = 120.0        # a lock from another host untouched this long is taken over
POLL_S = 0.5           # how often a waiting process looks again


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by someone else
        return True
    return True


def _pid_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22),
    or None where ``/proc`` does not tell it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _before_take_over():
    """Called between judging a lock stale and renaming it aside; tests replace it to interleave
    two contenders there."""


def _describe(info: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return (f"omh-ref {info.get('command', '?')} (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
            f"started {started})")


class FolderLock:
    """The lock of ``folder`` for ``command`` (a word for the messages). ``say`` receives the
    take-over and waiting messages. Re-entrant in one process: an inner lock of a folder this
    object's process already holds is a no-op (a demo's training runs inside the demo's folder)."""

    _held: dict = {}     # resolved folder -> token, this process's locks

    def __init__(self, folder, command: str, wait: bool = False, say=print):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command, self.wait, self.say = command, wait, say
        self.token = uuid.uuid4().hex
        self._nested = False
        self._stop = threading.Event()
        self._thread = None

    # ------------------------------------------------------------------------------------------
    def _info(self) -> dict:
        return {"pid": os.getpid(), "pid_start": _pid_start(os.getpid()), "host": socket.gethostname(),
                "command": self.command, "started": time.time(), "token": self.token}

    def _read(self):
        """(raw bytes, parsed info) of the lock file; (None, None) when there is none."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None, None
        except OSError:
            return b"", {}
        try:
            info = json.loads(raw)
        except ValueError:
            info = {}            # being written this instant, or garbage: judged by its age
        return raw, info if isinstance(info, dict) else {}

    def _stale(self, info: dict) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False         # released meanwhile: just try again
        if age > STALE_S:        # no heartbeat for that long: dead, or stopped, wherever it ran
            return True
        pid = info.get("pid")
        if info.get("host") == socket.gethostname() and isinstance(pid, int) and not isinstance(pid, bool):
            if not _pid_alive(pid):
                return True
            start, now = info.get("pid_start"), _pid_start(pid)
            return start is not None and now is not None and start != now   # the pid is another process's now
        return False

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self._info(), fh)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            self.path.unlink(missing_ok=True)   # a half-written lock would block the folder for ever
            raise
        return True

    def _take_over(self, raw: bytes, info: dict) -> None:
        """Remove the stale lock whose bytes are ``raw``, and only that one (see the module doc)."""
        _before_take_over()
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.token}")
        try:
            os.rename(self.path, aside)      # only one contender's rename succeeds
        except FileNotFoundError:
            return
        try:
            moved = aside.read_bytes()
        except OSError:
            moved = None
        if moved != raw:                     # a rival's fresh lock, not the stale one: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass                         # a third process made a lock meanwhile; the rival's beat will see it
            except OSError:
                os.rename(aside, self.path)  # no hard links here: the rename back is the best left
                return
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        self.say(f"{self.folder}: taking over the lock of {_describe(info)}, which is no longer running")

    # ------------------------------------------------------------------------------------------
    def acquire(self) -> "FolderLock":
        key = str(self.folder.resolve())
        if key in FolderLock._held:
            self._nested = True
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{self.folder}: cannot make the folder ({e.strerror})") from None
        said = False
        while True:
            try:
                if self._try_create():
                    break
            except OSError as e:
                raise InputError(f"{self.folder}: cannot write there ({e.strerror}); expected a writable "
                                 "output folder") from None
            raw, info = self._read()
            if raw is None:
                continue
            if self._stale(info):
                self._take_over(raw, info)
                continue
            if not self.wait:
                raise InputError(f"{self.folder}: another {_describe(info)} is writing here; wait for it "
                                 "to finish or choose another output folder")
            if not said:
                self.say(f"{self.folder}: waiting for {_describe(info)} to finish")
                said = True
            time.sleep(POLL_S)
        FolderLock._held[key] = self.token
        self._thread = threading.Thread(target=self._beat, name="omh-ref-lock", daemon=True)
        self._thread.start()
        return self

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            if self.owned():
                try:
                    os.utime(self.path)
                except OSError:
                    pass

    def owned(self) -> bool:
        """Whether the lock file still holds this lock's token."""
        info = self._read()[1]
        return bool(info) and info.get("token") == self.token

    def release(self) -> None:
        if self._nested:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        FolderLock._held.pop(str(self.folder.resolve()), None)
        if self.owned():
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
