"""Snapshot folders on disk: list them, delete one, choose the one restored at the next start.

The layout is `gpuhub.core.snapshot`'s: `<root>/<key>/<name>/manifest.json`. Choosing a snapshot for
the next start writes `<root>/<key>/restore-next.json` (`{"snapshot": name}`): when the key's
notebook kernel next starts, the server extension restores that snapshot instead of the latest,
then removes the file. Used by the server extension (its REST API) and by the hub service's
pages where the service sees the homes (local backend, no server running).

The folders belong to the user, who may plant symbolic links in them. Nothing here follows one:
every folder below the trusted part of the path is opened with `O_NOFOLLOW` relative to its
parent's descriptor (`dir_fd`), files are read only when they are regular files, and the folder
reached is checked to be the one asked for. A link met on the way is refused (`UnsafePath`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from .core import snapshot as core

RESTORE_NEXT = core.RESTORE_NEXT
MANIFEST_MAX_BYTES = 32 * 1024 * 1024
RESTORE_NEXT_MAX_BYTES = 4096

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

log = logging.getLogger(__name__)


class UnsafePath(ValueError):
    """A snapshot path that leads somewhere else: a symbolic link, or not a plain folder/file."""


def check_key(key: str) -> str:
    """A snapshot key as a folder name; `ValueError` for anything that could leave the root."""
    if not key or "/" in key or "\\" in key or key.startswith(".") or len(key) > 255:
        raise ValueError(f"key: not a snapshot key: {key!r}")
    return key


def check_name(name: str) -> str:
    if not core.is_snapshot_name(name):
        raise ValueError(f"snapshot: not a snapshot name: {name!r}")
    return name


def _refusal(shown: str, st: os.stat_result | None) -> UnsafePath:
    if st is not None and stat.S_ISLNK(st.st_mode):
        what = "is a symbolic link"
    else:
        what = "is not a plain folder or file"
    return UnsafePath(
        f"{shown}: refused, it {what} (gpuhub never follows links in snapshot folders)"
    )


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except OSError:
        return None


def _open_dir(name: str, dir_fd: int | None, shown: str) -> int:
    """Open folder `name` (one component) without following a link; `FileNotFoundError` when
    missing, `UnsafePath` when it is a link or not a folder."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            st = _lstat(name, dir_fd) if dir_fd is not None else None
            raise _refusal(shown, st) from None
        raise


def _fd_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None  # no /proc: the no-follow walk alone vouches for the folder


def _relative_parts(relative: str) -> list[str]:
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if relative.startswith("/") or ".." in parts or not parts:
        raise ValueError(f"snapshot_dir: must be a folder inside the home, not {relative!r}")
    return parts


