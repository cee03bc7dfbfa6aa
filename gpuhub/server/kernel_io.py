"""The data file of one saved variable: large buffers written straight from memory, read back
into preallocated memory, with a CRC-32 per chunk.

A variable is saved as a pickle stream (`vars/NNNNN.pkl`) whose large buffers (numpy arrays,
torch storages, Keras model files) are not in the stream but in a second file
(`vars/NNNNN.bin`): the stream holds a reference `("seg", offset, nbytes, alloc)` for each, and
the data file is those buffers one after the other. Writing hands the buffer's own memory to
the operating system (no copy in the process); reading allocates the final object's memory
first and reads into it (`readinto`), so neither needs a second copy of the data.

Every buffer is checked in chunks of `CHUNK` bytes: the CRC-32 of each chunk, in file order, is
the data file's checksum (`crcs`, 8 hex digits per chunk). The CRCs are computed by a few worker
threads while the main thread writes or reads the next chunk (zlib releases the GIL), so checking
costs little time on top of the disk's.

Like `kernel_side.py` this module is loaded into kernels as source: standard library only.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import zlib
from collections.abc import Callable
from typing import Any

MODULE = "_gpuhub_snapshot_io"
CHUNK = 16 * 1024 * 1024
INLINE = 256 * 1024  # chunks smaller than this are checked on the calling thread
CRC_HEX = 8


class Corrupt(Exception):
    """A snapshot file whose content is not what was written (checksum or size)."""


class TooBig(Exception):
    """The variable would take more bytes than it may."""


class Budget:
    """Bytes one variable may still write (None: no limit), shared by its two files."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        self.used += n
        if self.limit is not None and self.used > self.limit:
            raise TooBig()


def _crc(view: memoryview) -> int:
    return zlib.crc32(view)


def pool() -> concurrent.futures.ThreadPoolExecutor:
    """Worker threads for the checksums of one operation (shut down by the caller)."""
    workers = max(1, min(4, (os.cpu_count() or 1)))
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="gpuhub-crc")


def crc_hex(crcs: list[int]) -> str:
    return "".join(f"{c:08x}" for c in crcs)


