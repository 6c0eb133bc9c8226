"""The one way omh-ref writes a file: a temporary file beside it, flushed and fsynced, renamed over
the target (``os.replace`` is atomic on POSIX), then the folder fsynced so the rename itself
survives a crash. A reader, or a process killed at any moment, sees the previous file or the new
one, never a torn one; on an error the temporary file is removed.

Three forms of one mechanism:

* :func:`atomic_path` — a context manager yielding the temporary path, for writers that need a
  path (``np.lib.format.open_memmap``, ``os.pwrite`` of rows);
* :func:`atomic_write` — ``write(fileobj)`` on the open temporary file (``np.savez``, PIL's
  ``Image.save``);
* :func:`write_text` / :func:`write_json` — the common cases;
* :func:`move_into_place` — the last step alone, for a file that was written and fsynced under
  its temporary name by other means (extraction's row files, which several processes fill).

Appending to a log (``log.jsonl``) is not a rewrite and does not go through here.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path


def fsync_dir(folder) -> None:
    """Make renames in ``folder`` durable (a no-op where the platform cannot open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path) -> Path:
    """The temporary name of ``path`` while it is written: hidden, beside it, per process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; when the block ends without an error the file
    written there is fsynced and renamed to ``path`` (and the folder fsynced). On an error, or if
    the block wrote nothing, the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:   # a failed write(2) or fsync(2) names no file: name the target
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def move_into_place(src, dst) -> None:
    """Rename ``src`` (written and fsynced already) over ``dst`` and make the rename durable."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def atomic_write(path, write, mode: str = "wb") -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path`` and rename it into place."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as fh:
            write(fh)


def write_text(path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text), mode="w")


def write_json(path, obj, indent=1) -> None:
    """``obj`` as JSON, atomically (readable by others: 0644 like any file open() makes)."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (checkpoints, backbones, match files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
