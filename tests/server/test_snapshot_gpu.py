"""CUDA tensors in snapshots, on a machine with an NVIDIA GPU (deselected elsewhere, see
conftest.py): saved through two chunk-sized host buffers (the host never holds a second copy of
the tensor), restored to the GPU when the kernel has one and to the CPU when it has none.

The kernel-side module runs in the `pytorch` environment's interpreter, as in a kernel."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTORCH_PYTHON = REPO / ".envs" / "pytorch" / "bin" / "python"
pytestmark = pytest.mark.gpu

SAVE = r"""
import json, os, sys
sys.path.insert(0, os.environ["REPO"])
from gpuhub.server import kernel_side as ks
import torch

def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024

ks.CONFIG.update(root=os.environ["ROOT"], key="gpu")
torch.manual_seed(0)
big = torch.randn(64 * 1024 * 1024, device="cuda")  # 256 MiB on the GPU
model = torch.nn.Linear(512, 256).cuda()
optimizer = torch.optim.Adam(model.parameters())
model(torch.ones(8, 512, device="cuda")).sum().backward()
optimizer.step()
torch.cuda.synchronize()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before, _ = rss()
result = ks.snapshot()
_, peak = rss()
print(json.dumps({
    "extra_host_peak": peak - before,
    "big_bytes": big.numel() * 4,
    "devices": {v["name"]: v["devices"] for v in result["saved"]},
    "big_sum": float(big.double().sum()),
    "weight_sum": float(model.weight.double().sum()),
}))
"""

RESTORE = r"""
import json, os, sys
sys.path.insert(0, os.environ["REPO"])
from gpuhub.server import kernel_side as ks
import torch
ks.CONFIG.update(root=os.environ["ROOT"], key="gpu")
report = ks.restore()
print(json.dumps({
    "failed": list(report.failed),
    "moved": list(report.moved),
    "big_device": str(big.device),
    "model_device": str(model.weight.device),
    "big_sum": float(big.double().sum()),
    "weight_sum": float(model.weight.double().sum()),
    "optimizer_holds_model": optimizer.param_groups[0]["params"][0] is model.weight,
    "moment_device": str(optimizer.state[model.weight]["exp_avg"].device),
}))
"""


def _run(code: str, root: Path, **env: str) -> dict:
    out = subprocess.run(
        [str(PYTORCH_PYTHON), "-c", code],
        env={**os.environ, "REPO": str(REPO), "ROOT": str(root), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cuda_tensors_are_saved_in_chunks_and_come_back_on_the_gpu_or_the_cpu(tmp_path):
    saved = _run(SAVE, tmp_path)
    assert saved["devices"]["big"] == ["cuda:0"] and saved["devices"]["model"] == ["cuda:0"]
    # two 16 MiB staging buffers, not the tensor's 256 MiB
    assert saved["extra_host_peak"] < 64 * 1024 * 1024, saved

    on_gpu = _run(RESTORE, tmp_path)
    assert on_gpu["failed"] == [] and on_gpu["moved"] == []
    assert on_gpu["big_device"] == "cuda:0" and on_gpu["model_device"] == "cuda:0"
    assert on_gpu["moment_device"] == "cuda:0" and on_gpu["optimizer_holds_model"]
    assert on_gpu["big_sum"] == saved["big_sum"] and on_gpu["weight_sum"] == saved["weight_sum"]

    on_cpu = _run(RESTORE, tmp_path, CUDA_VISIBLE_DEVICES="")
    assert on_cpu["failed"] == []
    assert {"big", "model", "optimizer"} <= set(on_cpu["moved"])
    assert on_cpu["big_device"] == "cpu" and on_cpu["model_device"] == "cpu"
    assert on_cpu["big_sum"] == saved["big_sum"] and on_cpu["optimizer_holds_model"]
