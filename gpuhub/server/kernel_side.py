"""Snapshot and restore, inside a running IPython kernel.

The gpuhub server extension sends this file's source (with `gpuhub/core/snapshot.py`'s and
`kernel_io.py`'s) to each Python kernel through the kernel's execute channel and loads them as
the modules `_gpuhub_kernel`, `_gpuhub_snapshot_core` and `_gpuhub_snapshot_io`: kernel
environments do not have gpuhub installed. So this module needs nothing but the standard library,
IPython (every ipykernel has it), dill (for code defined in the notebook), and numpy, torch and
Keras only when the user's namespace already uses them. It never imports gpuhub.

Variables are saved one by one, each into its own files, so one unpicklable object does not sink
the rest: with Python's C pickler (protocol 5), or with dill when the value holds functions or
classes defined in the notebook (saved by value) or anything else only dill can save. The
buffers of numpy arrays and torch storages do not go through the pickle stream: they are written
from their own memory to a data file and read back straight into the memory of the restored
object (`kernel_io.py`), with a checksum per chunk (XXH3-128 where the kernel has `xxhash`, else
CRC-32). A variable unchanged since the previous snapshot of the same notebook is compared by
checksum, not written again: its files are linked into the new snapshot. Identity across
variables is kept: a variable that refers to another saved variable (an instance of a class
defined in the notebook, an optimizer holding a model's parameters) stores a reference to it,
and restore brings the referenced variable back first.
torch tensors on a GPU are copied to the host a chunk at a time to be saved and go back to a GPU
on restore when the new kernel has one, else they stay on the CPU (and the report says so). Keras
models are saved in Keras' own format (weights, optimizer state, compile configuration).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import io
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
import types
import weakref
from typing import Any

CORE_MODULE = "_gpuhub_snapshot_core"
IO_MODULE = "_gpuhub_snapshot_io"
MODULE = "_gpuhub_kernel"


def _core() -> Any:
    core = sys.modules.get(CORE_MODULE)
    if core is None:  # imported normally, where gpuhub is installed (tests, the server's venv)
        from gpuhub.core import snapshot as core
    return core


def _io() -> Any:
    module = sys.modules.get(IO_MODULE)
    if module is None:
        from gpuhub.server import kernel_io as module
    return module


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


class _Unsaveable(Exception):
    """An object inside a variable that cannot be saved (an open file in a list, ...)."""


class _NeedsDill(Exception):
    """A function or class defined in the notebook: saved by value, which only dill does."""


class _Changed(Exception):
    """A variable differs from its copy in the previous snapshot (found while comparing)."""


def _torch() -> Any:
    return sys.modules.get("torch")  # only if the user imported it: never import it here


def _numpy() -> Any:
    return sys.modules.get("numpy")


def _keras_model_class() -> Any:
    keras = sys.modules.get("keras")
    return getattr(keras, "Model", None) if keras is not None else None


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


# -- unpickling ends (referenced by name from the pickle streams: keep their names) -----------


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
    data = cpu.to(target) if target != "cpu" and str(cpu.device) != target else cpu
    return _remember_origin(torch.nn.Parameter(data, requires_grad=requires_grad), device, target)


def _rebuild_ndarray(buf: Any, dtype: Any, shape: tuple[int, ...], order: str) -> Any:
    """A numpy array over the bytes read for it (no copy)."""
    import numpy as np

    if not isinstance(buf, np.ndarray):
        buf = np.frombuffer(buf, dtype=np.uint8)
    return buf.view(dtype).reshape(shape, order=order)


def _storage_bytes(buf: Any) -> Any:
    """A torch storage's bytes, as the uint8 tensor they were read into (on its device)."""
    return buf


def _rebuild_tensor(
    data: Any,
    dtype: Any,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool,
    origin: str,
) -> Any:
    """A tensor over a storage read back by `_storage_bytes` (no copy)."""
    import torch

    out = torch.empty(0, dtype=dtype, device=data.device)
    out.set_(data.untyped_storage(), offset, size, stride)
    if requires_grad and (out.is_floating_point() or out.is_complex()):
        out.requires_grad_(True)
    return _remember_origin(out, origin, str(out.device) if out.device.type != "cpu" else "cpu")


