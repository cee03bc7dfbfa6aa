"""Trace-driven simulation of a GPU pool under different policies (`gpuhub simulate`).

`workload` loads traces, `synthetic` generates workloads of the same shape, `engine` replays a
workload under one policy (driving gpuhub's own `policy` and `idle` code for the gpuhub policy),
`report` runs several policies side by side and formats the result, `cli` is the command.
"""
