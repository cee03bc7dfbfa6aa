# JupyterHub configuration for GPUKubeSpawner tests: the hub talks to the emulated Kubernetes API
# server named by KUBECONFIG, whose kubelet runs the single-user servers as local processes.
#
#   GPUHUB_DEMO_PORT         public port; the proxy API uses +1, the hub +81
#   GPUHUB_DEMO_PASSWORD     the password of every user
#   GPUHUB_DEMO_ADMIN_TOKEN  a service token with JupyterHub's `admin` role
#   GPUHUB_STATE_DIR         databases
#   GPUHUB_TEST_CONFIG       JSON object of extra GPUKubeSpawner (or GpuhubConfig) settings
import json
import os
import sys
from pathlib import Path

from gpuhub import paths
from gpuhub.settings import SHARED, check_hub_config

c = get_config()  # noqa: F821 - provided by JupyterHub

env = os.environ
state = Path(env["GPUHUB_STATE_DIR"])
port = int(env["GPUHUB_DEMO_PORT"])
checkout = paths.config_dir().parent
env["PATH"] = os.pathsep.join(
    [str(Path(sys.executable).parent), str(checkout / "node_modules" / ".bin"), env["PATH"]]
)

c.JupyterHub.bind_url = f"http://127.0.0.1:{port}"
c.JupyterHub.hub_bind_url = f"http://127.0.0.1:{port + 81}"
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{port + 1}"
c.ConfigurableHTTPProxy.pid_file = str(state / "proxy.pid")
c.JupyterHub.db_url = f"sqlite:///{state / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(state / "jupyterhub_cookie_secret")
c.JupyterHub.cleanup_servers = False
c.JupyterHub.allow_named_servers = True
# Spawn requests answer at once (202), so the tests follow spawns through their progress.
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = env["GPUHUB_DEMO_PASSWORD"]
c.JupyterHub.services = [{"name": "tester", "api_token": env["GPUHUB_DEMO_ADMIN_TOKEN"]}]
c.JupyterHub.load_roles = [{"name": "admin", "services": ["tester"]}]

c.JupyterHub.spawner_class = "gpuhub.spawner.kube.GPUKubeSpawner"
c.GpuhubConfig.catalog_file = str(paths.config_dir() / "catalog-kubernetes.yaml")
c.GpuhubConfig.store_url = f"sqlite:///{state / 'gpuhub.sqlite'}"
c.KubeSpawner.namespace = "jhub"
c.KubeSpawner.cmd = ["jupyterhub-singleuser"]
if os.getuid() == 0:
    c.KubeSpawner.args = ["--allow-root"]
c.KubeSpawner.start_timeout = 90
c.KubeSpawner.http_timeout = 90
c.KubeSpawner.delete_grace_period = 5
for key, value in json.loads(env.get("GPUHUB_TEST_CONFIG", "{}")).items():
    setattr(c.GpuhubConfig if key in SHARED else c.GPUKubeSpawner, key, value)
check_hub_config(c)