def _load_keras(buf: Any) -> Any:
    """A Keras model from the bytes of its `.keras` file (weights, optimizer, compile config);
    classes defined in the notebook and restored already are given as custom objects."""
    import keras

    ns, _hidden = _namespace()
    custom = {n: v for n, v in ns.items() if isinstance(v, type) and v.__module__ == "__main__"}
    with tempfile.TemporaryDirectory(prefix="gpuhub-keras-") as folder:
        path = os.path.join(folder, "model.keras")
        with open(path, "wb") as f:
            f.write(buf)
        return keras.models.load_model(path, custom_objects=custom or None)


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


# -- saving ------------------------------------------------------------------------------------


class _Segment:
    """A buffer written to the variable's data file instead of the pickle stream: `view` (bytes
    in memory), or `nbytes` produced by `fill(start, length)` (a GPU's memory, in chunks).
    `alloc` says what memory it is read back into: "numpy", "torch" (on `device`), "bytes"."""

    __slots__ = ("alloc", "device", "fill", "nbytes", "view")

    def __init__(
        self,
        alloc: str,
        view: memoryview | None = None,
        device: str = "cpu",
        nbytes: int = 0,
        fill: Any = None,
    ) -> None:
        self.alloc = alloc
        self.view = view
        self.device = device
        self.nbytes = view.nbytes if view is not None else nbytes
        self.fill = fill


class _StorageRef:
    """One torch storage of the variable, however many tensors view it (pickled once)."""

    __slots__ = ("origin", "storage", "tensor")

    def __init__(self, tensor: Any, storage: Any, origin: str) -> None:
        self.tensor = tensor
        self.storage = storage
        self.origin = origin


def _memory(address: int, nbytes: int, readonly: bool = False) -> memoryview:
    """A byte view of `nbytes` of this process's memory at `address` (torch storages)."""
    import ctypes

    view = memoryview((ctypes.c_ubyte * nbytes).from_address(address)).cast("B")
    return view.toreadonly() if readonly else view