def chunk_count(nbytes: int) -> int:
    return max(1, -(-nbytes // CHUNK)) if nbytes else 0


class _Checksums:
    """CRC-32s of chunks in order, computed on worker threads or inline."""

    def __init__(self, workers: concurrent.futures.Executor | None) -> None:
        self.workers = workers
        self.parts: list[Any] = []  # int or Future

    def add(self, view: memoryview) -> None:
        if self.workers is None or view.nbytes < INLINE:
            self.parts.append(_crc(view))
        else:
            self.parts.append(self.workers.submit(_crc, view))

    def result(self) -> list[int]:
        return [p if isinstance(p, int) else p.result() for p in self.parts]


class SegmentWriter:
    """The data file of one variable, opened on its first buffer."""

    def __init__(
        self, path: str, budget: Budget, workers: concurrent.futures.Executor | None
    ) -> None:
        self.path = path
        self.budget = budget
        self.offset = 0
        self._file: Any = None
        self._sums = _Checksums(workers)

    def add(self, view: memoryview) -> tuple[int, int]:
        """Write a 1-D byte view of some memory; (offset, nbytes) in the data file."""
        nbytes = view.nbytes
        self.budget.take(nbytes)
        if self._file is None:
            self._file = open(self.path, "wb", buffering=1024 * 1024)  # noqa: SIM115
        offset = self.offset
        for start in range(0, nbytes, CHUNK):
            chunk = view[start : start + CHUNK]
            self._sums.add(chunk)
            self._file.write(chunk)
        self.offset += nbytes
        return offset, nbytes

    def add_chunks(self, nbytes: int, fill: Callable[[int, int], memoryview]) -> tuple[int, int]:
        """Write `nbytes` produced a chunk at a time by `fill(start, length)` (a device's memory
        copied through a small host buffer). The view `fill` returns must stay valid until the
        next call: two staging buffers used in turn are enough, the checksum of a chunk is
        taken before the next chunk is filled."""
        self.budget.take(nbytes)
        if self._file is None:
            self._file = open(self.path, "wb", buffering=1024 * 1024)  # noqa: SIM115
        offset = self.offset
        for start in range(0, nbytes, CHUNK):
            chunk = fill(start, min(CHUNK, nbytes - start))
            self._sums.parts.append(_crc(chunk))
            self._file.write(chunk)
        self.offset += nbytes
        return offset, nbytes

    def close(self) -> tuple[int, str] | None:
        """Flush and close; (bytes, checksums) or None when nothing was written. The file is
        fsynced later, with the others (`fsync_files`)."""
        if self._file is None:
            return None
        self._file.flush()
        self._file.close()
        self._file = None
        return self.offset, crc_hex(self._sums.result())

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for part in self._sums.parts:
            if not isinstance(part, int):
                part.cancel()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class SegmentReader:
    """Reads the buffers of one data file into memory the caller allocates, in file order,
    checking every chunk against the checksums recorded when it was written."""

    def __init__(
        self,
        path: str,
        nbytes: int,
        crcs: str,
        workers: concurrent.futures.Executor | None,
    ) -> None:
        self.path = path
        self.nbytes = nbytes
        self.expected = [int(crcs[i : i + CRC_HEX], 16) for i in range(0, len(crcs), CRC_HEX)]
        self._file: Any = None
        self._sums = _Checksums(workers)
        self.position = 0

    def open(self) -> None:
        try:
            size = os.path.getsize(self.path)
        except OSError as e:
            raise Corrupt(f"{os.path.basename(self.path)} is missing ({e.strerror})") from None
        if size != self.nbytes:
            raise Corrupt(
                f"{os.path.basename(self.path)} is truncated or damaged: "
                f"{size} bytes instead of {self.nbytes}"
            )
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill `view` (writable, 1-D bytes) with the buffer at `offset`."""
        if self._file is None:
            self.open()
        if offset != self.position:
            self._file.seek(offset)
            self.position = offset
        nbytes = view.nbytes
        for start in range(0, nbytes, CHUNK):
            chunk = view[start : start + CHUNK]
            self._read_fully(chunk)
            self._sums.add(chunk)
        self.position += nbytes

    def read_chunks(
        self,
        offset: int,
        nbytes: int,
        staging: Callable[[int], memoryview],
        deliver: Callable[[int, memoryview], None],
    ) -> None:
        """Read a buffer a chunk at a time through `staging(length)` (host memory) and hand
        each chunk to `deliver(start, view)` (a copy to a device), checking each."""
        if self._file is None:
            self.open()
        if offset != self.position:
            self._file.seek(offset)
            self.position = offset
        for start in range(0, nbytes, CHUNK):
            chunk = staging(min(CHUNK, nbytes - start))
            self._read_fully(chunk)
            self._sums.parts.append(_crc(chunk))
            deliver(start, chunk)
        self.position += nbytes

    def _read_fully(self, view: memoryview) -> None:
        got = 0
        while got < view.nbytes:
            n = self._file.readinto(view[got:])
            if not n:
                raise Corrupt(f"{os.path.basename(self.path)} ends early")
            got += n

    def finish(self) -> None:
        """Close, and raise `Corrupt` unless every chunk read matched its checksum."""
        if self._file is not None:
            self._file.close()
            self._file = None
        got = self._sums.result()
        if got != self.expected[: len(got)] or (
            self.position == self.nbytes and len(got) != len(self.expected)
        ):
            pairs = enumerate(zip(got, self.expected, strict=False))
            bad = next((i for i, (a, b) in pairs if a != b), None)
            where = f" (chunk {bad} of {len(self.expected)})" if bad is not None else ""
            raise Corrupt(f"{os.path.basename(self.path)} is damaged: checksum mismatch{where}")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for part in self._sums.parts:
            if not isinstance(part, int):
                part.cancel()


class ChecksumFile:
    """A binary file wrapper that counts and checksums what a pickler writes to it."""

    def __init__(self, f: Any, budget: Budget | None) -> None:
        self.f = f
        self.budget = budget
        self.crc = 0
        self.written = 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        if self.budget is not None:
            self.budget.take(view.nbytes)
        self.crc = zlib.crc32(view, self.crc)
        self.written += view.nbytes
        return self.f.write(view) if self.f is not None else view.nbytes


def file_crc(path: str) -> tuple[int, str]:
    """(size, CRC-32 as 8 hex digits) of a whole file."""
    crc = 0
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(1024 * 1024)
        view = memoryview(buf)
        while n := f.readinto(view):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return size, f"{crc:08x}"


def read_checked(path: str, nbytes: int, crc: str) -> bytes:
    """A small file's bytes, `Corrupt` unless its size and CRC-32 are the recorded ones."""
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise Corrupt(f"{name} is missing ({e.strerror})") from None
    if len(data) != nbytes:
        raise Corrupt(f"{name} is truncated or damaged: {len(data)} bytes instead of {nbytes}")
    if f"{zlib.crc32(data):08x}" != crc:
        raise Corrupt(f"{name} is damaged: checksum mismatch")
    return data


def fsync_files(paths: list[str]) -> None:
    """fsync each file (all written first, then synced: the disk gets them together)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
