"""The data file of one saved variable: large buffers written straight from memory, read back
into preallocated memory, with a checksum per chunk.

A variable is saved as a pickle stream (`vars/NNNNN.pkl`) whose large buffers (numpy arrays,
torch storages, Keras model files) are not in the stream but in a second file
(`vars/NNNNN.bin`): the stream holds a reference `("seg", offset, nbytes, alloc)` for each, and
the data file is those buffers one after the other. Writing hands the buffer's own memory to
the operating system (no copy in the process); reading allocates the final object's memory
first and reads into it (`readinto`), so neither needs a second copy of the data.

Every buffer is checked in chunks of `CHUNK` bytes: the checksum of each chunk, in file order,
is the data file's checksum (`digests`, a fixed number of hex digits per chunk). The algorithm is
XXH3-128 where the kernel's environment has `xxhash` (tens of GB/s on one core: checking costs
little next to a copy of the same memory), else CRC-32 from the standard library's zlib (about
2 GB/s); the manifest names it per variable (`hash_algorithm`), and files written before it
existed are CRC-32. The checksums are computed by a few worker threads while the main thread
writes or reads the next chunk (both libraries release the GIL), so checking costs little time
on top of the disk's.

Like `kernel_side.py` this module is loaded into kernels as source: the standard library, and
`xxhash` only when it is installed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import zlib
from collections.abc import Callable
from typing import Any

try:
    import xxhash as _xxhash
except ImportError:  # a kernel environment without it: CRC-32
    _xxhash = None

MODULE = "_gpuhub_snapshot_io"
CHUNK = 16 * 1024 * 1024
#: checksum algorithm -> hex digits per checksum
WIDTHS = {"crc32": 8, "xxh3_128": 32}
#: the algorithm of files written before the manifest named one
LEGACY = "crc32"


class Corrupt(Exception):
    """A snapshot file whose content is not what was written (checksum or size)."""


class TooBig(Exception):
    """The variable would take more bytes than it may."""


class Unverifiable(Exception):
    """A file checked with an algorithm this kernel's environment cannot compute."""


def algorithm() -> str:
    """The checksum algorithm of the files this kernel writes."""
    return "xxh3_128" if _xxhash is not None else "crc32"


def available(name: str) -> bool:
    return name == "crc32" or (name == "xxh3_128" and _xxhash is not None)


def require(name: str) -> None:
    """`Unverifiable` (saying what to install) unless files checked with `name` can be read."""
    if available(name):
        return
    if name == "xxh3_128":
        raise Unverifiable(
            "its files were checked with XXH3 when saved and this kernel's environment does not "
            "have the xxhash package to check them: install it (pip install xxhash) and restore "
            "again (%gpuhub_restore)"
        )
    raise Unverifiable(f"unknown checksum algorithm {name!r}")


def chunk_digest(name: str) -> Callable[[Any], str]:
    """The function that gives a buffer's checksum (hex) under algorithm `name`."""
    require(name)
    if name == "xxh3_128":
        return _xxhash.xxh3_128_hexdigest
    return _crc_hex


def _crc_hex(view: Any) -> str:
    return f"{zlib.crc32(view):08x}"


class Hasher:
    """A running checksum of a stream written in pieces (the pickle stream)."""

    def __init__(self, name: str) -> None:
        require(name)
        self.name = name
        self._crc = 0
        self._xxh = _xxhash.xxh3_128() if name == "xxh3_128" else None

    def update(self, view: Any) -> None:
        if self._xxh is not None:
            self._xxh.update(view)
        else:
            self._crc = zlib.crc32(view, self._crc)

    def hexdigest(self) -> str:
        return self._xxh.hexdigest() if self._xxh is not None else f"{self._crc:08x}"


def split_digests(digests: str, name: str) -> list[str]:
    """A data file's per-chunk checksums as a list (the manifest stores them concatenated)."""
    width = WIDTHS.get(name, 8)
    return [digests[i : i + width] for i in range(0, len(digests), width)]


