# JupyterHub configuration of gpuhub's embedded default: one machine, local processes, GPUs pinned
# with CUDA_VISIBLE_DEVICES, a SQLite store. `gpuhub demo` (and `make demo`) start JupyterHub with
# it; the end-to-end tests use it too. Settings come from the environment:
#
#   GPUHUB_DEMO_PORT         public port (default 8000); the proxy API uses +1, the hub +81
#   GPUHUB_DEMO_PASSWORD     the password of every demo user (generated and printed when unset)
#   GPUHUB_DEMO_ADMIN_TOKEN  when set, a service token with JupyterHub's `admin` role
#   GPUHUB_DEMO_GPUS         simulated GPUs on a machine without one (default 4)
#   GPUHUB_STATE_DIR         databases, homes and simulated GPUs (default .demo in the checkout)
#   GPUHUB_CATALOG           catalogue file (default config/catalog.yaml)
#   GPUHUB_QUOTAS            quota file (default config/quotas.yaml)
#   GPUHUB_STORE_URL         gpuhub's store, for the hub, the service and the pages (default: the
#                            SQLite file gpuhub.sqlite in GPUHUB_STATE_DIR; PostgreSQL:
#                            postgresql+psycopg://user@host/db, docs/upgrades.md)
#   GPUHUB_KEEP_SERVERS      1: servers keep running when the hub stops (default 0)
#   GPUHUB_DEMO_ALLOWED_REGISTRIES  registries the admin pages may take environment images from
#                            (comma-separated; default none)
#   GPUHUB_DEMO_SERVER_ARGS  extra command-line options of every single-user server, split like a
#                            shell does (e.g. "--GpuhubExtension.sample_interval=1"; default none)
import os
import shlex
import sys
from pathlib import Path

import yaml

from gpuhub import demo, paths
from gpuhub.settings import check_hub_config

c = get_config()  # noqa: F821 - provided by JupyterHub

env = os.environ
state = demo.state_dir()
config_dir = paths.config_dir()
checkout = config_dir.parent
port = int(env.get("GPUHUB_DEMO_PORT", "8000"))

# Programs the hub and the servers run: this Python's scripts, then the project's Node programs
# (configurable-http-proxy, code-server).
bin_dirs = [str(Path(sys.executable).parent), str(checkout / "node_modules" / ".bin")]
env["PATH"] = os.pathsep.join([*bin_dirs, env.get("PATH", "")])

print(f"gpuhub: {demo.prepare_gpus(state, int(env.get('GPUHUB_DEMO_GPUS', '4')))}", flush=True)

c.JupyterHub.bind_url = f"http://127.0.0.1:{port}"
c.JupyterHub.hub_bind_url = f"http://127.0.0.1:{port + 81}"
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{port + 1}"
c.ConfigurableHTTPProxy.pid_file = str(state / "proxy.pid")
c.JupyterHub.db_url = f"sqlite:///{state / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(state / "jupyterhub_cookie_secret")
c.JupyterHub.cleanup_servers = env.get("GPUHUB_KEEP_SERVERS", "0") != "1"
c.JupyterHub.allow_named_servers = True
c.JupyterHub.named_server_limit_per_user = 4

# Authentication: any user name with the demo password.
c.JupyterHub.authenticator_class = demo.DemoAuthenticator
c.DemoAuthenticator.password = env.get("GPUHUB_DEMO_PASSWORD", "")
if not c.DemoAuthenticator.password and not env.get("GPUHUB_DEMO_OIDC_URL"):
    # DemoAuthenticator refuses every login then (an empty password is never accepted).
    print("gpuhub: GPUHUB_DEMO_PASSWORD is empty: every login is refused", file=sys.stderr)