@contextmanager
def _opened_root(root: Path, trusted: Path | None) -> Iterator[int | None]:
    """A descriptor of the snapshot root (None when it does not exist). `trusted`: the part of
    `root` opened as is (the user's home, which the user cannot replace); every component below
    it is opened without following links. Without `trusted` the root itself is trusted (the
    server extension, running as the user it serves)."""
    fds: list[int] = []
    try:
        if trusted is None:
            try:
                fds.append(os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            except (FileNotFoundError, NotADirectoryError):
                yield None
                return
        else:
            parts = _relative_parts(str(root.relative_to(trusted)))
            try:
                fds.append(os.open(trusted, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
                shown = "~"
                for part in parts:
                    shown = f"{shown}/{part}"
                    fds.append(_open_dir(part, fds[-1], shown))
            except (FileNotFoundError, NotADirectoryError):
                yield None
                return
            reached = _fd_path(fds[-1])
            expected = os.path.join(os.path.realpath(trusted), *parts)
            if reached is not None and reached != expected:
                raise UnsafePath(f"{shown}: refused, it leads to {reached}, outside {expected}")
        yield fds[-1]
    finally:
        for fd in reversed(fds):
            os.close(fd)


@contextmanager
def _opened(fd: int, name: str, shown: str) -> Iterator[int]:
    sub = _open_dir(name, fd, shown)
    try:
        yield sub
    finally:
        os.close(sub)


def _read_file(dir_fd: int, name: str, limit: int, shown: str) -> str:
    """A regular file's text, never through a link, at most `limit` bytes (`ValueError`)."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK):
            raise _refusal(shown, _lstat(name, dir_fd)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refusal(shown, st)
        if st.st_size > limit:
            raise ValueError(f"{shown}: larger than {limit} bytes")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"{shown}: larger than {limit} bytes")
    return data.decode("utf-8")


def _is_snapshot(key_fd: int, key: str, name: str) -> bool:
    """True when `name` is a real (not linked) snapshot folder with a real manifest."""
    st = _lstat(name, key_fd)
    if st is None:
        return False
    if not stat.S_ISDIR(st.st_mode):
        raise _refusal(f"{key}/{name}", st)
    with _opened(key_fd, name, f"{key}/{name}") as snap:
        mst = _lstat(core.MANIFEST, snap)
        if mst is None:
            return False
        if not stat.S_ISREG(mst.st_mode):
            raise _refusal(f"{key}/{name}/{core.MANIFEST}", mst)
    return True


def _restore_next_in(key_fd: int) -> str | None:
    try:
        text = _read_file(key_fd, RESTORE_NEXT, RESTORE_NEXT_MAX_BYTES, RESTORE_NEXT)
        value = json.loads(text).get("snapshot")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and core.is_snapshot_name(value) else None


def read_restore_next(folder: Path) -> str | None:
    """The snapshot of a key's folder chosen for the next start, if any."""
    try:
        fd = _open_dir(str(folder), None, str(folder))
    except (OSError, ValueError):
        return None
    try:
        return _restore_next_in(fd)
    finally:
        os.close(fd)


def _list_key(key_fd: int, key: str, root: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    chosen = _restore_next_in(key_fd)
    for name in core.complete_snapshots(os.listdir(key_fd)):
        entry: dict[str, Any] = {
            "key": key,
            "snapshot": name,
            "path": str(root / key / name),
            "restore_next": name == chosen,
        }
        try:
            with _opened(key_fd, name, f"{key}/{name}") as snap:
                text = _read_file(
                    snap, core.MANIFEST, MANIFEST_MAX_BYTES, f"{key}/{name}/{core.MANIFEST}"
                )
            manifest = core.manifest_from_json(text)
        except UnsafePath as e:
            entry["error"] = str(e)
        except (OSError, ValueError) as e:
            entry["error"] = f"unreadable manifest: {e}"
        else:
            entry.update(
                created=core.iso(manifest.created),
                notebook=manifest.notebook,
                kernel_id=manifest.kernel_id,
                saved=len(manifest.saved),
                skipped=len(manifest.skipped),
                bytes=manifest.total_bytes,
            )
        out.append(entry)
    return out


def list_folder(root: Path, trusted: Path | None = None) -> list[dict[str, Any]]:
    """Every complete snapshot under `root`, newest first, with its manifest's summary.
    `UnsafePath` when the way to `root` below `trusted` is a link; a linked key folder is left
    out (and logged), a linked snapshot folder or manifest is listed with its refusal."""
    out: list[dict[str, Any]] = []
    with _opened_root(root, trusted) as fd:
        if fd is None:
            return out
        for key in sorted(os.listdir(fd)):
            if key.startswith("."):
                continue
            try:
                with _opened(fd, key, key) as key_fd:
                    out.extend(_list_key(key_fd, key, root))
            except UnsafePath as e:
                log.warning("gpuhub: snapshot folder %s: %s", root, e)
            except OSError:
                continue
    out.sort(key=lambda e: e["snapshot"], reverse=True)
    return out


@contextmanager
def _key_folder(root: Path, key: str, trusted: Path | None) -> Iterator[int]:
    check_key(key)
    with _opened_root(root, trusted) as fd:
        if fd is None:
            raise FileNotFoundError(f"no snapshots of {key}")
        try:
            with _opened(fd, key, key) as key_fd:
                yield key_fd
        except FileNotFoundError:
            raise FileNotFoundError(f"no snapshots of {key}") from None


def delete(root: Path, key: str, name: str, trusted: Path | None = None) -> None:
    """Remove one snapshot (renamed out of sight first: a listing never sees half of it).
    `FileNotFoundError` when there is no such snapshot, `UnsafePath` for a link."""
    check_name(name)
    with _key_folder(root, key, trusted) as key_fd:
        if not _is_snapshot(key_fd, key, name):
            raise FileNotFoundError(f"no snapshot {name} of {key}")
        doomed = core.temp_prefix(name, os.getpid()) + "deleted"
        os.replace(name, doomed, src_dir_fd=key_fd, dst_dir_fd=key_fd)
        shutil.rmtree(doomed, ignore_errors=True, dir_fd=key_fd)
        if _restore_next_in(key_fd) == name:
            _unlink(key_fd, RESTORE_NEXT)


def _unlink(dir_fd: int, name: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)  # a link is removed itself, never its target


def set_restore_next(root: Path, key: str, name: str | None, trusted: Path | None = None) -> None:
    """Restore snapshot `name` of `key` at the next start of its kernel (None: the latest, as
    usual). `FileNotFoundError` when there is no such snapshot, `UnsafePath` for a link."""
    if name is not None:
        check_name(name)
    with _key_folder(root, key, trusted) as key_fd:
        if name is None:
            _unlink(key_fd, RESTORE_NEXT)
            return
        if not _is_snapshot(key_fd, key, name):
            raise FileNotFoundError(f"no snapshot {name} of {key}")
        tmp = f".{RESTORE_NEXT}.{os.getpid()}.tmp"
        _unlink(key_fd, tmp)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o644, dir_fd=key_fd)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"snapshot": name, "at": time.time()}))
        os.replace(tmp, RESTORE_NEXT, src_dir_fd=key_fd, dst_dir_fd=key_fd)
