"""The pure part of the Prometheus activity source: the query, the answer, series -> readings."""

from __future__ import annotations

import json

import pytest

from gpuhub.activity import ServerTarget
from gpuhub.activity.dcgm import (
    DEFAULT_QUERY,
    AnswerError,
    Series,
    build_query,
    device_of,
    parse_answer,
    pods_of,
    readings,
)


def test_the_query_names_each_namespace_once_and_nothing_else() -> None:
    query = build_query(DEFAULT_QUERY, ["jhub", "lab", "jhub"], 89.2)
    assert 'namespace=~"jhub|lab"' in query
    assert query.endswith('pod!=""}[90s]')
    assert build_query(DEFAULT_QUERY, ["jhub"], 60, matchers=' job="dcgm" ').endswith(
        'pod!="",job="dcgm"}[60s]'
    )
    custom = build_query(
        '{$namespace_label=~"$namespaces",$pod_label!=""}[$window]',
        ["jhub"],
        30,
        namespace_label="exported_namespace",
        pod_label="exported_pod",
    )
    assert custom == '{exported_namespace=~"jhub",exported_pod!=""}[30s]'
    for bad in ('jhub"}', "Jhub", "a" * 64, "", "jhub|.*"):
        with pytest.raises(ValueError, match="not a Kubernetes namespace"):
            build_query(DEFAULT_QUERY, [bad], 60)


def test_answers_are_parsed_strictly() -> None:
    matrix = {
        "status": "success",
        "data": {
            "resultType": "matrix",
            "result": [{"metric": {"pod": "p"}, "values": [[1.5, "1"], [2, "NaN"]]}],
        },
    }
    [series] = parse_answer(json.dumps(matrix).encode())
    assert series.samples == ((1.5, "1"), (2.0, "NaN"))
    bad = [
        b"\xff\xfe",
        b'{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":{}}]}}',
        b'{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[[1]]}]}}',
        b'{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[true,"1"]}]}}',
        b'{"status":"success","data":{"resultType":"vector","result":[7]}}',
        b'{"status":"error","errorType":"bad_data","error":"parse error"}',
    ]
    for body in bad:
        with pytest.raises(AnswerError):
            parse_answer(body)


def test_devices_whole_gpus_and_mig_slices() -> None:
    assert device_of({"UUID": "GPU-1"}) == "GPU-1"
    assert device_of({"UUID": "GPU-1", "GPU_I_ID": "", "GPU_I_PROFILE": ""}) == "GPU-1"
    assert device_of({"UUID": "GPU-1", "GPU_I_ID": "7", "GPU_I_PROFILE": "1g.10gb"}) == "GPU-1/7"
    assert device_of({"gpu": "0", "device": "nvidia0"}) is None


def test_pods_and_what_is_left_out() -> None:
    targets = [
        ServerTarget("ada", "", namespace="jhub", pod="jupyter-ada"),
        ServerTarget("bob", "", namespace="jhub", pod="jupyter-bob"),
        ServerTarget("eve", "", namespace="jhub", pod="jupyter-bob"),
        ServerTarget("cy", "", namespace="jhub"),
    ]
    pods = pods_of(targets)
    assert list(pods) == [("jhub", "jupyter-ada")]
    now = 1000.0
    base = {"namespace": "jhub", "pod": "jupyter-ada"}
    found = readings(
        [
            Series({**base, "__name__": "DCGM_FI_DEV_GPU_UTIL"}, ((990.0, "12"),)),
            Series({**base, "__name__": "DCGM_FI_DEV_GPU_UTIL", "UUID": "GPU-1"}, ()),
            Series({**base, "__name__": "DCGM_FI_DEV_GPU_UTIL", "UUID": "GPU-2"}, ((100.0, "1"),)),
            Series({**base, "__name__": "DCGM_FI_DEV_GPU_UTIL", "UUID": "GPU-3"}, ((999, {}),)),
            Series({**base, "__name__": "DCGM_FI_DEV_GPU_TEMP", "UUID": "GPU-4"}, ((999, "60"),)),
            Series({**base, "__name__": "DCGM_FI_DEV_GPU_UTIL", "UUID": "GPU-5"}, ((999, "250"),)),
        ],
        pods,
        now=now,
        staleness_s=90,
    )
    assert (found.matched, found.no_device, found.stale, found.invalid) == (5, 1, 2, 1)
    [sample] = found.samples[("ada", "")]
    assert (sample.device, sample.utilization, sample.at) == ("GPU-5", 100.0, 999)
