"""The pure snapshot model: keys, names, which snapshot is the latest good one, what is skipped
and why, size accounting, manifests, restore order, the user-facing summary."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from gpuhub.core import snapshot as core


def test_keys_are_readable_unique_and_safe():
    a = core.snapshot_key("work/My Notebook.ipynb", "k1")
    b = core.snapshot_key("work/My_Notebook.ipynb", "k1")
    assert a.startswith("work_My_Notebook.ipynb-")
    assert a != b  # same readable part, different notebooks
    assert core.snapshot_key("/work/My Notebook.ipynb", "k2") == a  # the kernel does not matter
    assert core.snapshot_key(None, "1234-abcd") == "kernel-1234-abcd"
    for key in (a, b, core.snapshot_key("../../etc/passwd", None)):
        assert "/" not in key and not key.startswith(".")
    with pytest.raises(ValueError, match="notebook path or a kernel id"):
        core.snapshot_key(None, None)


def test_names_sort_by_time_and_temporaries_are_never_latest():
    t = 1_800_000_000.25
    names = [core.timestamp_name(t + d) for d in (0, 1.5, 0.000001, 3600)]
    assert all(core.is_snapshot_name(n) for n in names)
    assert sorted(names) == [names[0], names[2], names[1], names[3]]
    assert core.timestamp_name(1_800_000_000.9999999).endswith(".000000Z")  # rounds up a second
    tmp = core.temp_prefix(core.timestamp_name(t + 7200), 4321) + "x1y2"
    assert core.latest([*names, tmp, "restored.json"]) == names[3]
    assert core.latest([tmp]) is None
    assert core.temp_pid(tmp) == 4321
    assert core.temp_pid(names[0]) is None


def test_pruning_keeps_the_newest():
    names = [core.timestamp_name(1_800_000_000 + i) for i in range(5)]
    assert core.to_prune(names, 3) == names[:2]
    assert core.to_prune(names, 0) == names[:4]  # never the newest one
    assert core.to_prune(names[:2], 3) == []
    assert core.to_prune(names, 3, protect=[names[0]]) == [names[1]]  # chosen to restore next


def test_stale_temporaries():
    name = core.timestamp_name(1_800_000_000)
    live = core.temp_prefix(name, 100) + "a"
    dead = core.temp_prefix(name, 200) + "b"
    old = core.temp_prefix(name, 100) + "c"
    now = 1_800_010_000
    mtimes = {live: now - 10, dead: now - 10, old: now - 7 * 3600}
    stale = core.stale_temporaries([live, dead, old, name], now, mtimes, alive={100})
    assert stale == sorted([dead, old])


@pytest.mark.parametrize(
    ("mro", "expected"),
    [
        (("_io.TextIOWrapper", "_io._TextIOBase", "_io._IOBase", "builtins.object"), "open file"),
        (("builtins.generator", "builtins.object"), "generator"),
        (("__main__.Worker", "threading.Thread", "builtins.object"), "thread"),
        (("socket.socket", "_socket.socket", "builtins.object"), "socket"),
        (("torch.cuda.streams.Stream", "torch._C._CudaStreamBase"), "CUDA stream"),
        (("numpy.ndarray", "builtins.object"), None),
        (("builtins.dict", "builtins.object"), None),
    ],
)
def test_skip_reasons(mro, expected):
    reason = core.skip_reason(mro)
    if expected is None:
        assert reason is None
    else:
        assert expected in reason


def test_type_names_follow_the_mro():
    class Mine(dict):
        pass

    names = core.type_names(Mine)
    assert names[0].endswith(".Mine") and names[1:] == ("builtins.dict", "builtins.object")


def test_ipython_names():
    for name in ("In", "Out", "_", "__", "_i", "_ii", "_i12", "_7", "get_ipython", "exit"):
        assert core.is_ipython_name(name), name
    for name in ("x", "_private", "__version", "i1", "model"):
        assert not core.is_ipython_name(name), name


def test_size_accounting():
    gib = 1024**3
    assert core.remaining(None, 0, None, 0) is None
    assert core.remaining(10 * gib, 4 * gib, None, 0) == 6 * gib
    assert core.remaining(10 * gib, 4 * gib, 3 * gib, gib) == 2 * gib  # the disk is tighter
    assert core.remaining(0, 0, 5 * gib, gib) == 4 * gib  # 0: no limit, reserve still applies
    assert core.remaining(gib, 2 * gib, None, 0) == 0
    assert core.over_budget(None, gib) is None  # unknown size: try, the writer stops at the limit
    assert core.over_budget(2 * gib, None) is None
    assert core.over_budget(gib, gib) is None
    reason = core.over_budget(3 * gib, gib)
    assert reason == "too large: about 3.0 GiB, 1.0 GiB left under the limit"
    assert core.human_bytes(512) == "512 B"


def manifest() -> core.Manifest:
    return core.Manifest(
        key="nb-123",
        name=core.timestamp_name(1_800_000_000),
        created=1_800_000_000.0,
        kernel_id="k1",
        notebook="nb.ipynb",
        python="3.11.7",
        packages={"dill": "0.4.1"},
        saved=(
            core.SavedVariable("np", "builtins.module", "module", module="numpy"),
            core.SavedVariable(
                "model", "__main__.Net", "pickle", 100, "vars/00001.pkl", refs=("Net",)
            ),
            core.SavedVariable("Net", "builtins.type", "pickle", 50, "vars/00002.pkl"),
            core.SavedVariable(
                "opt", "torch.optim.adam.Adam", "pickle", 70, "vars/00003.pkl", refs=("model",)
            ),
        ),
        skipped=(core.SkippedVariable("fh", "_io.TextIOWrapper", "an open file"),),
        limit_bytes=1000,
    )


def test_manifest_round_trip():
    m = manifest()
    data = json.loads(m.to_json())
    assert data["total_bytes"] == 220
    assert data["created_iso"] == "2027-01-15T08:00:00.000Z"
    assert core.manifest_from_json(m.to_json()) == m


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"format": 99}, "manifest.format"),
        ({"key": None}, "manifest.key"),
        ({"saved": [{"name": "x"}]}, "manifest.saved"),
    ],
)
def test_malformed_manifests_name_the_field(change, field):
    data = {**json.loads(manifest().to_json()), **change}
    data.pop("total_bytes")
    data.pop("created_iso")
    with pytest.raises(ValueError, match=field):
        core.manifest_from_dict(data)
    with pytest.raises(ValueError, match="not JSON"):
        core.manifest_from_json("{")


def test_restore_order_puts_references_first():
    order = [v.name for v in core.restore_order(manifest().saved)]
    assert order == ["np", "Net", "model", "opt"]
    a = core.SavedVariable("a", "builtins.list", "pickle", refs=("b",))
    b = core.SavedVariable("b", "builtins.list", "pickle", refs=("a",))
    assert [v.name for v in core.restore_order([a, b])] == ["b", "a"]  # a cycle: still both


def test_summary_tells_what_came_back():
    report = core.RestoreReport(
        key="nb",
        snapshot=core.timestamp_name(1_800_000_000),
        restored=("np", "model"),
        failed=(("opt", "ModuleNotFoundError: No module named 'torch'"),),
        skipped_at_snapshot=(("fh", "an open file"),),
        moved=("model",),
    )
    text = core.summary(report)
    assert text.splitlines()[0] == (
        "gpuhub: restored 2 variable(s) from the snapshot of 2027-01-15 08:00:00 UTC: np, model"
    )
    assert "not restored: opt (ModuleNotFoundError" in text
    assert "not in the snapshot: fh (an open file)" in text
    assert "on the CPU now (no GPU here): model" in text
    assert core.summary(core.RestoreReport("nb", None)) == "gpuhub: no snapshot to restore"
    assert report.to_dict()["failed"] == [{"name": "opt", "reason": report.failed[0][1]}]


def test_the_core_module_needs_only_the_standard_library():
    """Its source runs inside kernels that do not have gpuhub (or anything else) installed."""
    tree = ast.parse(Path(core.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            imported.add((node.module or "").split(".")[0])
    import sys

    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
