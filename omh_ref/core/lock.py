"""One writer per output folder: ``with FolderLock(folder, "train"): ...``.

Every command that writes a folder (``train``, ``extract``, ``knn``, ``segment``, ``demo``) holds
its lock from before its first write until it exits, on every path (normal, error, Ctrl-C). A
second process that wants the folder is refused at once with one line naming the holder (pid,
host, command, start time), or, with ``wait=True``, waits for it (what a training run does while
another builds the KNN table it needs).

Mechanism: a lock file ``.omh-ref.lock`` created with ``O_CREAT | O_EXCL``, which is atomic on
local file systems and on NFS v3+ (``flock`` is not: several network file systems ignore it, and
Dask runs share folders over them). The file holds the holder's pid, host, command, start time
and a random token; a daemon thread touches it every :data:`HEARTBEAT_S` seconds. A lock whose
holder is dead is taken over with a message: on the same host, when its pid no longer exists;
from another host, when its heartbeat is older than :data:`STALE_S` seconds. Take-over renames
the stale file away first (only one contender's rename succeeds), then creates a new one with
``O_EXCL``, so two processes that both find a stale lock cannot both win. A process releases
only a lock that still holds its own token. Dask workers that write their own rows of a job
whose driver holds the lock are not writers in this sense and take no lock.
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
        return {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "started": time.time(), "token": self.token}

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}            # being written this instant, or garbage: judged by its age

    def _stale(self, info: dict) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False         # released meanwhile: just try again
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
            return not _pid_alive(info["pid"])
        return age > STALE_S

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(self._info(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _take_over(self, info: dict) -> None:
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.token}")
        try:
            os.rename(self.path, aside)      # only one contender's rename succeeds
        except FileNotFoundError:
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
            info = self._read()
            if info is None:
                continue
            if self._stale(info):
                self._take_over(info)
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
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self._nested:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        FolderLock._held.pop(str(self.folder.resolve()), None)
        info = self._read()
        if info and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
