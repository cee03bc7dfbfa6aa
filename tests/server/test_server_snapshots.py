"""Kernel snapshots with a real jupyter server and real ipykernel kernels of the `pytorch`
environment: what survives snapshot -> server stop -> start -> restore, what is skipped and why,
an interrupted snapshot, the size limit, busy kernels, and restoring on demand."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from gpuhub.core import snapshot as core

pytestmark = pytest.mark.slow

SETUP = r"""
import threading, time
import numpy as np
import pandas as pd
import torch

torch.manual_seed(0)
arr = np.arange(24, dtype=np.float64).reshape(4, 6) / 7
frame = pd.DataFrame({"city": ["Oslo", "Lima", "Pune"], "temp": [3.5, 19.0, 31.2]})
frame = frame.set_index("city")
tensor = torch.randn(5, 3)

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
        )
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x):
        self.calls += 1
        return self.body(x)

model = Net()
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
for _ in range(3):
    optimizer.zero_grad()
    model(torch.ones(4, 6)).pow(2).sum().backward()
    optimizer.step()

def scale(x, factor=2):
    return x * factor + arr.sum()

class Counter:
    def __init__(self, start):
        self.n = start
    def bump(self):
        self.n += 1
        return self.n

counter = Counter(41)
counter.bump()
handle = open("notes.txt", "w")
numbers = (i * i for i in range(10))
worker = threading.Thread(target=time.sleep, args=(0.1,))
"""

# Everything the test compares, as JSON. One more optimizer step on a deep copy shows that the
# optimizer's state (Adam's moments) came back and still drives the model's own parameters.
FINGERPRINT = r"""
import copy, json
def _fingerprint():
    m2, o2 = copy.deepcopy((model, optimizer))
    o2.zero_grad()
    m2(torch.full((4, 6), 0.5)).pow(2).sum().backward()
    o2.step()
    moments = [
        [float(optimizer.state[p]["step"]), optimizer.state[p]["exp_avg"].tolist()]
        for p in model.parameters()
    ]
    return json.dumps({
        "arr": arr.tolist(),
        "frame": frame.reset_index().to_dict("list"),
        "frame_index": frame.index.name,
        "tensor": tensor.tolist(),
        "model": {k: v.tolist() for k, v in model.state_dict().items()},
        "moments": moments,
        "after_one_more_step": {k: v.tolist() for k, v in m2.state_dict().items()},
        "optimizer_holds_model_params": all(
            p is q for p, q in zip(optimizer.param_groups[0]["params"], model.parameters())
        ),
        "model_is_a_Net": isinstance(model, Net) and type(model).__name__ == "Net",
        "scale": scale(3),
        "counter": [isinstance(counter, Counter), counter.n],
    })
