"""The gpuhub hub service: gives idle GPUs back to the pool without losing anyone's work.

`python -m gpuhub.service` (see `app.GpuhubService`). Modules: `hubapi` (the hub API client),
`servers` (hub models and server status to policy views), `demand` (queue and pool),
`actions` (snapshot, release, stop, with the action history), `notices` (what users are told),
`metrics` (Prometheus), `arbiter` (a GPU-aware `cull_arbiter_hook` for jupyterhub-idle-culler).
"""
