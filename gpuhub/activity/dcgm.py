"""dcgm-exporter series in a Prometheus query answer -> `GpuSample`s per server. Pure: no I/O.

What a series means:

- its metric name (`__name__`) says what it measures (`METRICS`); series of other names are
  ignored, so a query must keep the names (no aggregation that drops them);
- its pod mapping labels (`namespace`, `pod` by default) say which pod holds the device; a series
  belongs to a server only when both are exactly the server's (never a prefix or a pattern);
- its `UUID` label is the GPU. On a MIG slice dcgm-exporter puts the *parent* GPU's UUID there and
  adds `GPU_I_ID` (the GPU instance) and `GPU_I_PROFILE`: a slice is `UUID/GPU_I_ID` (the
  profile is not part of its identity, an instance id is unique on its GPU);
- its newest sample is the reading; one older than the staleness window or than the target's
  `since` (the series of an earlier pod of the same name), or that is not a finite number >= 0,
  is no reading (a percentage above 100 counts as 100).

A device's utilisation is the highest of its fresh utilisation series (`DCGM_FI_DEV_GPU_UTIL` in
percent, `DCGM_FI_PROF_GR_ENGINE_ACTIVE` as a 0..1 ratio, the only one a MIG slice has), so a GPU
is never read as less busy than any of its counters says.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from string import Template
from typing import Any

from . import GpuSample, ServerKey, ServerTarget

MIB = 1024 * 1024

#: metric name -> (what it measures, factor to percent or bytes)
METRICS: dict[str, tuple[str, float]] = {
    "DCGM_FI_DEV_GPU_UTIL": ("utilization", 1.0),  # percent
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": ("utilization", 100.0),  # ratio 0..1; MIG slices too
    "DCGM_FI_DEV_MEM_COPY_UTIL": ("memory_utilization", 1.0),  # percent
    "DCGM_FI_PROF_DRAM_ACTIVE": ("memory_utilization", 100.0),  # ratio 0..1; MIG slices too
    "DCGM_FI_DEV_FB_USED": ("memory_used", float(MIB)),  # MiB
}

DEFAULT_QUERY = (
    '{__name__=~"' + "|".join(METRICS) + '",'
    '$namespace_label=~"$namespaces",$pod_label!=""$matchers}[$window]'
)

_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # a DNS-1123 label
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class AnswerError(Exception):
    """A Prometheus answer that is not a successful vector or matrix result."""


@dataclass(frozen=True)
class Series:
    labels: Mapping[str, str]
    samples: tuple[tuple[float, Any], ...]  # (Unix seconds, the value as Prometheus sent it)


@dataclass
class Readings:
    """What an answer said about the targets, and what in it was left out and why."""

    samples: dict[ServerKey, list[GpuSample]] = field(default_factory=dict)
    matched: int = 0  # series that belong to a target
    stale: int = 0
    invalid: int = 0  # NaN, infinite, negative or unreadable values
    no_device: int = 0  # series of a target without a UUID label


def valid_namespace(name: object) -> bool:
    return isinstance(name, str) and bool(_NAMESPACE.match(name))


def build_query(
    template: str,
    namespaces: Iterable[str],
    window_s: float,
    *,
    namespace_label: str = "namespace",
    pod_label: str = "pod",
    matchers: str = "",
) -> str:
    """The PromQL for one cycle: `template` with `$namespaces` (an alternation of the targets'
    namespaces, all DNS labels, so nothing to escape), `$window` (the staleness window in
    seconds, e.g. `90s`), `$namespace_label`, `$pod_label` and `$matchers` (`,` + the extra
    matchers, or nothing)."""
    names = sorted(set(namespaces))
    for name in names:
        if not valid_namespace(name):
            raise ValueError(f"not a Kubernetes namespace name: {name!r}")
    return Template(template).substitute(
        namespaces="|".join(names),
        window=f"{max(1, math.ceil(window_s))}s",
        namespace_label=namespace_label,
        pod_label=pod_label,
        matchers=f",{matchers.strip()}" if matchers.strip() else "",
    )


def parse_answer(body: bytes) -> list[Series]:
    """The series of a `/api/v1/query` answer (`vector` or `matrix`); `AnswerError` otherwise."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise AnswerError(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise AnswerError("not a JSON object")
    if doc.get("status") != "success":
        error = doc.get("error") or doc.get("status")
        raise AnswerError(f"query failed: {str(error)[:200]}")
    data = doc.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("result"), list):
        raise AnswerError("no data.result list")
    kind = data.get("resultType")
    if kind not in ("vector", "matrix"):
        raise AnswerError(f"resultType {str(kind)[:40]!r}, not vector or matrix")
    series = []
    for item in data["result"]:
        if not isinstance(item, dict) or not isinstance(item.get("metric"), dict):
            raise AnswerError("a result without a metric object")
        labels = item["metric"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise AnswerError("a label that is not a string")
        points = [item.get("value")] if kind == "vector" else item.get("values")
        if not isinstance(points, list):
            raise AnswerError("a series without values")
        samples = []
        for point in points:
            if not (isinstance(point, list) and len(point) == 2):
                raise AnswerError("a sample that is not [time, value]")
            t = point[0]
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
                raise AnswerError("a sample time that is not a number")
            samples.append((float(t), point[1]))
        series.append(Series(labels, tuple(samples)))
    return series


def _number(value: Any) -> float | None:
    """A sample value as a finite number >= 0; None for NaN, infinities, negatives, junk."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def device_of(labels: Mapping[str, str]) -> str | None:
    """The GPU (`UUID`) or MIG slice (`UUID/GPU_I_ID`) a series measures; None without a UUID."""
    uuid = labels.get("UUID", "")
    if not uuid:
        return None
    instance = labels.get("GPU_I_ID", "")
    return f"{uuid}/{instance}" if instance else uuid


def pods_of(targets: Sequence[ServerTarget]) -> dict[tuple[str, str], ServerTarget]:
    """(namespace, pod) -> target, for the targets with a valid namespace and a pod. A pod that
    two targets claim belongs to neither (its readings would be a guess)."""
    pods: dict[tuple[str, str], ServerTarget] = {}
    claimed_twice: set[tuple[str, str]] = set()
    for target in targets:
        if not (target.pod and valid_namespace(target.namespace)):
            continue
        assert target.namespace is not None
        key = (target.namespace, target.pod)
        if key in pods and pods[key].key != target.key:
            claimed_twice.add(key)
        pods[key] = target
    for key in claimed_twice:
        del pods[key]
    return pods


def readings(
    series: Iterable[Series],
    pods: Mapping[tuple[str, str], ServerTarget],
    *,
    now: float,
    staleness_s: float,
    namespace_label: str = "namespace",
    pod_label: str = "pod",
) -> Readings:
    """The fresh readings of each target's devices (see the module documentation)."""
    out = Readings()
    # target -> device -> measure -> [(time, value in percent or bytes)]
    found: dict[ServerKey, dict[str, dict[str, list[tuple[float, float]]]]] = {}
    for s in series:
        metric = METRICS.get(s.labels.get("__name__", ""))
        target = pods.get((s.labels.get(namespace_label, ""), s.labels.get(pod_label, "")))
        if metric is None or target is None:
            continue
        out.matched += 1
        device = device_of(s.labels)
        if device is None:
            out.no_device += 1
            continue
        if not s.samples:
            out.stale += 1
            continue
        t, raw = max(s.samples, key=lambda sample: sample[0])
        if t < now - staleness_s or (target.since is not None and t < target.since):
            out.stale += 1
            continue
        value = _number(raw)
        if value is None:
            out.invalid += 1
            continue
        measure, factor = metric
        devices = found.setdefault(target.key, {})
        devices.setdefault(device, {}).setdefault(measure, []).append((t, value * factor))

    for key, devices in found.items():
        samples = []
        for device, measures in sorted(devices.items()):
            util = measures.get("utilization")
            mem_util = measures.get("memory_utilization")
            used = measures.get("memory_used")
            times = util or [p for points in measures.values() for p in points]
            samples.append(
                GpuSample(
                    device=device,
                    utilization=min(100.0, max(v for _, v in util)) if util else None,
                    memory_used=int(max(v for _, v in used)) if used else None,
                    at=max(t for t, _ in times),
                    memory_utilization=min(100.0, max(v for _, v in mem_util))
                    if mem_util
                    else None,
                )
            )
        out.samples[key] = samples
    return out
