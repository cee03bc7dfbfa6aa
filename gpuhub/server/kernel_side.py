"""Snapshot and restore, inside a running IPython kernel.

The gpuhub server extension sends this file's source (with `gpuhub/snapshot.py`'s) to each
Python kernel through the kernel's execute channel and loads them as the modules
`_gpuhub_kernel` and `_gpuhub_snapshot_core`: kernel environments do not have gpuhub installed.
So this module needs nothing but the standard library, IPython (every ipykernel has it), dill,
and torch only when the user's namespace already uses it. It never imports gpuhub.

Variables are saved one by one with dill, each into its own file, so one unpicklable object
does not sink the rest. Identity across variables is kept: a variable that refers to another
saved variable (an instance of a class defined in the notebook, an optimizer holding a model's
parameters) stores a reference to it, and restore brings the referenced variable back first.
torch tensors on a GPU are copied to the CPU to be saved and go back to a GPU on restore when the
new kernel has one, else they stay on the CPU (and the report says so).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import types
import weakref
from typing import Any

CORE_MODULE = "_gpuhub_snapshot_core"
MODULE = "_gpuhub_kernel"


def _core() -> Any:
    core = sys.modules.get(CORE_MODULE)
    if core is None:  # imported normally, where gpuhub is installed (tests, the server's venv)
        from gpuhub import snapshot as core
    return core


#: set by the server with `configure`
CONFIG: dict[str, Any] = {
    "root": os.path.join(os.path.expanduser("~"), ".gpuhub", "snapshots"),
    "key": None,
    "kernel_id": None,
    "notebook": None,
    "limit": None,  # bytes per snapshot; None or 0: no limit
    "reserve": 256 * 1024**2,  # bytes left free on the disk
    "keep": 3,  # snapshots kept per key
}
#: JSON of the last operation's result, read by the server through `user_expressions`
last_json = "null"

_restoring: dict[str, Any] = {"current": None, "moved": set()}


#: tensors restored on the CPU only because this kernel has no GPU -> the device they were on;
#: the next snapshot records that device again, so they return to a GPU when there is one
class _WeakIdentityMap:
    """object -> value, by identity, without keeping the object alive. (A WeakKeyDictionary
    compares keys with ==, which torch tensors answer element-wise.)"""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Any, Any]] = {}

    def __setitem__(self, obj: Any, value: Any) -> None:
        key = id(obj)

        def forget(ref: Any, key: int = key) -> None:
            if self._entries.get(key, (None,))[0] is ref:
                del self._entries[key]

        self._entries[key] = (weakref.ref(obj, forget), value)

    def get(self, obj: Any, default: Any = None) -> Any:
        entry = self._entries.get(id(obj))
        if entry is None or entry[0]() is not obj:
            return default
        return entry[1]

    def items(self) -> list[tuple[Any, Any]]:
        out = []
        for ref, value in list(self._entries.values()):
            obj = ref()
            if obj is not None:
                out.append((obj, value))
        return out


_origin = _WeakIdentityMap()
_notice: dict[str, Any] = {"text": None, "registered": False}


def adopt(old: Any) -> None:
    """Take over the state of another version of this module loaded before in this kernel."""
    with contextlib.suppress(Exception):
        for tensor, device in old._origin.items():
            _origin[tensor] = device
    with contextlib.suppress(Exception):
        _notice["text"] = old._notice["text"]
        old._notice["text"] = None


def configure(**settings: Any) -> None:
    unknown = set(settings) - set(CONFIG)
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)}")
    CONFIG.update(settings)
    _register_magics()


def _ipython() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def _namespace() -> tuple[dict[str, Any], dict[str, Any]]:
    ip = _ipython()
    if ip is None:
        main = sys.modules["__main__"].__dict__
        return main, {}
    return ip.user_ns, ip.user_ns_hidden


def _type_name(value: Any) -> str:
    t = type(value)
    return f"{t.__module__}.{t.__qualname__}"


def _short(error: BaseException, limit: int = 300) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- saving ------------------------------------------------------------------------------------


class _Unsaveable(Exception):
    """An object inside a variable that cannot be saved (an open file in a list, ...)."""


class _TooBig(Exception):
    pass


class _LimitedWriter:
    """A file wrapper that refuses to write more than `limit` bytes (None: no limit)."""

    def __init__(self, f: Any, limit: int | None) -> None:
        self.f = f
        self.limit = limit
        self.written = 0

    def write(self, data: Any) -> int:
        n = len(data) if isinstance(data, bytes) else memoryview(data).nbytes
        self.written += n
        if self.limit is not None and self.written > self.limit:
            raise _TooBig()
        return self.f.write(data)


def _torch() -> Any:
    return sys.modules.get("torch")  # only if the user imported it: never import it here


def _estimate(value: Any) -> int | None:
    """A cheap guess of a value's pickled size, for large arrays and tensors only."""
    torch = _torch()
    try:
        if torch is not None:
            if isinstance(value, torch.Tensor):
                return int(value.element_size() * value.nelement())
            if isinstance(value, torch.nn.Module):
                tensors = [*value.parameters(), *value.buffers()]
                return int(sum(t.element_size() * t.nelement() for t in tensors))
        nbytes = getattr(value, "nbytes", None)
        if isinstance(nbytes, int):
            return nbytes
        usage = getattr(value, "memory_usage", None)
        if callable(usage) and type(value).__module__.startswith("pandas"):
            total = usage(deep=False)
            return int(total.sum() if hasattr(total, "sum") else total)
    except Exception:
        return None
    return None


