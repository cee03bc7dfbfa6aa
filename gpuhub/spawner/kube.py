"""`GPUKubeSpawner`: gpuhub's selections as Kubernetes pods, through KubeSpawner's own traits.

What a selection changes in the pod is decided by the pure `kube_objects.pod_settings`; this class
only reads the admin's configuration, applies the result to KubeSpawner's traits, and reports the
cluster's free GPUs (`kube_capacity`). Options are validated by the mixin before anything is sent
to the API server.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubespawner import KubeSpawner
from traitlets import Bool, Float, Unicode, default

from ..core.catalog import Catalog
from ..core.options import Selection
from ..store import MeasuredCapacity
from .capacity_publisher import Measure, capacity_publisher
from .kube_capacity import TypeCapacity, cluster_capacity
from .kube_objects import PodBase, PodSettings, pod_settings, template_literal
from .kube_watch import CapacityForbidden, CapacityWatch, capacity_watch, running_capacity_watch
from .mixin import GPUSpawnerMixin, catalog_in_force, http_error
from .queueing import GPUQueueMixin

#: what the hub said last about counting the cluster's GPUs (said once per process)
_capacity_warning: list[str] = []


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
        False,
        config=True,
        help="""Count the GPU requests of pods in every namespace (other workloads on the GPU
        nodes included). Needs the opt-in ClusterRole that reads every pod in the cluster
        (kubernetes/hub-gpu-capacity-all-pods-rbac.yaml). False (the default): only pods in
        the hub's namespace are seen, with the permission Zero to JupyterHub already gives;
        GPUs other workloads take on the same nodes then look free, and a spawn that counts on
        them waits as a Pending pod with the scheduler's message.""",
    )

    capacity_publish_interval = Float(
        10.0,
        config=True,
        help="""Seconds between two writes of the cluster's GPU counts into gpuhub's store, where
        the gpuhub service, its pages and its metrics read them. Counts older than three
        intervals (and 5 s) are stale: the service then falls back to `gpu_totals`.""",
    )

    capacity_retry_interval = Float(
        30.0,
        config=True,
        help="""Seconds before the hub tries again to watch the cluster's nodes and pods after
        it failed (no permission, API server unreachable); meanwhile spawns use the fallback.""",
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

    # Each server its own home claim: `claim-NAME` for the default server (as before),
    # `claim-NAME--SERVER` for a named one. Block storage (every cloud's default class) attaches
    # a ReadWriteOnce volume to one node at a time, and a user's servers may run on different
    # nodes (different GPU types). See `home_claim_conflict` for a shared claim.
    @default("pvc_name_template")
    def _default_pvc_name_template(self) -> str:
        return "claim-{user_server}"

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

    def _watch_namespace(self) -> str | None:
        return None if self.gpu_capacity_all_namespaces else self.namespace

    async def start_capacity_watch(self) -> CapacityWatch | None:
        """The shared watch of nodes and pods (listed on first use); None when it cannot run.

        Without permission (or without the API server) the hub says so once, as a warning, and
        falls back (see `watch_gpu_capacity`); it tries again after `capacity_retry_interval`.
        """
        if not self.watch_gpu_capacity:
            return None
        try:
            self._capacity = await capacity_watch(
                self,
                self._watch_namespace(),
                self.gpu_node_label_selector,
                retry_after=self.capacity_retry_interval,
            )
        except CapacityForbidden as e:
            self._capacity = None
            self._say_once(
                f"gpuhub: {e}. GPUs are not counted: each type is offered up to its "
                "max_per_server and a spawn waits in the Kubernetes scheduler, not in gpuhub's "
                "queue. Grant the permission with kubernetes/hub-gpu-capacity-rbac.yaml "
                "(docs/kubernetes.md)."
            )
        except Exception as e:
            self._capacity = None
            self._say_once(
                f"gpuhub: cannot watch the cluster's GPUs ({type(e).__name__}: {e}); not "
                f"counting them, trying again in {self.capacity_retry_interval:g} s."
            )
        else:
            if _capacity_warning:
                self.log.info("gpuhub: counting the cluster's GPUs again")
                _capacity_warning.clear()
            capacity_publisher(self.store, self._measure(), self.capacity_publish_interval)
        return self._capacity

    def _say_once(self, message: str) -> None:
        if message not in _capacity_warning:
            _capacity_warning[:] = [message]
            self.log.warning(message)
        else:
            self.log.debug(message)

    def _measure(self) -> Measure:
        """What the capacity publisher counts with: plain values, not this spawner."""
        store = self.store
        catalog, catalog_file = dict(self.catalog), self.catalog_file
        tolerations = self.pod_base().tolerations
        namespace, selector = self._watch_namespace(), self.gpu_node_label_selector

        def measure() -> list[MeasuredCapacity] | None:
            watch = running_capacity_watch(namespace, selector)
            if watch is None or watch.failed:
                return None
            types = catalog_in_force(store, catalog, catalog_file).gpu_types
            counts = cluster_capacity(types, watch.nodes, watch.pods, store.leases(), tolerations)
            names = {g.id: g.display_name for g in types}
            return [
                MeasuredCapacity(t, c.total, c.free, c.unavailable, note=c.note(names.get(t, t)))
                for t, c in counts.items()
            ]

        return measure

    def cluster_counts(self, catalog: Catalog) -> dict[str, TypeCapacity] | None:
        """Each type's GPUs as the watch sees them now; None without a working watch."""
        watch = self._capacity
        if watch is None or watch.failed:
            return None
        return cluster_capacity(
            catalog.gpu_types,
            watch.nodes,
            watch.pods,
            self.store.leases(),
            self.pod_base().tolerations,
        )

    def gpu_capacity(self, catalog: Catalog) -> dict[str, tuple[int, int]]:
        counts = self.cluster_counts(catalog)
        if counts is None:
            return {g.id: (g.max_per_server, g.max_per_server) for g in catalog.gpu_types}
        return {type_id: (c.total, c.free) for type_id, c in counts.items()}

    def admissible_totals(
        self, catalog: Catalog, capacity: Mapping[str, tuple[int, int]]
    ) -> dict[str, int]:
        """GPUs on cordoned or not ready nodes, and GPUs a type was offered before (a node
        drained for maintenance, removed, coming back), may be waited for: only a type that no
        node ever offered is refused."""
        counts = self.cluster_counts(catalog)
        if counts is None:
            return super().admissible_totals(catalog, capacity)
        seen = self.store.measured_capacity()
        return {
            t: max(c.total + c.unavailable, seen[t].offered_max if t in seen else 0)
            for t, c in counts.items()
        }

    def capacity_note(self, catalog: Catalog, gpu_type: str) -> str:
        counts = self.cluster_counts(catalog)
        if counts is None or gpu_type not in counts:
            return ""
        c = counts[gpu_type]
        found = catalog.gpu_type(gpu_type)
        name = found.display_name if found else gpu_type
        note = c.note(name)
        if not note and c.total == 0:
            note = f"no node offers {name} GPUs now"
        return note

    async def render_options_form(self) -> str:
        await self.start_capacity_watch()
        return await super().render_options_form()

    async def poll(self) -> int | None:
        # The hub polls running servers from its start on: the watch (and the counts the
        # gpuhub service reads) starts without waiting for someone to open the spawn page.
        await self.start_capacity_watch()
        return await super().poll()

    async def apply_gpuhub_options(self, user_options: Any) -> Selection:
        conflict = self.home_claim_conflict()
        if conflict:
            raise http_error(409, conflict)
        await self.start_capacity_watch()
        return await super().apply_gpuhub_options(user_options)

    def home_claim_conflict(self) -> str | None:
        """Why this server cannot start now because of its home claim, or None.

        When the claim template gives a user's servers one claim (`pvc_name_template` without
        the server's name) and the claim is ReadWriteOnce, a second server on another node
        could never mount it (Multi-Attach error, a pod stuck in ContainerCreating). The spawn
        is refused at once, naming the running server, unless the claim is ReadWriteMany.
        """
        if not self.storage_pvc_ensure or "ReadWriteMany" in (self.storage_access_modes or []):
            return None
        for name, other in getattr(self.user, "spawners", {}).items():
            if name == self.name or not (other.active or other.ready):
                continue
            if getattr(other, "pvc_name", None) != self.pvc_name:
                continue
            label = f"'{name}'" if name else "default"
            return (
                f"Your servers share one home volume ({self.pvc_name}), which only one node at "
                f"a time can mount (ReadWriteOnce), and your {label} server is running. Stop "
                "it first, or ask your admin for a home volume per server or a ReadWriteMany "
                "storage class (docs/kubernetes.md)."
            )
        return None

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
                    group=self.accounting_group(),
                )
                return True

            # Nothing free: wait in gpuhub's queue, not as a Pending pod in the scheduler's; or
            # start without a GPU and keep the place (`when_no_gpu: start-on-cpu`).
            if await self.wait_for_gpus(selection, catalog, take) is None:
                self.apply_pod_settings(self.selection or selection, catalog)

    # -- where the server runs: the pod whose GPU series the gpuhub service reads ----------------

    async def start(self) -> Any:
        url = await super().start()
        pod = self.pod_reflector.pods.get(f"{self.namespace}/{self.pod_name}") or {}
        self._record_pod((pod.get("spec") or {}).get("nodeName") or None)
        return url

    async def stop(self, now: bool = False) -> None:
        try:
            await super().stop(now=now)
        finally:
            self._record_pod(None, stopped=True)

    def _record_pod(self, node: str | None, stopped: bool = False) -> None:
        user, server = self.user.name, self.name
        try:
            if stopped:
                self.store.remove_server_pod(user, server)
            else:
                self.store.set_server_pod(user, server, self.namespace, self.pod_name, node)
        except Exception as e:  # the server runs or stops all the same; its GPU activity is unknown
            self.log.error("gpuhub: cannot record the pod of %s: %s", self._log_name, e)
