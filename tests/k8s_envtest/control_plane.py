"""A real Kubernetes control plane for tests, from controller-runtime's envtest binaries.

`KUBEBUILDER_ASSETS` names a folder with `etcd` and `kube-apiserver` (and, when present,
`kube-scheduler` and `kube-controller-manager`), as `setup-envtest use <version> -p path` prints
it. Each is started on loopback with its data in a temporary folder: etcd, then the API server
with RBAC, service account tokens, an audit log of what the hub asks, and a static admin token;
then the scheduler (with the profiles the test names) and the controller manager. Nothing here
is Kubernetes code: the binaries are the contributor's, never in the repository.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import urllib3
import yaml

from gpuhub.testing import free_port

ASSETS = "KUBEBUILDER_ASSETS"
REQUIRED = ("etcd", "kube-apiserver")
OPTIONAL = ("kube-scheduler", "kube-controller-manager")
ADMIN_TOKEN = "gpuhub-envtest-admin"


def assets() -> tuple[Path | None, str]:
    """(folder, what is there) when the binaries exist, else (None, why not)."""
    folder = os.environ.get(ASSETS, "")
    if not folder:
        return None, f"${ASSETS} is not set (docs/kubernetes.md: setup-envtest)"
    path = Path(folder)
    missing = [b for b in REQUIRED if not os.access(path / b, os.X_OK)]
    if missing:
        return None, f"{', '.join(missing)} not found in ${ASSETS}={folder}"
    extra = [b for b in OPTIONAL if os.access(path / b, os.X_OK)]
    return path, f"{path} ({', '.join([*REQUIRED, *extra])})"


AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [{"level": "Metadata", "userGroups": ["system:serviceaccounts"]}, {"level": "None"}],
}


@dataclass
class ControlPlane:
    """etcd, kube-apiserver and, where their binaries exist, kube-scheduler and
    kube-controller-manager, on loopback."""

    root: Path
    bin_dir: Path
    #: kube-scheduler profiles: scheduler name -> `pluginConfig` (as in Zero to JupyterHub's
    #: user-scheduler values); the default profile is always there.
    scheduler_profiles: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    url: str = ""

    @property
    def has_scheduler(self) -> bool:
        return os.access(self.bin_dir / "kube-scheduler", os.X_OK)

    @property
    def has_controller_manager(self) -> bool:
        return os.access(self.bin_dir / "kube-controller-manager", os.X_OK)

    def _run(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - owned by the process
        self.processes[name] = subprocess.Popen(
            [str(self.bin_dir / name), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def start(self, timeout: float = 90) -> ControlPlane:
        self.root.mkdir(parents=True, exist_ok=True)
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        self._run(
            "etcd",
            [
                f"--data-dir={self.root / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
            ],
        )
        key = self.root / "sa.key"
        pub = self.root / "sa.pub"
        subprocess.run(
            ["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True
        )
        subprocess.run(
            ["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)],
            check=True,
            capture_output=True,
        )
        tokens = self.root / "tokens.csv"
        tokens.write_text(f'{ADMIN_TOKEN},envtest-admin,envtest-admin,"system:masters"\n')
        policy = self.root / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump(AUDIT_POLICY))
        self._run(
            "kube-apiserver",
            [
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--cert-dir={self.root / 'certs'}",
                "--authorization-mode=RBAC",
                f"--token-auth-file={tokens}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pub}",
                f"--service-account-signing-key-file={key}",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.audit_log}",
            ],
        )
        self.url = f"https://127.0.0.1:{api_port}"
        self._wait_ready(timeout)
        self.write_kubeconfig(self.root / "admin.kubeconfig", ADMIN_TOKEN, None)
        if self.has_scheduler:
            self._start_scheduler()
        if self.has_controller_manager:
            self._run(
                "kube-controller-manager",
                [
                    f"--kubeconfig={self.root / 'admin.kubeconfig'}",
                    "--leader-elect=false",
                    "--secure-port=0",
                    f"--service-account-private-key-file={key}",
                    "--controllers=*,-nodeipam,-serviceaccount-token",
                ],
            )
        return self

    @property
    def audit_log(self) -> Path:
        return self.root / "audit.log"

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited:\n{self.log(name)}")
            with contextlib.suppress(requests.RequestException):
                if self.admin().get(f"{self.url}/readyz", timeout=2).ok:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"kube-apiserver not ready:\n{self.log('kube-apiserver')}")

    def _start_scheduler(self) -> None:
        profiles: list[dict[str, Any]] = [{"schedulerName": "default-scheduler"}]
        for name, plugin_config in self.scheduler_profiles.items():
            profiles.append({"schedulerName": name, "pluginConfig": list(plugin_config)})
        config = {
            "apiVersion": "kubescheduler.config.k8s.io/v1",
            "kind": "KubeSchedulerConfiguration",
            "clientConnection": {"kubeconfig": str(self.root / "admin.kubeconfig")},
            "leaderElection": {"leaderElect": False},
            "profiles": profiles,
        }
        path = self.root / "scheduler.yaml"
        path.write_text(yaml.safe_dump(config))
        self._run("kube-scheduler", [f"--config={path}", "--secure-port=0"])

    def admin(self) -> requests.Session:
        """An HTTP session with the cluster admin's token (the API server's own certificate is
        self-signed: not verified)."""
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        session.verify = False
        return session

    def write_kubeconfig(self, path: Path, token: str, namespace: str | None) -> Path:
        context: dict[str, Any] = {"cluster": "envtest", "user": "user"}
        if namespace:
            context["namespace"] = namespace
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "envtest",
                            "cluster": {"server": self.url, "insecure-skip-tls-verify": True},
                        }
                    ],
                    "users": [{"name": "user", "user": {"token": token}}],
                    "contexts": [{"name": "envtest", "context": context}],
                    "current-context": "envtest",
                }
            )
        )
        return path

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        shutil.rmtree(self.root / "etcd", ignore_errors=True)
