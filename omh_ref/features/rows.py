"""Row files: a preallocated ``.npy`` whose rows are written in place with ``os.pwrite`` at their
byte offset, from any process (extraction's Dask workers write their own rows of one file), and
never through a memory map, so the pages written do not count towards the writer's resident
memory. The caller fsyncs (``close(sync=True)``) before it records the rows as written, and moves
the finished file into place with :func:`omh_ref.core.files.move_into_place`."""
from __future__ import annotations

import os

import numpy as np


def create_npy(path, shape, dtype):
    """A preallocated (sparse) .npy of ``shape``; returns nothing, rows are written by RowWriter."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    del mm


class RowWriter:
    """Writes whole rows of a C-ordered .npy in place (``os.pwrite``), from any process."""

    def __init__(self, path):
        arr = np.load(path, mmap_mode="r")
        self.shape, self.dtype, self.offset = arr.shape, arr.dtype, arr.offset
        del arr
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDWR)

    def write(self, row: int, rows: np.ndarray):
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        assert data.shape[1:] == self.shape[1:] and row + len(data) <= self.shape[0]
        buf, pos = memoryview(data).cast("B"), self.offset + row * self.row_bytes
        while len(buf):
            n = os.pwrite(self.fd, buf, pos)
            buf, pos = buf[n:], pos + n

    def close(self, sync=True):
        if sync:
            os.fsync(self.fd)
        os.close(self.fd)