class _DrySegments:
    """Stands in for the data file while comparing a variable with its previous copy: the
    checksum of each chunk, compared with the recorded ones in order. The chunks are collected
    while the variable is pickled and checksummed once the pickler is done, on the worker threads
    in `BATCHES` batches of about equal size: Python's pickler holding the interpreter lock while
    the workers hash makes both wait for it at every chunk (a dict of a thousand tensors compared
    about a third slower that way, on two cores). A batch that differs cancels the batches not
    started, and `finish` returns only when no checksum runs over the variable's memory."""

    #: batches of chunks handed to the worker threads per variable (a few per worker)
    BATCHES = 8

    def __init__(self, expected: list[str], workers: Any, algorithm: str) -> None:
        self.expected = expected
        self.workers = workers
        self.digest = _io().chunk_digest(algorithm)
        self.offset = 0
        self.digests: list[str] = []
        self._pending: list[Any] = []  # futures of batches not compared yet, in order
        self._chunks: list[memoryview] = []  # collected, not handed to the workers yet
        self._chunk_bytes = 0

    def _check(self, digest: str) -> None:
        i = len(self.digests)
        if i >= len(self.expected) or digest != self.expected[i]:
            raise _Changed()
        self.digests.append(digest)

    def _digests(self, views: list[memoryview]) -> list[str]:
        return [self.digest(v) for v in views]

    def _submit(self) -> None:
        """The collected chunks to the workers, in file order, in batches of about equal size."""
        chunks, total = self._chunks, self._chunk_bytes
        self._chunks, self._chunk_bytes = [], 0
        if not chunks:
            return
        target = max(1, -(-total // self.BATCHES))
        batch: list[memoryview] = []
        size = 0
        for chunk in chunks:
            batch.append(chunk)
            size += chunk.nbytes
            if size >= target:
                self._pending.append(self.workers.submit(self._digests, batch))
                batch, size = [], 0
        if batch:
            self._pending.append(self.workers.submit(self._digests, batch))

    def _settle(self) -> None:
        """Compare every batch's checksums in order; `_Changed` at the first difference."""
        if self.workers is not None:
            self._submit()
        try:
            while self._pending:
                for digest in self._pending[0].result():
                    self._check(digest)
                self._pending.pop(0)
        finally:
            self.abort()

    def add(self, view: memoryview) -> tuple[int, int]:
        io_ = _io()
        for i in range(0, view.nbytes, io_.CHUNK):
            chunk = view[i : i + io_.CHUNK]
            if self.workers is None:
                self._check(self.digest(chunk))
                continue
            self._chunks.append(chunk)
            self._chunk_bytes += chunk.nbytes
        offset = self.offset
        self.offset += view.nbytes
        return offset, view.nbytes

    def add_chunks(self, nbytes: int, fill: Any) -> tuple[int, int]:
        """A device's memory through a staging buffer reused at the next `fill`: checked here,
        in order after everything before it."""
        io_ = _io()
        self._settle()
        for start in range(0, nbytes, io_.CHUNK):
            self._check(self.digest(fill(start, min(io_.CHUNK, nbytes - start))))
        offset = self.offset
        self.offset += nbytes
        return offset, nbytes

    def finish(self) -> None:
        """Checksum and compare every chunk; `_Changed` at the first difference."""
        self._settle()

    def abort(self) -> None:
        """Drop what is not compared yet: batches not started are cancelled, running ones
        waited for (none runs over the variable's memory once this returns)."""
        self._chunks, self._chunk_bytes = [], 0
        pending, self._pending = self._pending, []
        for future in pending:
            future.cancel()
        concurrent.futures.wait(pending)


class _SaveMixin:
    """What both picklers (Python's C pickler, dill) do for gpuhub: references to other
    variables, skip rules, large buffers out of the stream, tensors from the GPU."""

    by_value = False  # True for dill: functions and classes of the notebook saved by value

    def _setup(self, current: str, refs: dict[int, tuple[str, ...]], data: Any) -> None:
        self._current = current
        self._refs = refs
        self._data = data
        self._reasons: dict[type, str | None] = {}
        torch = _torch()
        self._torch = torch
        self._numpy = _numpy()
        self._keras_model = _keras_model_class()
        self._is_module = torch is not None and isinstance(
            _namespace()[0].get(current), torch.nn.Module
        )
        self._storages: dict[tuple[int, int, str], _StorageRef] = {}
        self._keep: list[Any] = []  # alive until the dump ends (ids must stay unique)
        self.used_refs: set[str] = set()
        self.devices: set[str] = set()

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is _Segment:
            if obj.fill is not None:
                offset, nbytes = self._data.add_chunks(obj.nbytes, obj.fill)
            else:
                offset, nbytes = self._data.add(obj.view)
            return ("seg", offset, nbytes, obj.alloc, obj.device)
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
            if not self.by_value:
                raise _NeedsDill()
            return NotImplemented
        if t is _StorageRef:
            return self._storage(obj)
        np = self._numpy
        if np is not None and t is np.ndarray:
            return self._ndarray(obj)
        torch = self._torch
        if torch is not None and isinstance(obj, torch.Tensor):
            return self._tensor(obj)
        model = self._keras_model
        if model is not None and isinstance(obj, model):
            return self._keras(obj)
        return NotImplemented

    def _ndarray(self, a: Any) -> Any:
        if a.dtype.hasobject or a.size == 0:
            return NotImplemented
        if a.flags.c_contiguous:
            order = "C"
        elif a.flags.f_contiguous:
            order = "F"
        else:
            return NotImplemented  # a strided view: numpy copies it into the stream
        flat = a.ravel(order="K").view(self._numpy.uint8)
        self._keep.append(flat)
        return (_rebuild_ndarray, (_Segment("numpy", memoryview(flat)), a.dtype, a.shape, order))

    def _tensor(self, t: Any) -> Any:
        torch = self._torch
        device = str(t.device)
        origin = _origin.get(t, "cpu") if device == "cpu" else device
        if t.device.type == "meta":
            return NotImplemented
        if origin != "cpu":
            self.devices.add(origin)
        if isinstance(t, torch.nn.Parameter):
            if device == "cpu" and origin == "cpu":
                return NotImplemented  # torch's own reduction, whose data is a plain tensor
            return (_restore_parameter, (t.detach(), origin, bool(t.requires_grad)))
        plain = (
            type(t) is torch.Tensor
            and t.layout == torch.strided
            and not t.is_quantized
            and not t.is_nested
            and not t.is_conj()
            and not t.is_neg()
            and device.split(":")[0] in ("cpu", "cuda")
            and not getattr(t, "__dict__", None)
        )
        if not plain:
            if device == "cpu" and not (t.requires_grad and not t.is_leaf):
                return NotImplemented
            return (_restore_tensor, (t.detach().to("cpu"), origin, bool(t.requires_grad)))
        src = t.detach() if t.requires_grad and not t.is_leaf else t
        storage = src.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes(), device)
        ref = self._storages.get(key)
        if ref is None:
            ref = self._storages[key] = _StorageRef(src, storage, origin)
            self._keep.append(ref)
        args = (
            ref,
            src.dtype,
            src.storage_offset(),
            tuple(src.size()),
            tuple(src.stride()),
            bool(t.requires_grad),
            origin,
        )
        return (_rebuild_tensor, args)

    def _storage(self, ref: _StorageRef) -> Any:
        storage = ref.storage
        nbytes = storage.nbytes()
        if storage.device.type == "cpu":
            view = _memory(storage.data_ptr(), nbytes, readonly=True) if nbytes else None
            segment = _Segment("torch", view or memoryview(b""), device=ref.origin)
        else:
            segment = _Segment(
                "torch", device=ref.origin, nbytes=nbytes, fill=_device_reader(ref.tensor, storage)
            )
        return (_storage_bytes, (segment,))

    def _keras(self, model: Any) -> Any:
        with tempfile.TemporaryDirectory(prefix="gpuhub-keras-") as folder:
            path = os.path.join(folder, "model.keras")
            model.save(path)
            with open(path, "rb") as f:
                data = f.read()
        self._keep.append(data)
        return (_load_keras, (_Segment("bytes", memoryview(data)),))


def _device_reader(tensor: Any, storage: Any) -> Any:
    """`fill(start, length)` for a GPU storage: copies that part to one of two host staging
    buffers (pinned when possible) and returns a view of it, so the host never holds more than
    two chunks of the tensor."""
    import torch

    io_ = _io()
    whole = torch.empty(0, dtype=torch.uint8, device=storage.device)
    whole.set_(storage, 0, (storage.nbytes(),), (1,))
    size = min(io_.CHUNK, max(1, storage.nbytes()))
    try:
        staging = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    except RuntimeError:
        staging = [torch.empty(size, dtype=torch.uint8) for _ in range(2)]
    turn = [0]

    def fill(start: int, length: int) -> memoryview:
        host = staging[turn[0] % 2]
        turn[0] += 1
        host[:length].copy_(whole[start : start + length])
        return _memory(host.data_ptr(), length, readonly=True)

    return fill


def _picklers(dill: Any) -> tuple[type, type | None]:
    """(the C pickler class, the dill pickler class or None without dill)."""

    class Pickler(_SaveMixin, pickle.Pickler):
        def __init__(self, file: Any, current: str, refs: dict[int, Any], data: Any) -> None:
            super().__init__(file, protocol=5)
            self._setup(current, refs, data)

    if dill is None:
        return Pickler, None

    class DillPickler(_SaveMixin, dill.Pickler):
        by_value = True

        def __init__(self, file: Any, current: str, refs: dict[int, Any], data: Any) -> None:
            super().__init__(file, protocol=5)
            self._setup(current, refs, data)

    return Pickler, DillPickler


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
            for file in (v.file, v.data_file):
                if file:
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(vars_dir, os.path.basename(file)))
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
    for name in ("dill", "torch", "numpy", "pandas", "keras", "tensorflow", "IPython"):
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


