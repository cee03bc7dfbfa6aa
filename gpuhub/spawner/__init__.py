"""gpuhub's spawners: one mixin with the backend-independent part, one class per backend."""

from .mixin import GPUSpawnerMixin

__all__ = ["GPUSpawnerMixin"]