print(_fingerprint())
"""


def fingerprint(server, kernel_id: str) -> dict:
    out = server.run_ok(kernel_id, FINGERPRINT)
    return json.loads(out["stdout"].strip().splitlines()[-1])


def kernel_status(server, kernel_id: str) -> dict:
    return next(k for k in server.status()["kernels"] if k["id"] == kernel_id)


def wait_restore_checked(server, kernel_id: str) -> dict:
    """The automatic restore check a kernel gets when it starts (done once it is recorded)."""
    return server.wait_for(
        lambda: kernel_status(server, kernel_id)["last_restore"], timeout=120, interval=0.5
    )


def snapshot(server, **body) -> dict:
    r = server.post("/api/gpuhub/snapshot", body)
    assert r.status_code == 200, r.text
    return r.json()


def test_state_survives_a_server_restart(jupyter_server, scenario, gpu):
    env = {"GPUHUB_FAKE_NVML": str(scenario([gpu("GPU-0")])), "GPUHUB_GPUS": "GPU-0"}
    first = jupyter_server(env=env)
    kernel = first.open_notebook("work/analysis.ipynb")
    assert wait_restore_checked(first, kernel)["status"] == "none"  # nothing saved yet
    first.run_ok(kernel, SETUP)
    # what the snapshot code emits for a tensor that was on a GPU (cuda:1): on a machine
    # without a GPU it must come back on the CPU, and the report must say so
    first.run_ok(
        kernel,
        "import sys\n"
        "class _OnGpu:\n"
        "    def __reduce__(self):\n"
        "        restore = sys.modules['_gpuhub_kernel']._restore_tensor\n"
        "        return (restore, (torch.arange(3.0), 'cuda:1', False))\n"
        "was_on_gpu = _OnGpu()\n",
    )

    result = snapshot(first)
    assert result["ok"], result
    [saved] = result["snapshots"]
    assert saved["status"] == "saved" and saved["kernel_id"] == kernel
    assert saved["notebook"] == "work/analysis.ipynb"
    assert saved["key"] == core.snapshot_key("work/analysis.ipynb", kernel)
    manifest = saved["manifest"]
    skipped = {s["name"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"handle", "numbers", "worker"}
    assert "open file" in skipped["handle"]
    assert "generator" in skipped["numbers"]
    assert "thread" in skipped["worker"]
    by_name = {v["name"]: v for v in manifest["saved"]}
    for name in ("arr", "frame", "tensor", "Net", "model", "optimizer", "scale", "Counter"):
        assert by_name[name]["kind"] == "pickle" and by_name[name]["bytes"] > 0, name
    assert by_name["np"] == {**by_name["np"], "kind": "module", "module": "numpy"}
    assert "model" in by_name["optimizer"]["refs"]  # the optimizer holds the model's parameters
    assert "Counter" in by_name["counter"]["refs"]
    assert saved["bytes"] == sum(v["bytes"] for v in manifest["saved"])
    folder = Path(saved["path"])
    assert folder.parent.parent == Path(first.home) / ".gpuhub" / "snapshots"
    assert json.loads((folder / "manifest.json").read_text())["name"] == saved["snapshot"]

    expected = fingerprint(first, kernel)
    assert expected["optimizer_holds_model_params"] and expected["model_is_a_Net"]
    first.stop()

    second = jupyter_server(env=env)
    kernel = second.open_notebook("work/analysis.ipynb")
    restore = wait_restore_checked(second, kernel)
    assert restore["status"] == "restored", restore
    assert restore["automatic"] and restore["snapshot"] == saved["snapshot"]
    assert restore["moved_to_cpu"] == ["was_on_gpu"]
    assert {s["name"] for s in restore["skipped_at_snapshot"]} == {"handle", "numbers", "worker"}
    # the user is told, in the output of the first cell they run
    notice = second.run_ok(kernel, "1 + 1")["stdout"]
    assert "gpuhub: restored" in notice and "not in the snapshot: handle (an open file" in notice
    assert "on the CPU now (no GPU here): was_on_gpu" in notice

    assert fingerprint(second, kernel) == expected
    out = second.run_ok(kernel, "print(type(was_on_gpu).__name__, was_on_gpu.device)")
    assert out["stdout"].split() == ["Tensor", "cpu"]

    # on demand: the magic, and the REST endpoint
    listed = second.run_ok(kernel, "%gpuhub_restore --list")["stdout"].split()
    assert listed == [saved["snapshot"]]
    second.run_ok(kernel, "counter.n = -1; del arr")
    out = second.run_ok(kernel, "%gpuhub_restore")["stdout"]
    assert out.startswith("gpuhub: restored")
    out = second.run_ok(kernel, "print(counter.n, arr.shape)")["stdout"]
    assert out.strip() == "42 (4, 6)"
    r = second.post("/api/gpuhub/restore", {"kernel_id": kernel})
    assert r.status_code == 200 and r.json()["ok"] and r.json()["status"] == "restored", r.text

    # a notebook without a snapshot of its own can take another notebook's
    other = second.open_notebook("scratch.ipynb")
    assert wait_restore_checked(second, other)["status"] == "none"
    r = second.post("/api/gpuhub/restore", {"kernel_id": other})
    assert r.json()["status"] == "none" and r.json()["ok"]
    r = second.post("/api/gpuhub/restore", {"kernel_id": other, "key": saved["key"]})
    assert r.json()["status"] == "restored", r.text
    assert "scale" in r.json()["restored"]
    out = second.run_ok(other, "print(scale(1))")["stdout"]
    assert out.startswith("gpuhub: restored")  # told at the next cell, as after any restore
    assert out.strip().splitlines()[-1] == str(expected["scale"] - 4)
    # saved again, a tensor remembers the GPU it came from: it goes back there once there is one
    [again] = snapshot(second, kernels=[other])["snapshots"]
    assert again["key"] == core.snapshot_key("scratch.ipynb", other)
    devices = {v["name"]: v["devices"] for v in again["manifest"]["saved"]}
    assert devices["was_on_gpu"] == ["cuda:1"] and devices["tensor"] == []
    second.stop()

    # a snapshot is restored automatically once: a third start does not bring it back again
    third = jupyter_server(env=env)
    kernel = third.open_notebook("work/analysis.ipynb")
    assert wait_restore_checked(third, kernel)["status"] == "none"
    out = third.execute(kernel, "counter")
    assert out["status"] == "error" and "NameError" in out["error"]
    listing = third.get("/api/gpuhub/snapshots").json()["snapshots"]
    assert [(s["key"], s["snapshot"]) for s in listing] == [
        (again["key"], again["snapshot"]),
        (saved["key"], saved["snapshot"]),
    ]
    assert listing[1]["notebook"] == "work/analysis.ipynb" and listing[1]["saved"] > 5


def test_an_interrupted_snapshot_leaves_the_last_good_one(jupyter_server, scenario, gpu):
    server = jupyter_server(env={"GPUHUB_FAKE_NVML": str(scenario([gpu("GPU-0")]))})
    kernel = server.open_notebook("long.ipynb")
    wait_restore_checked(server, kernel)
    server.run_ok(kernel, "x = list(range(10))")
    good = snapshot(server)["snapshots"][0]
    assert good["status"] == "saved"
    keydir = Path(good["path"]).parent

    server.run_ok(
        kernel,
        "import time\n"
        "class Slow:\n"
        "    def __reduce__(self):\n"
        "        time.sleep(120)\n"
        "        return (Slow, ())\n"
        "x = 'changed'\n"
        "slow = Slow()\n",
    )
    pid = kernel_status(server, kernel)["pid"]
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(r=snapshot(server)))
    thread.start()

    def half_written():
        temps = [p for p in keydir.iterdir() if p.name.startswith(core.TMP_PREFIX)]
        return temps and list((temps[0] / "vars").glob("*.pkl")) and temps[0]

    temp = server.wait_for(half_written, timeout=60, interval=0.1)
    os.kill(pid, signal.SIGKILL)  # the kernel dies in the middle of writing
    thread.join(120)
    assert not thread.is_alive()
    [failed] = outcome["r"]["snapshots"]
    assert not outcome["r"]["ok"] and failed["status"] == "failed"
    assert "died" in failed["error"]

    # the last good snapshot is still the latest, whole, and restorable
    assert core.latest(os.listdir(keydir)) == good["snapshot"]
    assert temp.exists()  # the half-written one never became a snapshot
    server.wait_for(lambda: kernel_status(server, kernel)["execution_state"] == "idle", 60)
    r = server.post("/api/gpuhub/restore", {"kernel_id": kernel})
    assert r.json()["status"] == "restored", r.text
    assert r.json()["snapshot"] == good["snapshot"]
    out = server.run_ok(kernel, "print(x)")["stdout"]
    assert out.strip().splitlines()[-1] == str(list(range(10)))

    # the next snapshot clears what the dead writer left
    assert snapshot(server)["ok"]
    assert not [p for p in keydir.iterdir() if p.name.startswith(core.TMP_PREFIX)]
    assert len(core.complete_snapshots(os.listdir(keydir))) == 2


def test_size_limit_busy_kernels_and_retention(jupyter_server, scenario, gpu):
    server = jupyter_server(
        env={"GPUHUB_FAKE_NVML": str(scenario([gpu("GPU-0")]))},
        args=["--GpuhubExtension.snapshot_size_limit=300000", "--GpuhubExtension.snapshots_kept=2"],
    )
    kernel = server.open_notebook("big.ipynb")
    wait_restore_checked(server, kernel)
    server.run_ok(
        kernel,
        "import numpy as np\n"
        "small = np.ones(100)\n"
        "big = np.zeros(1_000_000)\n"  # 8 MB: known to be too large before writing
        "chunks = [bytes([i]) * 1000 for i in range(250)]\n"  # 250 kB: fits
        "more = [bytes([i]) * 1000 for i in range(250)]\n"  # does not fit any more
        "holder = {'data': more}\n",  # would come back without `more`
    )
    [result] = snapshot(server)["snapshots"]
    assert result["status"] == "saved"
    skipped = {s["name"]: s for s in result["manifest"]["skipped"]}
    assert set(skipped) == {"big", "more", "holder"}
    assert skipped["holder"]["reason"] == "refers to `more`, which could not be saved"
    assert skipped["big"]["reason"].startswith("too large: about 7.6 MiB")
    assert skipped["big"]["bytes"] == 8_000_000
    assert skipped["more"]["reason"].startswith("too large: more than")
    assert {v["name"] for v in result["manifest"]["saved"]} == {"np", "small", "chunks"}
    assert result["bytes"] <= 300_000
    assert result["manifest"]["limit_bytes"] == 300_000
    files = sorted(p.name for p in (Path(result["path"]) / "vars").iterdir())
    listed = [v[f] for v in result["manifest"]["saved"] for f in ("file", "data_file") if v[f]]
    assert files == sorted(Path(f).name for f in listed)  # nothing left of what did not fit

    # from the notebook itself
    out = server.run_ok(kernel, "%gpuhub_snapshot")["stdout"]
    assert out.startswith("gpuhub: saved 3 variable(s)")
    assert "not saved: big (too large" in out

    # the snapshot chosen to come back at the next start is kept whatever its age
    chosen = result["snapshot"]
    r = server.request("PUT", f"/api/gpuhub/snapshots/{result['key']}/{chosen}/restore-next")
    assert r.status_code == 200, r.text

    # a kernel running code is not snapshotted unless the caller waits for it
    running = threading.Thread(target=server.execute, args=(kernel, "import time; time.sleep(4)"))
    running.start()
    server.wait_for(lambda: kernel_status(server, kernel)["execution_state"] == "busy", 20, 0.05)
    [busy] = snapshot(server)["snapshots"]
    assert busy["status"] == "busy"
    started = time.time()
    [waited] = snapshot(server, wait=True)["snapshots"]
    assert waited["status"] == "saved" and time.time() - started > 1
    running.join()
    assert snapshot(server)["ok"]
    keydir = Path(waited["path"]).parent
    kept = core.complete_snapshots(os.listdir(keydir))
    # the two newest, and the chosen one; the others were removed
    assert len(kept) == 3 and kept[0] == chosen and kept[-1] > waited["snapshot"], kept
