"""The kernel-side snapshot code in the `pytorch` environment's interpreter, as in a kernel
(without a server): what each kind of object comes back as, which pickler wrote it, and how much
memory a snapshot and a restore take beyond the objects themselves."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTORCH_PYTHON = REPO / ".envs" / "pytorch" / "bin" / "python"

ROUND_TRIP = r"""
import copy, json, os, sys
sys.path.insert(0, os.environ["REPO"])
from gpuhub.server import kernel_side as ks
import numpy as np, pandas as pd, torch

ks.CONFIG.update(root=os.environ["ROOT"], key="kinds")
rng = np.random.default_rng(0)
arr = rng.random((1000, 300))
fortran = np.asfortranarray(rng.random((200, 30)))
strided = arr[::3, ::2]
when = np.arange("2020-01-01", "2020-03-01", dtype="datetime64[h]")
records = np.zeros(100, dtype=[("a", "i4"), ("b", "f8")])
tensor = torch.randn(500, 400)
window = tensor[10:20, 5:]  # a view: its storage offset and strides come back
brain = torch.randn(1000, dtype=torch.bfloat16)
grad = torch.randn(100, requires_grad=True)
model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 1))
optimizer = torch.optim.Adam(model.parameters())
model(torch.ones(3, 20)).sum().backward()
optimizer.step()
state = {k: v.clone() for k, v in model.state_dict().items()}
many = {f"t{i}": torch.randn(64) for i in range(1000)}
shared = {"a": tensor, "b": tensor}  # one tensor twice: still one after the restore
frame = pd.DataFrame({"n": np.arange(50_000), "x": rng.random(50_000), "s": ["k"] * 50_000,
                      "t": pd.date_range("2021", periods=50_000, freq="min")})
def double(v):
    return 2 * v
names = ["arr", "fortran", "strided", "when", "records", "tensor", "window", "brain", "grad",
         "state", "many", "frame"]
keep = {n: copy.deepcopy(globals()[n]) for n in names}
result = ks.snapshot()
picklers = {v["name"]: v["pickler"] for v in result["saved"]}
data = {v["name"]: v["data_bytes"] for v in result["saved"]}
for n in names + ["model", "optimizer", "double", "shared"]:
    del globals()[n]
report = ks.restore()

def same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, pd.DataFrame):
        return a.equals(b) and list(a.dtypes) == list(b.dtypes)
    return a.dtype == b.dtype and np.array_equal(a, b)

print(json.dumps({
    "failed": list(report.failed),
    "equal": {n: bool(same(globals()[n], keep[n])) for n in names},
    "picklers": picklers,
    "data_bytes": data,
    "fortran_order": bool(fortran.flags.f_contiguous),
    "window_is_a_view": window.storage_offset() > 0 and window.stride() == (400, 1),
    "grad_requires_grad": grad.requires_grad,
    "optimizer_steps_model": optimizer.param_groups[0]["params"][0] is model[0].weight,
    "shared_is_one": shared["a"] is shared["b"],
    "double": double(21),
    "writable": bool(arr.flags.writeable),
}))
"""

MEMORY = r"""
import gc, json, os, sys
sys.path.insert(0, os.environ["REPO"])
from gpuhub.server import kernel_side as ks
import numpy as np, torch

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}

def mark():
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status()["VmRSS"]

ks.CONFIG.update(root=os.environ["ROOT"], key="memory")
size = 256 * 1024 * 1024