def _previous(core: Any, keydir: str) -> tuple[str, dict[str, Any]] | None:
    """The latest complete snapshot of the key and its format-2 variables by name, for reuse."""
    try:
        name = core.latest(os.listdir(keydir))
        if name is None:
            return None
        with open(os.path.join(keydir, name, core.MANIFEST)) as f:
            manifest = core.manifest_from_json(f.read())
    except (OSError, ValueError):
        return None
    if manifest.format < 2:
        return None
    return name, {v.name: v for v in manifest.saved if v.kind == "pickle" and v.checksum}


def snapshot(root: str | None = None, key: str | None = None) -> dict[str, Any]:
    """Save the user namespace into `<root>/<key>/<time>/`; returns the manifest as a dict
    with `path`. The folder appears only when the snapshot is complete."""
    core = _core()
    try:
        import dill
    except ImportError:
        dill = None

    root = root or CONFIG["root"]
    key = key or CONFIG["key"] or core.snapshot_key(CONFIG["notebook"], CONFIG["kernel_id"])
    started = time.time()
    name = core.timestamp_name(started)
    keydir = os.path.join(root, key)
    os.makedirs(keydir, exist_ok=True)
    _cleanup(keydir, CONFIG["keep"])
    tmp = tempfile.mkdtemp(prefix=core.temp_prefix(name, os.getpid()), dir=keydir)
    try:
        manifest = _write(core, dill, tmp, key, name, started, _previous(core, keydir))
        final = os.path.join(keydir, name)
        os.rename(tmp, final)
        _fsync_dir(keydir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _cleanup(keydir, CONFIG["keep"])
    return {**manifest.to_dict(), "path": final}


def _write(
    core: Any,
    dill: Any,
    tmp: str,
    key: str,
    name: str,
    started: float,
    previous: tuple[str, dict[str, Any]] | None = None,
) -> Any:
    ns, hidden = _namespace()
    candidates = [
        (n, v)
        for n, v in list(ns.items())
        if not core.is_ipython_name(n) and not (n in hidden and hidden[n] is v)
    ]
    vars_dir = os.path.join(tmp, core.VARS_DIR)
    os.mkdir(vars_dir)
    refs = _reference_map(candidates)
    picklers = _picklers(dill)
    limit = CONFIG["limit"] or None
    saved: list[Any] = []
    skipped: list[Any] = []
    written: list[str] = []
    used = 0
    workers = _io().pool()
    try:
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
            old = previous[1].get(n) if previous else None
            try:
                entry = None
                if old is not None and old.type == type_name:
                    entry = _reuse(
                        core, picklers, tmp, previous[0], old, i, n, value, refs, workers
                    )
                if entry is None:
                    entry = _save_one(core, picklers, vars_dir, i, n, value, refs, left, workers)
                    written += [os.path.join(tmp, f) for f in (entry.file, entry.data_file) if f]
            except _io().TooBig:
                why = f"too large: more than the {core.human_bytes(left or 0)} left under the limit"
                skipped.append(core.SkippedVariable(n, type_name, why, estimate))
                continue
            except _Unsaveable as e:
                skipped.append(core.SkippedVariable(n, type_name, f"contains {e}"))
                continue
            except Exception as e:
                skipped.append(core.SkippedVariable(n, type_name, f"cannot be saved: {_short(e)}"))
                continue
            used += entry.bytes
            saved.append(entry)
    finally:
        workers.shutdown(wait=True)
    saved, skipped = _drop_dangling(core, saved, skipped, vars_dir)
    _io().fsync_files([p for p in written if os.path.exists(p)])
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


def _dump(pickler_class: type, out: Any, name: str, value: Any, refs: Any, data: Any) -> Any:
    pickler = pickler_class(out, name, refs, data)
    pickler.dump(value)
    return pickler


def _save_one(
    core: Any,
    picklers: tuple[type, type | None],
    vars_dir: str,
    index: int,
    name: str,
    value: Any,
    refs: dict[int, Any],
    left: int | None,
    workers: Any,
) -> Any:
    """Write one variable: with Python's C pickler, or with dill when the value holds code of
    the notebook (or anything else only dill can save)."""
    io_ = _io()
    c_pickler, dill_pickler = picklers
    stream = f"{index:05d}.pkl"
    data_name = f"{index:05d}.bin"
    for kind, pickler_class in (("pickle", c_pickler), ("dill", dill_pickler)):
        if pickler_class is None:
            raise RuntimeError("it needs dill, which is not installed in this kernel's environment")
        budget = io_.Budget(left)
        algorithm = io_.algorithm()
        data = io_.SegmentWriter(os.path.join(vars_dir, data_name), budget, workers, algorithm)
        path = os.path.join(vars_dir, stream)
        try:
            with open(path, "wb", buffering=1024 * 1024) as f:
                out = io_.ChecksumFile(f, budget, algorithm)
                pickler = _dump(pickler_class, out, name, value, refs, data)
            data_written = data.close()
        except (_Unsaveable, io_.TooBig):
            data.abort()
            _unlink(path)
            raise
        except BaseException as e:
            data.abort()
            _unlink(path)
            if kind == "pickle" and not isinstance(e, (KeyboardInterrupt, SystemExit)):
                continue  # dill next
            raise
        data_bytes, digests = data_written or (0, "")
        return core.SavedVariable(
            name,
            _type_name(value),
            "pickle",
            bytes=out.written + data_bytes,
            file=f"{core.VARS_DIR}/{stream}",
            refs=tuple(sorted(pickler.used_refs)),
            devices=tuple(sorted(pickler.devices)),
            pickler=kind,
            file_bytes=out.written,
            checksum=out.hexdigest(),
            data_file=f"{core.VARS_DIR}/{data_name}" if data_written else None,
            data_bytes=data_bytes,
            data_digests=digests,
            hash_algorithm=algorithm,
        )
    raise AssertionError("unreachable")


def _reuse(
    core: Any,
    picklers: tuple[type, type | None],
    tmp: str,
    previous: str,
    old: Any,
    index: int,
    name: str,
    value: Any,
    refs: dict[int, Any],
    workers: Any,
) -> Any:
    """The previous snapshot's files for `name` linked into this one, under this snapshot's own
    names for variable `index` (never a name another variable of this snapshot writes to), when
    the variable is the same as then (same pickle stream, same bytes in every buffer, compared by
    checksum chunk by chunk without writing anything); None when it changed or cannot be
    compared (among others: its files were checked with another algorithm than this kernel
    writes, so it is written once again with this one). A file written later is always a new
    file (`open` truncates a name, and no name here is a link to an earlier snapshot's file but
    these), so the earlier snapshot's files are never written to."""
    io_ = _io()
    pickler_class = picklers[0] if old.pickler == "pickle" else picklers[1]
    if pickler_class is None or old.bytes < REUSE_MIN_BYTES:
        return None
    algorithm = io_.algorithm()
    if old.hash_algorithm != algorithm:
        return None
    keydir = os.path.dirname(tmp)
    sources = [os.path.join(keydir, previous, f) for f in (old.file, old.data_file) if f]
    try:
        sizes = [os.path.getsize(p) for p in sources]
    except OSError:
        return None
    if sizes != [old.file_bytes] + ([old.data_bytes] if old.data_file else []):
        return None
    expected = io_.split_digests(old.data_digests, algorithm)
    dry = _DrySegments(expected, workers, algorithm)
    out = io_.ChecksumFile(None, None, algorithm)
    try:
        try:
            pickler = _dump(pickler_class, out, name, value, refs, dry)
        except BaseException:
            dry.abort()
            raise
        dry.finish()  # while the pickler, which keeps the buffers alive, still exists
    except _Unsaveable:
        raise
    except Exception:  # changed, or not comparable this way: written in full
        return None
    if (
        out.hexdigest() != old.checksum
        or out.written != old.file_bytes
        or dry.digests != expected
        or dry.offset != old.data_bytes
    ):
        return None
    stream = f"{core.VARS_DIR}/{index:05d}.pkl"
    data = f"{core.VARS_DIR}/{index:05d}.bin" if old.data_file else None
    targets = [os.path.join(tmp, f) for f in (stream, data) if f]
    for source, target in zip(sources, targets, strict=True):
        try:
            os.link(source, target)
        except OSError:  # a file system without hard links: a copy
            shutil.copyfile(source, target)
    return core.SavedVariable(
        **{
            **{f: getattr(old, f) for f in old.__dataclass_fields__},
            "file": stream,
            "data_file": data,
            "refs": tuple(sorted(pickler.used_refs)),
            "devices": tuple(sorted(pickler.devices)),
            "reused": old.reused or previous,
        }
    )


#: variables smaller than this are written again rather than compared with the previous copy
REUSE_MIN_BYTES = 1024 * 1024


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


# -- restoring ---------------------------------------------------------------------------------


class _LoadMixin:
    def _setup(self, ns: dict[str, Any], restored: set[str], data: Any) -> None:
        self._ns = ns
        self._restored = restored
        self._data = data

    def persistent_load(self, pid: Any) -> Any:
        if pid and pid[0] == "seg":
            return _read_segment(self._data, *pid[1:])
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


def _read_segment(reader: Any, offset: int, nbytes: int, alloc: str, device: str) -> Any:
    """Allocate the memory a buffer goes back into, and read it there."""
    if alloc == "numpy":
        import numpy as np

        buf = np.empty(nbytes, dtype=np.uint8)
        if nbytes:
            reader.read_into(offset, memoryview(buf))
        return buf
    if alloc == "torch":
        import torch

        target = _target_device(device)
        if target == "cpu":
            buf = torch.empty(nbytes, dtype=torch.uint8)
            if nbytes:
                reader.read_into(offset, _memory(buf.data_ptr(), nbytes))
            return buf
        buf = torch.empty(nbytes, dtype=torch.uint8, device=target)
        if nbytes:
            io_ = _io()
            size = min(io_.CHUNK, nbytes)
            try:
                host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            except RuntimeError:
                host = torch.empty(size, dtype=torch.uint8)

            def staging(length: int) -> memoryview:
                return _memory(host.data_ptr(), length)

            def deliver(start: int, _view: memoryview) -> None:
                length = _view.nbytes
                buf[start : start + length].copy_(host[:length])

            reader.read_chunks(offset, nbytes, staging, deliver)
        return buf
    if alloc == "bytes":
        buf = bytearray(nbytes)
        if nbytes:
            reader.read_into(offset, memoryview(buf))
        return bytes(buf)
    raise LookupError(f"unknown buffer kind {alloc!r}")


def _unpicklers(dill: Any) -> dict[str, type]:
    class Unpickler(_LoadMixin, pickle.Unpickler):
        def __init__(self, file: Any, ns: dict[str, Any], restored: set[str], data: Any) -> None:
            super().__init__(file)
            self._setup(ns, restored, data)

    out: dict[str, type] = {"pickle": Unpickler}
    if dill is not None:

        class DillUnpickler(_LoadMixin, dill.Unpickler):
            def __init__(
                self, file: Any, ns: dict[str, Any], restored: set[str], data: Any
            ) -> None:
                super().__init__(file)
                self._setup(ns, restored, data)

        out["dill"] = DillUnpickler
    return out


def _load_one(
    folder: str, v: Any, fmt: int, unpicklers: dict[str, type], ns: Any, done: set, workers: Any
) -> Any:
    io_ = _io()
    unpickler_class = unpicklers.get(v.pickler)
    if unpickler_class is None:
        raise RuntimeError(f"{v.pickler} is not installed in this kernel's environment")
    if fmt < 2:
        with open(os.path.join(folder, v.file), "rb") as f:
            return unpickler_class(io.BufferedReader(f), ns, done, None).load()
    stream = io_.read_checked(
        os.path.join(folder, v.file), v.file_bytes, v.checksum or "", v.hash_algorithm
    )
    reader = None
    if v.data_file:
        reader = io_.SegmentReader(
            os.path.join(folder, v.data_file),
            v.data_bytes,
            v.data_digests,
            workers,
            v.hash_algorithm,
        )
        reader.open()
    try:
        value = unpickler_class(io.BytesIO(stream), ns, done, reader).load()
        if reader is not None:
            reader.finish()
    finally:
        if reader is not None:
            reader.close()
    return value


def snapshots(root: str | None = None, key: str | None = None) -> list[str]:
    core = _core()
    root = root or CONFIG["root"]
    key = key or CONFIG["key"]
    try:
        return core.complete_snapshots(os.listdir(os.path.join(root, key)))
    except OSError:
        return []


def restore(name: str | None = None, root: str | None = None, key: str | None = None) -> Any:
    """Restore snapshot `name` (default: the latest) into the user namespace; a RestoreReport.
    A variable whose files are damaged or missing is reported and left out; the others come
    back."""
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
        dill = None
    if dill is None and manifest.format < 2:
        return core.RestoreReport(
            key, name, error="dill is not installed in this kernel's environment"
        )
    ns, _hidden = _namespace()
    unpicklers = _unpicklers(dill)
    restored: list[str] = []
    done: set[str] = set()
    failed: list[tuple[str, str]] = []
    _restoring["moved"] = set()
    workers = _io().pool()
    try:
        for v in core.restore_order(manifest.saved):
            _restoring["current"] = v.name
            try:
                if v.kind == "module":
                    value = importlib.import_module(v.module)
                else:
                    missing = [r for r in v.refs if r not in done]
                    if missing:
                        raise LookupError(f"it refers to `{missing[0]}`, which was not restored")
                    value = _load_one(folder, v, manifest.format, unpicklers, ns, done, workers)
            except _io().Corrupt as e:
                failed.append((v.name, f"damaged snapshot file: {e}"))
                continue
            except _io().Unverifiable as e:
                failed.append((v.name, f"not checked: {e}"))
                continue
            except Exception as e:
                reason = str(e) if isinstance(e, LookupError) and str(e).startswith("it ") else None
                failed.append((v.name, reason or _short(e)))
                continue
            finally:
                _restoring["current"] = None
            ns[v.name] = value
            restored.append(v.name)
            done.add(v.name)
    finally:
        workers.shutdown(wait=True)
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