# Or single sign-on with an OpenID Connect provider such as Dex (docs/pages.md): its groups claim
# becomes the users' JupyterHub groups at each login, which drive environments and quotas.
#   GPUHUB_DEMO_OIDC_URL             the provider's issuer URL; when set, people log in there
#   GPUHUB_DEMO_OIDC_CLIENT_ID       the hub's client id at the provider (default gpuhub)
#   GPUHUB_DEMO_OIDC_CLIENT_SECRET   and its secret
#   GPUHUB_DEMO_OIDC_ADMIN_GROUPS    groups whose members are hub admins (default hub-admins)
#   GPUHUB_DEMO_OIDC_ALLOWED_GROUPS  groups allowed to log in (default: anyone the provider lets in)
#   GPUHUB_DEMO_OIDC_USERNAME_CLAIM  email (default: the verified address, in full) or sub
if env.get("GPUHUB_DEMO_OIDC_URL"):
    from gpuhub.oidc import OIDCConfigError, configure_oidc

    def oidc_groups(name: str, default: str = "") -> list[str]:
        return [g.strip() for g in env.get(name, default).split(",") if g.strip()]

    try:
        configure_oidc(
            c,
            issuer=env["GPUHUB_DEMO_OIDC_URL"],
            client_id=env.get("GPUHUB_DEMO_OIDC_CLIENT_ID", "gpuhub"),
            client_secret=env.get("GPUHUB_DEMO_OIDC_CLIENT_SECRET", ""),
            callback_url=f"http://127.0.0.1:{port}/hub/oauth_callback",
            admin_groups=oidc_groups("GPUHUB_DEMO_OIDC_ADMIN_GROUPS", "hub-admins"),
            allowed_groups=oidc_groups("GPUHUB_DEMO_OIDC_ALLOWED_GROUPS"),
            username_claim=env.get("GPUHUB_DEMO_OIDC_USERNAME_CLAIM", "email"),
        )
    except OIDCConfigError as e:
        sys.exit(f"gpuhub: single sign-on cannot be used: {e}")

if env.get("GPUHUB_DEMO_ADMIN_TOKEN"):
    c.JupyterHub.services = [
        {"name": "demo-admin", "api_token": env["GPUHUB_DEMO_ADMIN_TOKEN"]},
    ]
    c.JupyterHub.load_roles = [{"name": "admin", "services": ["demo-admin"]}]

# The spawner: local processes run as the hub's own system user (demo only: no isolation between
# users; a lab machine with system accounts uses gpuhub.spawner.local.LocalGPUSpawner).
c.JupyterHub.spawner_class = "gpuhub.spawner.local.SharedUserLocalGPUSpawner"
c.SharedUserLocalGPUSpawner.home_dir_template = str(state / "home" / "{username}")
# Settings the hub, the gpuhub service and its pages share (gpuhub.settings.GpuhubConfig): the
# service gets them from check_hub_config at the end of this file.
c.GpuhubConfig.catalog_file = env.get("GPUHUB_CATALOG", str(config_dir / "catalog.yaml"))
c.GpuhubConfig.store_url = (
    env.get("GPUHUB_STORE_URL", "").strip() or f"sqlite:///{state / 'gpuhub.sqlite'}"
)
quotas_file = env.get("GPUHUB_QUOTAS", str(config_dir / "quotas.yaml"))
with open(quotas_file) as f:
    c.GPUSpawnerMixin.quotas = yaml.safe_load(f) or {}
c.LocalGPUSpawner.kernelspec_dir = str(state / "kernels")
c.Spawner.cmd = [str(Path(sys.executable).with_name("jupyterhub-singleuser"))]
c.Spawner.args = [
    *(["--allow-root"] if os.getuid() == 0 else []),
    *shlex.split(env.get("GPUHUB_DEMO_SERVER_ARGS", "")),
]
c.Spawner.start_timeout = 180
c.Spawner.http_timeout = 180
# Marks every process of a test run, so the tests can end all of them.
c.Spawner.env_keep.append("GPUHUB_TEST_RUN")