def measure():  # results in locals: a restore replaces the globals it saved
    out = {"size": size}
    for kind in ("numpy", "torch"):
        rng = np.random.default_rng(0)
        globals()["data"] = rng.random(size // 8) if kind == "numpy" else torch.from_numpy(
            rng.random(size // 4, dtype=np.float32))
        before = mark()
        ks.snapshot()
        out[kind + "_snapshot"] = status()["VmHWM"] - before
        del globals()["data"]
        before = mark()
        report = ks.restore()
        assert not report.failed, report.failed
        out[kind + "_restore"] = status()["VmHWM"] - before - size  # less the restored object
        del globals()["data"]
    return out


out = measure()
print(json.dumps(out))
"""


def _run(code: str, root: Path) -> dict:
    out = subprocess.run(
        [str(PYTORCH_PYTHON), "-c", code],
        env={**os.environ, "REPO": str(REPO), "ROOT": str(root)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_kind_comes_back_equal_and_large_buffers_skip_the_pickle_stream(tmp_path):
    got = _run(ROUND_TRIP, tmp_path)
    assert got["failed"] == []
    assert got["equal"] == dict.fromkeys(got["equal"], True)
    assert got["fortran_order"] and got["window_is_a_view"] and got["grad_requires_grad"]
    assert got["optimizer_steps_model"] and got["shared_is_one"] and got["writable"]
    assert got["double"] == 42
    # Python's C pickler for data, dill only for code of the notebook
    assert got["picklers"]["double"] == "dill"
    for name in ("arr", "tensor", "state", "many", "frame", "model", "optimizer"):
        assert got["picklers"][name] == "pickle", name
    # the buffers went to the data file: all of the array, the tensor's whole storage
    assert got["data_bytes"]["arr"] == 1000 * 300 * 8
    assert got["data_bytes"]["window"] == 500 * 400 * 4
    assert got["data_bytes"]["many"] == 1000 * 64 * 4
    assert got["data_bytes"]["strided"] == 0  # not contiguous: numpy's own pickling


def test_snapshot_and_restore_take_little_memory_beyond_the_objects(tmp_path):
    got = _run(MEMORY, tmp_path)
    allowed = got["size"] // 10 + 64 * 1024 * 1024
    for key in ("numpy_snapshot", "numpy_restore", "torch_snapshot", "torch_restore"):
        assert got[key] <= allowed, (key, got[key] / 1e6)


REUSE = r"""
import json, os, sys
sys.path.insert(0, os.environ["REPO"])
from gpuhub.server import kernel_side as ks
import numpy as np

ks.CONFIG.update(root=os.environ["ROOT"], key="reuse")
x = list(range(10))
big = np.arange(1_000_000, dtype=np.float64)  # 8 MB
first = ks.snapshot()
del x  # `big` moves to the first place, and a new variable takes the second
y = np.ones(500_000)
second = ks.snapshot()
report_first = ks.restore(first["name"])
report_second = ks.restore(second["name"])
entry = {v["name"]: v for v in second["saved"]}
print(json.dumps({
    "reused": entry["big"]["reused"] == first["name"],
    "failed": [list(report_first.failed), list(report_second.failed)],
    "big": float(big.sum()),
    "y": float(y.sum()),
}))
"""


def test_a_reused_file_is_never_written_over_by_another_variable(tmp_path):
    got = _run(REUSE, tmp_path)
    assert got["reused"]
    assert got["failed"] == [[], []]  # both snapshots' files still match their checksums
    assert got["big"] == sum(range(1_000_000)) and got["y"] == 500_000


FORMAT_1 = r"""
import json, os, sys
sys.path.insert(0, os.environ["REPO"])
from gpuhub.server import kernel_side as ks
import dill, numpy as np

ks.CONFIG.update(root=os.environ["ROOT"], key="old")
name = "20260101T000000.000000Z"
folder = os.path.join(os.environ["ROOT"], "old", name)
os.makedirs(os.path.join(folder, "vars"))
with open(os.path.join(folder, "vars", "00000.pkl"), "wb") as f:
    dill.dump({"a": np.arange(5)}, f)
manifest = {"format": 1, "key": "old", "name": name, "created": 1767225600.0,
            "saved": [{"name": "old", "type": "builtins.dict", "kind": "pickle", "bytes": 1,
                       "file": "vars/00000.pkl", "module": None, "refs": [], "devices": []}],
            "skipped": []}
with open(os.path.join(folder, "manifest.json"), "w") as f:
    json.dump(manifest, f)
report = ks.restore()
print(json.dumps({"restored": list(report.restored), "failed": list(report.failed),
                  "value": old["a"].tolist()}))
"""


def test_a_snapshot_of_the_first_format_is_still_restored(tmp_path):
    got = _run(FORMAT_1, tmp_path)
    assert got == {"restored": ["old"], "failed": [], "value": [0, 1, 2, 3, 4]}
