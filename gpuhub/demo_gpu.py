"""`gpuhub demo-gpu`: make a simulated GPU of a running demo busy or idle.

Edits the scenario file named by `--scenario`, else `GPUHUB_FAKE_NVML`, else the running
demo's (`simulated-gpus.json` in `GPUHUB_STATE_DIR`, else in the checkout's `.demo/`), atomically:
readers see the old file or the new one, never half of one. Every process of the demo that
reads simulated GPUs (the hub, the single-user servers' samplers) picks the change up at its
next NVML call.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import nvml_fake


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be between 0 and 100, not {text}")
    return value


def _bytes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of bytes: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpuhub demo-gpu",
        description="Make a simulated GPU of the running demo busy or idle. The scenario file is "
        f"the one named by ${nvml_fake.ENV} (the demo prints it when it starts).",
    )
    p.add_argument("--gpu", required=True, help="the GPU: its index in the scenario, or its UUID")
    p.add_argument(
        "--util", required=True, type=_percent, help="GPU utilisation in percent (0 = idle)"
    )
    p.add_argument(
        "--mem-util",
        type=_percent,
        default=None,
        help="memory-controller utilisation in percent (default: half of --util)",
    )
    p.add_argument("--memory-used", type=_bytes, default=None, help="GPU memory in use, in bytes")
    p.add_argument(
        "--scenario",
        default=None,
        help=f"scenario file to edit (default: ${nvml_fake.ENV})",
    )
    return p


def find_gpu(scenario: dict[str, Any], which: str) -> int:
    """Index of the GPU named by `which` (an index or a UUID); ValueError naming the choices."""
    gpus = scenario.get("gpus") or []
    if which.isdigit() and int(which) < len(gpus):
        return int(which)
    for i, gpu in enumerate(gpus):
        if gpu.get("uuid") == which:
            return i
    choices = ", ".join(f"{i} ({g.get('uuid')})" for i, g in enumerate(gpus)) or "none"
    raise ValueError(f"--gpu: no simulated GPU {which!r}; the scenario has: {choices}")


def apply(
    scenario: dict[str, Any],
    index: int,
    util: float,
    mem_util: float | None = None,
    memory_used: int | None = None,
) -> dict[str, Any]:
    """A copy of `scenario` where GPU `index` runs at `util` from now on.

    The GPU's timeline is dropped: a command given now overrides what was scheduled.
    """
    out = json.loads(json.dumps(scenario))
    gpu = out["gpus"][index]
    gpu["util"] = util
    gpu["mem_util"] = util / 2 if mem_util is None else mem_util
    if memory_used is not None:
        total = int(gpu.get("memory_total", 0))
        if total and memory_used > total:
            raise ValueError(f"--memory-used: {memory_used} is more than the GPU's {total} bytes")
        gpu["memory_used"] = memory_used
    gpu.pop("timeline", None)
    return out


def running_demo_scenario() -> Path | None:
    """The simulated GPUs of the demo on this machine: `simulated-gpus.json` in its state folder
    ($GPUHUB_STATE_DIR, else the checkout's `.demo/`), if the demo simulates GPUs there."""
    from . import paths

    state = os.environ.get("GPUHUB_STATE_DIR") or str(paths.config_dir().parent / ".demo")
    scenario = Path(state) / "simulated-gpus.json"
    return scenario if scenario.is_file() else None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    path_text = args.scenario or os.environ.get(nvml_fake.ENV)
    path = Path(path_text) if path_text else running_demo_scenario()
    if path is None:
        print(
            f"gpuhub demo-gpu: no simulated GPUs found: ${nvml_fake.ENV} is not set and no "
            "demo state folder ($GPUHUB_STATE_DIR, else .demo/) has simulated-gpus.json; "
            "start `gpuhub demo` first, or pass --scenario FILE",
            file=sys.stderr,
        )
        return 2
    # one writer at a time: two commands at once must not lose one of the changes
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            scenario = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"gpuhub demo-gpu: cannot read the scenario {path}: {e}", file=sys.stderr)
            return 2
        try:
            index = find_gpu(scenario, args.gpu)
            updated = apply(scenario, index, args.util, args.mem_util, args.memory_used)
        except ValueError as e:
            print(f"gpuhub demo-gpu: {e}", file=sys.stderr)
            return 2
        nvml_fake.write_scenario(path, updated)
    gpu = updated["gpus"][index]
    print(
        f"simulated GPU {index} ({gpu.get('uuid')}): util {gpu['util']:g} %, "
        f"memory util {gpu['mem_util']:g} %, memory used {gpu.get('memory_used', 0)} bytes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