def _restore_tensor(cpu: Any, device: str, requires_grad: bool) -> Any:
    """Unpickling end of a GPU tensor: back to a GPU when there is one, else stay on the CPU."""
    target = _target_device(device)
    out = cpu.to(target) if target != "cpu" else cpu
    if requires_grad and out.is_floating_point():
        out.requires_grad_(True)
    return _remember_origin(out, device, target)


def _restore_parameter(cpu: Any, device: str, requires_grad: bool) -> Any:
    import torch

    target = _target_device(device)
    data = cpu.to(target) if target != "cpu" else cpu
    return _remember_origin(torch.nn.Parameter(data, requires_grad=requires_grad), device, target)


def _remember_origin(tensor: Any, device: str, target: str) -> Any:
    if target == "cpu" and device != "cpu":
        with contextlib.suppress(TypeError):  # a tensor type without weak references
            _origin[tensor] = device
    return tensor


def _target_device(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu" if device == "cpu" else device
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        index = int(device.split(":")[1]) if ":" in device else 0
        return f"cuda:{index if index < torch.cuda.device_count() else 0}"
    if _restoring["current"]:
        _restoring["moved"].add(_restoring["current"])
    return "cpu"


def _reference_map(candidates: list[tuple[str, Any]]) -> dict[int, tuple[str, ...]]:
    """id(object) -> persistent reference, for objects that other variables may share:
    every (non-atomic) variable's value, and the parameters, buffers and submodules of torch
    modules held in variables."""
    core = _core()
    refs: dict[int, tuple[str, ...]] = {}
    for name, value in candidates:
        if _type_name(value) in core.ATOMIC_TYPES or isinstance(value, types.ModuleType):
            continue
        if core.skip_reason(core.type_names(type(value))):
            continue  # not saved: others that hold it cannot be restored with a reference
        refs.setdefault(id(value), ("var", name))
    torch = _torch()
    if torch is None:
        return refs
    for name, value in candidates:
        if not isinstance(value, torch.nn.Module):
            continue
        try:
            for path, p in value.named_parameters(remove_duplicate=False):
                refs.setdefault(id(p), ("param", name, path))
            for path, b in value.named_buffers(remove_duplicate=False):
                refs.setdefault(id(b), ("buffer", name, path))
            for path, m in value.named_modules(remove_duplicate=False):
                if path:
                    refs.setdefault(id(m), ("module", name, path))
        except Exception:
            continue
    return refs


def _global_name(obj: Any) -> str | None:
    """The qualified name under which `obj` (a class or function) can be found again in its
    module, or None (defined in the notebook, or nested in a function: saved by value).

    dill decides this itself, but fails on modules that shadow a submodule with a function
    of the same name (torch.optim.adam), and then tries to save library classes by value."""
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module_name or module_name == "__main__" or not qualname or "<" in qualname:
        return None
    found: Any = sys.modules.get(module_name)
    if found is None:
        return None
    for part in qualname.split("."):
        found = getattr(found, part, None)
        if found is None:
            return None
    return qualname if found is obj else None


def _make_pickler(dill: Any) -> type:
    class Pickler(dill.Pickler):
        def __init__(self, file: Any, current: str, refs: dict[int, tuple[str, ...]]) -> None:
            super().__init__(file, protocol=max(5, dill.settings.get("protocol", 4)))
            self._current = current
            self._refs = refs
            self._reasons: dict[type, str | None] = {}
            torch = _torch()
            self._torch = torch
            self._is_module = torch is not None and isinstance(
                _namespace()[0].get(current), torch.nn.Module
            )
            self.used_refs: set[str] = set()
            self.devices: set[str] = set()

        def persistent_id(self, obj: Any) -> Any:
            ref = self._refs.get(id(obj))
            if ref is None or ref[1] == self._current:
                return None
            if ref[0] != "var" and self._is_module:
                return None  # a module's own tensors are saved with it (no reference cycles)
            self.used_refs.add(ref[1])
            return ref

        def reducer_override(self, obj: Any) -> Any:
            t = type(obj)
            if t not in self._reasons:
                core = _core()
                self._reasons[t] = core.skip_reason(core.type_names(t))
            reason = self._reasons[t]
            if reason:
                raise _Unsaveable(reason)
            if t is type or isinstance(obj, (type, types.FunctionType)):
                name = _global_name(obj)
                if name is not None:
                    return name  # pickled by reference, like the standard pickler does
                return NotImplemented
            torch = self._torch
            if torch is not None and isinstance(obj, torch.Tensor):
                return self._tensor(obj)
            return NotImplemented

        def _tensor(self, t: Any) -> Any:
            device = str(t.device)
            if device == "cpu":
                device = _origin.get(t, "cpu")  # on the CPU only for want of a GPU
            non_leaf = t.requires_grad and not t.is_leaf
            if t.device.type == "meta" or (device == "cpu" and not non_leaf):
                return NotImplemented
            if device != "cpu":
                self.devices.add(device)
            cpu = t.detach().to("cpu")
            restore = (
                _restore_parameter if isinstance(t, self._torch.nn.Parameter) else _restore_tensor
            )
            return (restore, (cpu, device, bool(t.requires_grad)))

    return Pickler


def _drop_dangling(
    core: Any, saved: list[Any], skipped: list[Any], vars_dir: str
) -> tuple[list[Any], list[Any]]:
    """Variables that refer to a variable that could not be saved would come back without it:
    skip them too (repeatedly, as one dropped variable may be referred to by another)."""
    while True:
        gone = {s.name for s in skipped}
        dangling = [v for v in saved if any(r in gone for r in v.refs)]
        if not dangling:
            return saved, skipped
        for v in dangling:
            missing = next(r for r in v.refs if r in gone)
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(vars_dir, os.path.basename(v.file)))
            skipped.append(
                core.SkippedVariable(
                    v.name, v.type, f"refers to `{missing}`, which could not be saved", v.bytes
                )
            )
        saved = [v for v in saved if v not in dangling]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _packages() -> dict[str, str]:
    out = {}
    for name in ("dill", "torch", "numpy", "pandas", "IPython"):
        module = sys.modules.get(name)
        version = getattr(module, "__version__", None)
        if version:
            out[name] = str(version)
    return out


