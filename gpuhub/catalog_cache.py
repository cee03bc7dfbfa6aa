"""The catalogue file, parsed once per version of the file, for every process that reads it.

The file is checked when the hub and the service start (`gpuhub.settings.GpuhubConfig`); edited
while they run, it is read again at its next use. An edit that breaks it does not break spawns: the
last good version stays in force, and the problem is logged (and raised only when no version of
the file was ever good).
"""

from __future__ import annotations

import logging
import os
import threading

from .core.catalog import Catalog, CatalogError, load_catalog

log = logging.getLogger(__name__)

#: path -> (modification time of the version read, the catalogue)
_good: dict[str, tuple[int, Catalog]] = {}
#: path -> modification time of a version found broken (logged once)
_bad: dict[str, int] = {}
_lock = threading.Lock()


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


def cached_catalog(path: str) -> Catalog:
    """The catalogue in `path`: read again only when the file changes; the last good version
    while the file is broken. Raises `CatalogError` when it never was good."""
    mtime = _mtime(path)
    with _lock:
        known = _good.get(path)
        if known is not None and known[0] == mtime:
            return known[1]
        if known is not None and _bad.get(path) == mtime:
            return known[1]
        try:
            catalog = load_catalog(path)
        except CatalogError as e:
            if known is None:
                raise
            _bad[path] = mtime
            log.error("gpuhub: the changed catalogue is not used, the last good one is: %s", e)
            return known[1]
        _good[path] = (mtime, catalog)
        _bad.pop(path, None)
        return catalog
