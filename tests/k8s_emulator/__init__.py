"""An emulated Kubernetes API server (with scheduler and kubelet) for gpuhub's tests."""

from .emulator import KubeEmulator

__all__ = ["KubeEmulator"]