def _cleanup(keydir: str, keep: int) -> None:
    """Remove temporaries of interrupted snapshots and snapshots beyond the `keep` newest."""
    core = _core()
    try:
        names = os.listdir(keydir)
    except OSError:
        return
    mtimes = {}
    alive = set()
    for n in names:
        if n.startswith(core.TMP_PREFIX):
            try:
                mtimes[n] = os.stat(os.path.join(keydir, n)).st_mtime
            except OSError:
                continue
            pid = core.temp_pid(n)
            if pid is not None and _pid_alive(pid):
                alive.add(pid)
    for n in core.stale_temporaries(names, time.time(), mtimes, alive):
        shutil.rmtree(os.path.join(keydir, n), ignore_errors=True)
    for n in core.to_prune(names, keep, protect=[_chosen(keydir)]):
        shutil.rmtree(os.path.join(keydir, n), ignore_errors=True)


def _chosen(keydir: str) -> str:
    """The snapshot the user chose to restore at the next start ("" if none)."""
    try:
        with open(os.path.join(keydir, _core().RESTORE_NEXT)) as f:
            return str(json.load(f).get("snapshot") or "")
    except (OSError, ValueError, AttributeError):
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def snapshot(root: str | None = None, key: str | None = None) -> dict[str, Any]:
    """Save the user namespace into `<root>/<key>/<time>/`; returns the manifest as a dict
    with `path`. The folder appears only when the snapshot is complete."""
    core = _core()
    import dill

    root = root or CONFIG["root"]
    key = key or CONFIG["key"] or core.snapshot_key(CONFIG["notebook"], CONFIG["kernel_id"])
    started = time.time()
    name = core.timestamp_name(started)
    keydir = os.path.join(root, key)
    os.makedirs(keydir, exist_ok=True)
    _cleanup(keydir, CONFIG["keep"])
    tmp = tempfile.mkdtemp(prefix=core.temp_prefix(name, os.getpid()), dir=keydir)
    try:
        manifest = _write(core, dill, tmp, key, name, started)
        final = os.path.join(keydir, name)
        os.rename(tmp, final)
        _fsync_dir(keydir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _cleanup(keydir, CONFIG["keep"])
    return {**manifest.to_dict(), "path": final}


def _write(core: Any, dill: Any, tmp: str, key: str, name: str, started: float) -> Any:
    ns, hidden = _namespace()
    candidates = [
        (n, v)
        for n, v in list(ns.items())
        if not core.is_ipython_name(n) and not (n in hidden and hidden[n] is v)
    ]
    vars_dir = os.path.join(tmp, core.VARS_DIR)
    os.mkdir(vars_dir)
    refs = _reference_map(candidates)
    pickler_class = _make_pickler(dill)
    limit = CONFIG["limit"] or None
    saved: list[Any] = []
    skipped: list[Any] = []
    used = 0
    for i, (n, value) in enumerate(candidates):
        type_name = _type_name(value)
        if isinstance(value, types.ModuleType):
            saved.append(core.SavedVariable(n, type_name, "module", module=value.__name__))
            continue
        reason = core.skip_reason(core.type_names(type(value)))
        if reason:
            skipped.append(core.SkippedVariable(n, type_name, reason))
            continue
        try:
            free = shutil.disk_usage(tmp).free
        except OSError:
            free = None
        left = core.remaining(limit, used, free, CONFIG["reserve"])
        estimate = _estimate(value)
        reason = core.over_budget(estimate, left)
        if reason:
            skipped.append(core.SkippedVariable(n, type_name, reason, estimate))
            continue
        filename = f"{i:05d}.pkl"
        path = os.path.join(vars_dir, filename)
        try:
            with open(path, "wb") as f:
                pickler = pickler_class(_LimitedWriter(f, left), n, refs)
                pickler.dump(value)
                f.flush()
                os.fsync(f.fileno())
            size = os.path.getsize(path)
        except _TooBig:
            os.unlink(path)
            why = f"too large: more than the {core.human_bytes(left or 0)} left under the limit"
            skipped.append(core.SkippedVariable(n, type_name, why, estimate))
            continue
        except _Unsaveable as e:
            os.unlink(path)
            skipped.append(core.SkippedVariable(n, type_name, f"contains {e}"))
            continue
        except Exception as e:
            if os.path.exists(path):
                os.unlink(path)
            skipped.append(core.SkippedVariable(n, type_name, f"cannot be saved: {_short(e)}"))
            continue
        used += size
        saved.append(
            core.SavedVariable(
                n,
                type_name,
                "pickle",
                bytes=size,
                file=f"{core.VARS_DIR}/{filename}",
                refs=tuple(sorted(pickler.used_refs)),
                devices=tuple(sorted(pickler.devices)),
            )
        )
    saved, skipped = _drop_dangling(core, saved, skipped, vars_dir)
    _fsync_dir(vars_dir)
    manifest = core.Manifest(
        key=key,
        name=name,
        created=started,
        kernel_id=CONFIG["kernel_id"],
        notebook=CONFIG["notebook"],
        python=sys.version.split()[0],
        packages=_packages(),
        saved=tuple(saved),
        skipped=tuple(skipped),
        limit_bytes=limit,
        duration_s=round(time.time() - started, 3),
    )
    with open(os.path.join(tmp, core.MANIFEST), "w") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    return manifest


# -- restoring ---------------------------------------------------------------------------------


def _make_unpickler(dill: Any) -> type:
    class Unpickler(dill.Unpickler):
        def __init__(self, file: Any, ns: dict[str, Any], restored: set[str]) -> None:
            super().__init__(file)
            self._ns = ns
            self._restored = restored

        def persistent_load(self, pid: Any) -> Any:
            kind, owner, *path = pid
            if owner not in self._restored:
                raise LookupError(f"it refers to `{owner}`, which was not restored")
            value = self._ns[owner]
            if kind == "var":
                return value
            if kind == "param":
                return value.get_parameter(path[0])
            if kind == "buffer":
                return value.get_buffer(path[0])
            if kind == "module":
                return value.get_submodule(path[0])
            raise LookupError(f"unknown reference {pid!r}")

    return Unpickler


def snapshots(root: str | None = None, key: str | None = None) -> list[str]:
    core = _core()
    root = root or CONFIG["root"]
    key = key or CONFIG["key"]
    try:
        return core.complete_snapshots(os.listdir(os.path.join(root, key)))
    except OSError:
        return []


def restore(name: str | None = None, root: str | None = None, key: str | None = None) -> Any:
    """Restore snapshot `name` (default: the latest) into the user namespace; a RestoreReport."""
    core = _core()
    root = root or CONFIG["root"]
    key = key or CONFIG["key"] or core.snapshot_key(CONFIG["notebook"], CONFIG["kernel_id"])
    names = snapshots(root, key)
    if name is None:
        name = names[-1] if names else None
        if name is None:
            return core.RestoreReport(key, None)
    elif name not in names:
        return core.RestoreReport(key, name, error=f"no snapshot {name!r} for {key}")
    folder = os.path.join(root, key, name)
    try:
        with open(os.path.join(folder, core.MANIFEST)) as f:
            manifest = core.manifest_from_json(f.read())
    except (OSError, ValueError) as e:
        return core.RestoreReport(key, name, error=f"unreadable manifest: {_short(e)}")
    try:
        import dill
    except ImportError:
        return core.RestoreReport(
            key, name, error="dill is not installed in this kernel's environment"
        )
    ns, _hidden = _namespace()
    unpickler_class = _make_unpickler(dill)
    restored: list[str] = []
    done: set[str] = set()
    failed: list[tuple[str, str]] = []
    _restoring["moved"] = set()
    for v in core.restore_order(manifest.saved):
        _restoring["current"] = v.name
        try:
            if v.kind == "module":
                value = importlib.import_module(v.module)
            else:
                missing = [r for r in v.refs if r not in done]
                if missing:
                    raise LookupError(f"it refers to `{missing[0]}`, which was not restored")
                with open(os.path.join(folder, v.file), "rb") as f:
                    value = unpickler_class(io.BufferedReader(f), ns, done).load()
        except Exception as e:
            reason = str(e) if isinstance(e, LookupError) and str(e).startswith("it ") else None
            failed.append((v.name, reason or _short(e)))
            continue
        finally:
            _restoring["current"] = None
        ns[v.name] = value
        restored.append(v.name)
        done.add(v.name)
    return core.RestoreReport(
        key=key,
        snapshot=name,
        restored=tuple(restored),
        failed=tuple(failed),
        skipped_at_snapshot=tuple((s.name, s.reason) for s in manifest.skipped),
        moved=tuple(sorted(_restoring["moved"])),
    )


# -- what the server calls (results go to `last_json`) ------------------------------------------


def run_snapshot() -> None:
    global last_json
    try:
        result = {"status": "saved", **snapshot()}
    except Exception as e:
        result = {"status": "failed", "error": _short(e, 1000)}
    last_json = json.dumps(result)


def run_restore(name: str | None = None, notify: bool = True) -> None:
    """Restore and keep the report in `last_json`; with `notify`, the user sees the summary
    in the output of the next cell they run."""
    global last_json
    core = _core()
    try:
        report = restore(name)
    except Exception as e:
        report = core.RestoreReport(CONFIG["key"] or "", name, error=_short(e, 1000))
    text = core.summary(report)
    if notify and (report.snapshot or report.error):
        _notify(text)
    last_json = json.dumps({**report.to_dict(), "summary": text})


def run_auto_restore(name: str | None = None, notify: bool = True) -> None:
    """The restore a kernel gets when it starts: only into a kernel where no cell ran yet,
    so nothing the user did is overwritten."""
    global last_json
    ip = _ipython()
    if ip is not None and ip.execution_count > 1:
        reason = "cells already ran in this kernel; %gpuhub_restore brings the snapshot back"
        if notify:
            _notify(f"gpuhub: a snapshot of this notebook was not restored: {reason}")
        last_json = json.dumps({"key": CONFIG["key"], "snapshot": name, "skipped_reason": reason})
        return
    run_restore(name, notify)


def _notify(text: str) -> None:
    ip = _ipython()
    if ip is None:
        return
    _notice["text"] = text
    if _notice["registered"]:
        return

    def show(*_args: Any) -> None:
        message, _notice["text"] = _notice["text"], None
        if message:
            print(message)

    ip.events.register("pre_run_cell", show)
    _notice["registered"] = True


# -- magics ------------------------------------------------------------------------------------


def _register_magics() -> None:
    ip = _ipython()
    if ip is None:
        return

    def gpuhub_restore(line: str = "") -> None:
        """%gpuhub_restore [NAME | --list]: restore this notebook's latest snapshot (or NAME)."""
        core = _core()
        arg = line.strip()
        if arg == "--list":
            names = snapshots()
            print("\n".join(names) if names else "gpuhub: no snapshots for this notebook")
            return
        report = restore(arg or None)
        print(core.summary(report))

    def gpuhub_snapshot(line: str = "") -> None:
        """%gpuhub_snapshot: save this notebook's variables now."""
        core = _core()
        result = snapshot()
        skipped = result["skipped"]
        print(
            f"gpuhub: saved {len(result['saved'])} variable(s), "
            f"{core.human_bytes(result['total_bytes'])}, in {result['path']}"
        )
        for s in skipped:
            print(f"  not saved: {s['name']} ({s['reason']})")

    ip.register_magic_function(gpuhub_restore, "line", "gpuhub_restore")
    ip.register_magic_function(gpuhub_snapshot, "line", "gpuhub_snapshot")
