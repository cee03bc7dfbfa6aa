"""`GPUKubeSpawner`: gpuhub's selections as Kubernetes pods, through KubeSpawner's own traits.

What a selection changes in the pod is decided by the pure `kube_objects.pod_settings`; this class
only reads the admin's configuration, applies the result to KubeSpawner's traits, and reports the
cluster's free GPUs (`kube_capacity`). Options are validated by the mixin before anything is sent
to the API server.
"""

from __future__ import annotations

from typing import Any

from kubespawner import KubeSpawner
from traitlets import Bool, Unicode, default

from ..catalog import Catalog
from ..options import Selection
from .kube_capacity import cluster_capacity
from .kube_objects import PodBase, PodSettings, pod_settings, template_literal
from .kube_watch import CapacityWatch, capacity_watch
from .mixin import GPUSpawnerMixin
from .queueing import GPUQueueMixin


class GPUKubeSpawner(GPUQueueMixin, GPUSpawnerMixin, KubeSpawner):
    """KubeSpawner with gpuhub's environments, GPU types, quotas and wait queue."""

    home_pvc = Bool(
        True,
        config=True,
        help="""Mount the user's persistent volume claim (`pvc_name_template`) as the home folder.

        Skipped when another volume is already mounted at `home_mount_path` (for example the home
        volume Zero to JupyterHub configures with `singleuser.storage.type: dynamic`).
        """,
    )

    home_mount_path = Unicode(
        "/home/jovyan",
        config=True,
        help="Where the user's persistent volume is mounted in the single-user container.",
    )

    shm_size_limit = Unicode(
        "1Gi",
        allow_none=True,
        config=True,
        help="""Size limit of the memory-backed `/dev/shm` (PyTorch data loaders need more than
        the container runtime's default 64 MiB). It counts towards the container's memory.
        None or "": no limit of its own.""",
    )

    watch_gpu_capacity = Bool(
        True,
        config=True,
        help="""Count total and free GPUs of each type from the cluster's nodes (allocatable GPU
        resources) and pods (GPU requests), watched, not listed on every request. Needs a
        ClusterRole that can get, list and watch nodes and pods (docs/kubernetes.md).

        Off, or when the watch fails, every type counts as `max_per_server` GPUs, all free: the
        spawn form cannot show what is free and pods wait in the Kubernetes scheduler instead
        of gpuhub's queue.
        """,
    )

    gpu_capacity_all_namespaces = Bool(
        True,
        config=True,
        help="""Count the GPU requests of pods in every namespace (other workloads on the GPU
        nodes included). False: only pods in the hub's namespace are seen.""",
    )

    gpu_node_label_selector = Unicode(
        "",
        config=True,
        help="""Watch only the nodes with these labels (a Kubernetes label selector such as
        `nvidia.com/gpu.present=true`), to keep the hub's memory small on large clusters.""",
    )

    # A per-user home that outlives every server: created when missing, never deleted.
    @default("storage_pvc_ensure")
    def _default_storage_pvc_ensure(self) -> bool:
        return True

    @default("delete_pvc")
    def _default_delete_pvc(self) -> bool:
        return False

    @default("pvc_name_template")
    def _default_pvc_name_template(self) -> str:
        return "claim-{username}"

    @default("storage_capacity")
    def _default_storage_capacity(self) -> str:
        return "10Gi"

    _pod_base: PodBase | None = None
    _capacity: CapacityWatch | None = None
    pod_settings: PodSettings | None = None

    def pod_base(self) -> PodBase:
        """The admin's pod configuration, read once before the first selection changes it."""
        if self._pod_base is None:
            self._pod_base = PodBase(
                image=self.image,
                extra_resource_limits=dict(self.extra_resource_limits),
                node_selector=dict(self.node_selector),
                tolerations=tuple(self._sorted_dict_values(self.tolerations)),
                volumes=tuple(self._sorted_dict_values(self.volumes)),
                volume_mounts=tuple(self._sorted_dict_values(self.volume_mounts)),
                environment=dict(self.environment),
                home_pvc=self.home_pvc,
                home_mount_path=self.home_mount_path,
                shm_size_limit=self.shm_size_limit or None,
            )
            self._base_labels = dict(self.extra_labels)
            self._base_annotations = dict(self.extra_annotations)
        return self._pod_base

    def apply_pod_settings(self, selection: Selection, catalog: Catalog) -> PodSettings:
        """Put `selection` into KubeSpawner's traits (no I/O)."""
        settings = pod_settings(selection, catalog, self.pod_base(), self.user.name, self.name)
        self.image = settings.image
        self.extra_resource_limits = settings.extra_resource_limits
        self.node_selector = settings.node_selector
        self.tolerations = settings.tolerations
        self.volumes = settings.volumes
        self.volume_mounts = settings.volume_mounts
        self.environment = settings.environment
        self.extra_labels = {**self._base_labels, **settings.labels}
        self.extra_annotations = {
            **self._base_annotations,
            **{k: template_literal(v) for k, v in settings.annotations.items()},
        }
        self.default_url = settings.default_url
        self.pod_settings = settings
        return settings

    # -- backend hooks of GPUSpawnerMixin ---------------------------------------------------------

    async def start_capacity_watch(self) -> CapacityWatch | None:
        """The shared watch of nodes and pods (listed on first use); None when it cannot run."""
        if not self.watch_gpu_capacity:
            return None
        namespace = None if self.gpu_capacity_all_namespaces else self.namespace
        try:
            self._capacity = await capacity_watch(self, namespace, self.gpu_node_label_selector)
        except Exception as e:
            self.log.error("gpuhub: cannot watch the cluster's GPUs (%s); not counting them", e)
            self._capacity = None
        return self._capacity

    def gpu_capacity(self, catalog: Catalog) -> dict[str, tuple[int, int]]:
        watch = self._capacity
        if watch is None or watch.failed:
            return {g.id: (g.max_per_server, g.max_per_server) for g in catalog.gpu_types}
        counts = cluster_capacity(
            catalog.gpu_types,
            watch.nodes,
            watch.pods,
            self.store.leases(),
            self.pod_base().tolerations,
        )
        return {type_id: (c.total, c.free) for type_id, c in counts.items()}

    async def render_options_form(self) -> str:
        await self.start_capacity_watch()
        return await super().render_options_form()

    async def apply_gpuhub_options(self, user_options: Any) -> Selection:
        await self.start_capacity_watch()
        return await super().apply_gpuhub_options(user_options)

    async def apply_selection(self, selection: Selection, catalog: Catalog) -> None:
        self.apply_pod_settings(selection, catalog)
        if selection.gpus:
            gpu_type = selection.gpu_type
            assert gpu_type is not None

            def take() -> bool:
                # The queue lets this run only when the cluster has the GPUs free.
                self.store.lease_units(
                    self.user.name,
                    self.name,
                    gpu_type,
                    selection.gpus,
                    max_user_gpus=self.gpu_limit(),
                )
                return True

            # Nothing free: wait in gpuhub's queue, not as a Pending pod in the scheduler's.
            await self.wait_for_gpus(selection, catalog, take)
