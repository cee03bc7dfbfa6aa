"""The Kubernetes tests against a real control plane (controller-runtime's envtest binaries)."""

from .cluster import EnvtestCluster
from .control_plane import assets

__all__ = ["EnvtestCluster", "assets"]