# The gpuhub service (docs/operations.md): snapshots the kernels of a server whose GPU sits idle,
# restarts it without the GPU, reclaims GPUs for queued users, stops idle servers, and serves
# Prometheus metrics at /services/gpuhub/metrics. Its token holds only the scopes listed (with
# why) in gpuhub/service/scopes.py.
#   GPUHUB_DEMO_GPU_IDLE_TIMEOUT  seconds a GPU may sit idle before it is released (default 120)
#   GPUHUB_DEMO_SERVICE           managed (default: the hub runs it), external (someone else runs
#                                 it with the token in GPUHUB_DEMO_SERVICE_TOKEN), off
#   GPUHUB_DEMO_SERVICE_PORT      its port (default: the public port + 82)
#   GPUHUB_DEMO_MAX_GPU_LEASE     seconds a server may hold a GPU at most (default 86400); a server
#                                 that claims work in progress forever, or does not report, keeps
#                                 its GPU this long at most
service_mode = env.get("GPUHUB_DEMO_SERVICE", "managed")
if service_mode != "off":
    from gpuhub.service.scopes import server_token_scopes, service_role

    gpu_idle = float(env.get("GPUHUB_DEMO_GPU_IDLE_TIMEOUT", "120"))
    max_lease = float(env.get("GPUHUB_DEMO_MAX_GPU_LEASE", str(24 * 3600)))
    service_port = int(env.get("GPUHUB_DEMO_SERVICE_PORT", str(port + 82)))
    gpuhub_service = {"name": "gpuhub", "url": f"http://127.0.0.1:{service_port}"}
    if service_mode == "external":
        gpuhub_service["api_token"] = env["GPUHUB_DEMO_SERVICE_TOKEN"]
    else:
        gpuhub_service["command"] = [
            sys.executable,
            "-m",
            "gpuhub.service",
            f"--hub-public-url=http://127.0.0.1:{port}",
            f"--gpu-idle-timeout={gpu_idle:g}",
            f"--gpu-idle-timeout-under-demand={min(300.0, gpu_idle / 2):g}",
            f"--interval={max(5.0, min(60.0, gpu_idle / 4)):g}",
            f"--GpuhubService.max_gpu_lease_default={max_lease:g}",
            f"--GpuhubService.activity_interval={max(1.0, min(10.0, gpu_idle / 4)):g}",
            "--log-level=INFO",
        ]
        gpuhub_service["cwd"] = str(state)
        passed_on = ("GPUHUB_FAKE_NVML", "GPUHUB_TEST_RUN", "PYTHONUNBUFFERED")
        gpuhub_service["environment"] = {k: env[k] for k in passed_on if k in env}
        print(
            f"gpuhub: the gpuhub service releases a GPU idle for {gpu_idle:g} s "
            f"({min(300.0, gpu_idle / 2):g} s while someone waits for one); "
            "set GPUHUB_DEMO_GPU_IDLE_TIMEOUT to change it",
            flush=True,
        )
    c.JupyterHub.services.append(gpuhub_service)
    c.JupyterHub.load_roles.append(service_role("gpuhub"))
    # Servers report to the service with their own token (docs/security.md): the service never
    # sends a credential to a server.
    c.Spawner.server_token_scopes = server_token_scopes("gpuhub")
    c.GPUSpawnerMixin.service_url = f"http://127.0.0.1:{port}/services/gpuhub/"

    # gpuhub's pages (docs/pages.md) at /services/gpuhub/, linked in the hub's navigation bar:
    # every user's GPUs, snapshots, quota, queue place and history; the admin pages for hub
    # admins and the groups in GPUHUB_DEMO_ADMIN_GROUPS (comma-separated, default gpuhub-admins).
    from gpuhub.service.web.hub_config import configure_pages

    admin_groups = env.get("GPUHUB_DEMO_ADMIN_GROUPS", "gpuhub-admins").split(",")
    configure_pages(c, gpuhub_service, admin_groups=[g.strip() for g in admin_groups if g.strip()])
    if "command" in gpuhub_service:
        gpuhub_service["command"] += [
            f"--GpuhubPages.quotas_file={quotas_file}",
            f"--GpuhubPages.snapshot_home_template={state / 'home' / '{username}'}",
        ]
        # Registries the admin pages may take environment images from (comma-separated;
        # default none: images come from the catalogue file only).
        for registry in env.get("GPUHUB_DEMO_ALLOWED_REGISTRIES", "").split(","):
            if registry.strip():
                gpuhub_service["command"].append(
                    f"--GpuhubPages.allowed_registries={registry.strip()}"
                )

# Every gpuhub setting checked now, the store opened (and upgraded: docs/upgrades.md): a bad value
# stops the hub here, naming the setting and the field. The managed gpuhub service gets the
# shared settings (store, catalogue) in its environment.
check_hub_config(c)