class Budget:
    """Bytes one variable may still write (None: no limit), shared by its two files."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        self.used += n
        if self.limit is not None and self.used > self.limit:
            raise TooBig()


def pool() -> concurrent.futures.ThreadPoolExecutor:
    """Worker threads for the checksums of one operation (shut down by the caller)."""
    workers = max(1, min(4, (os.cpu_count() or 1)))
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="gpuhub-checksum")


def chunk_count(nbytes: int) -> int:
    return max(1, -(-nbytes // CHUNK)) if nbytes else 0


class _Checksums:
    """Checksums (hex) of chunks in order, computed on the worker threads in batches of about a
    chunk's size (a thousand small tensors cost a few hand-offs, not a thousand), or inline
    without workers."""

    def __init__(self, workers: concurrent.futures.Executor | None, name: str) -> None:
        self.workers = workers
        self.digest = chunk_digest(name)
        self.parts: list[Any] = []  # a checksum (str), or a Future of a batch's checksums
        self._batch: list[memoryview] = []
        self._batch_bytes = 0

    def _digests(self, views: list[memoryview]) -> list[str]:
        return [self.digest(v) for v in views]

    def _flush(self) -> None:
        if self._batch:
            self.parts.append(self.workers.submit(self._digests, self._batch))
            self._batch, self._batch_bytes = [], 0

    def add(self, view: memoryview) -> None:
        """Checksum `view` (memory that stays as it is until `result`)."""
        if self.workers is None:
            self.parts.append(self.digest(view))
            return
        self._batch.append(view)
        self._batch_bytes += view.nbytes
        if self._batch_bytes >= CHUNK:
            self._flush()

    def add_now(self, view: memoryview) -> None:
        """Checksum on this thread (the view is reused as soon as this returns)."""
        if self.workers is not None:
            self._flush()
        self.parts.append(self.digest(view))

    def result(self) -> list[str]:
        if self.workers is not None:
            self._flush()
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            else:
                out.extend(part.result())
        return out

    def cancel(self) -> None:
        self._batch = []
        for part in self.parts:
            if not isinstance(part, str):
                part.cancel()


class SegmentWriter:
    """The data file of one variable, opened on its first buffer."""

    def __init__(
        self,
        path: str,
        budget: Budget,
        workers: concurrent.futures.Executor | None,
        name: str | None = None,
    ) -> None:
        self.path = path
        self.budget = budget
        self.offset = 0
        self.algorithm = name or algorithm()
        self._file: Any = None
        self._sums = _Checksums(workers, self.algorithm)

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
            self._sums.add_now(chunk)
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
        return self.offset, "".join(self._sums.result())

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._sums.cancel()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class SegmentReader:
    """Reads the buffers of one data file into memory the caller allocates, in file order,
    checking every chunk against the checksums recorded when it was written (`digests`, under
    algorithm `name`; `Unverifiable` when this kernel cannot compute it)."""

    def __init__(
        self,
        path: str,
        nbytes: int,
        digests: str,
        workers: concurrent.futures.Executor | None,
        name: str = LEGACY,
    ) -> None:
        self.path = path
        self.nbytes = nbytes
        self.expected = split_digests(digests, name)
        self._file: Any = None
        self._sums = _Checksums(workers, name)
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
            self._sums.add_now(chunk)
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
        self._sums.cancel()


class ChecksumFile:
    """A binary file wrapper that counts and checksums what a pickler writes to it."""

    def __init__(self, f: Any, budget: Budget | None, name: str | None = None) -> None:
        self.f = f
        self.budget = budget
        self.hasher = Hasher(name or algorithm())
        self.written = 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        if self.budget is not None:
            self.budget.take(view.nbytes)
        self.hasher.update(view)
        self.written += view.nbytes
        return self.f.write(view) if self.f is not None else view.nbytes

    def hexdigest(self) -> str:
        return self.hasher.hexdigest()


def read_checked(path: str, nbytes: int, digest: str, algorithm_name: str = LEGACY) -> bytes:
    """A small file's bytes, `Corrupt` unless its size and checksum are the recorded ones."""
    check = chunk_digest(algorithm_name)
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise Corrupt(f"{name} is missing ({e.strerror})") from None
    if len(data) != nbytes:
        raise Corrupt(f"{name} is truncated or damaged: {len(data)} bytes instead of {nbytes}")
    if check(data) != digest:
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
