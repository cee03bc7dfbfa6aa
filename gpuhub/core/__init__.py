"""The pure core: gpuhub's rules without I/O (docs/architecture.md).

`catalog` (what can be asked for), `options` (what a user asked for), `quotas` (who may hold what),
`decide` (which GPUs to give back, which servers to stop), `idle` (activity from GPU readings),
`learned` (per-session idle limits learned from pauses), `queue` (the order of waiting spawns),
`snapshot` (the snapshot model), `overrides` and `registration` (what admins submit), `protocol`
(what servers report to the service). Nothing here imports a framework, a driver or storage.
"""
