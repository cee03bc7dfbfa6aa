"""The spawn path: GPUKubeSpawner against plain KubeSpawner with an equivalent `profile_list`.

Each stage is what the hub does per spawn: render the form a user sees, turn the submitted form
into options and check them, admission (gpuhub only: quota and lease in the store), and build the
pod manifest. Both spawners run in the same process, one after the other, on the same catalogue:
the plain KubeSpawner gets one profile per environment with a profile option for the interface
and one for the GPU type and count, which is how Zero to JupyterHub users express the same choice.

    .venv/bin/python benchmarks/spawn_path.py [--rounds 300]

Prints a table of microseconds per call (median of rounds) and the ratio gpuhub / KubeSpawner.
No cluster is needed: manifests are built with KubeSpawner's client configuration patched out.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

from gpuhub import paths
from gpuhub.core.catalog import load_catalog

CATALOG_FILE = paths.config_dir() / "catalog-kubernetes.yaml"
FORM = {"interface": ["vscode"], "environment": ["pytorch"], "gpus": ["1"], "gpu_type": ["a100"]}


def equivalent_profile_list() -> list[dict[str, Any]]:
    """The catalogue as KubeSpawner profiles: environment x (interface, GPU type and count)."""
    catalog = load_catalog(CATALOG_FILE)
    gpu_choices: dict[str, Any] = {
        "cpu": {"display_name": "No GPU", "kubespawner_override": {}},
    }
    for g in catalog.gpu_types:
        for n in range(1, g.max_per_server + 1):
            gpu_choices[f"{g.id}-{n}"] = {
                "display_name": f"{n} x {g.display_name}",
                "kubespawner_override": {
                    "extra_resource_limits": {g.resource: str(n)},
                    "node_selector": dict(g.node_selector),
                    "tolerations": [dict(t) for t in g.tolerations],
                },
            }
    return [
        {
            "display_name": e.display_name,
            "slug": e.id,
            "description": e.description,
            "kubespawner_override": {"image": e.image},
            "profile_options": {
                "interface": {
                    "display_name": "Interface",
                    "choices": {
                        i.id: {
                            "display_name": i.display_name,
                            "kubespawner_override": {"default_url": i.default_url},
                        }
                        for i in catalog.interfaces
                    },
                },
                "gpu": {"display_name": "GPUs", "choices": gpu_choices},
            },
        }
        for e in catalog.environments
    ]


KUBESPAWNER_FORM = {
    "profile": ["pytorch"],
    "profile-option-pytorch--interface": ["vscode"],
    "profile-option-pytorch--gpu": ["a100-1"],
}


def user(name: str) -> SimpleNamespace:
    return SimpleNamespace(name=name, id=1, url=f"/user/{name}/", groups=[], spawners={})


def orm_spawner() -> SimpleNamespace:
    return SimpleNamespace(name="", user_options=None, server=None, state=None)


async def timed(fn: Callable[[], Awaitable[Any]], rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


async def measure(rounds: int) -> list[tuple[str, float, float]]:
    from kubespawner import KubeSpawner
    from traitlets.config import Config

    from gpuhub.spawner.kube import GPUKubeSpawner

    store = Path(tempfile.mkdtemp()) / "gpuhub.sqlite"
    config = Config()
    config.GpuhubConfig.catalog_file = str(CATALOG_FILE)
    config.GpuhubConfig.store_url = f"sqlite:///{store}"
    gpuhub = GPUKubeSpawner(
        _mock=True,
        user=user("ada"),
        orm_spawner=orm_spawner(),
        config=config,
        watch_gpu_capacity=False,
    )
    profiles = equivalent_profile_list()
    plain = KubeSpawner(
        _mock=True, user=user("bob"), orm_spawner=orm_spawner(), profile_list=profiles
    )

    async def gpuhub_form() -> None:
        await gpuhub.render_options_form()

    async def plain_form() -> None:
        plain._render_options_form(plain._sorted_dict_values(profiles))

    async def gpuhub_options() -> None:
        from gpuhub.core.options import parse

        options = gpuhub.options_from_form(FORM)
        parse(options, gpuhub.load_catalog(), gpuhub.user_groups())

    async def plain_options() -> None:
        plain.user_options = plain.options_from_form(KUBESPAWNER_FORM)
        await plain.load_user_options()

    async def gpuhub_admission() -> None:
        await gpuhub.apply_gpuhub_options(gpuhub.options_from_form(FORM))
        gpuhub.free_leases()

    async def gpuhub_manifest() -> None:
        await gpuhub.get_pod_manifest()

    async def plain_manifest() -> None:
        await plain.get_pod_manifest()

    await gpuhub_admission()  # prime traits, store and catalogue cache
    await plain_options()
    rows = [
        ("form render", await timed(gpuhub_form, rounds), await timed(plain_form, rounds)),
        (
            "options: parse + validate",
            await timed(gpuhub_options, rounds),
            await timed(plain_options, rounds),
        ),
        ("admission: quota + lease (store)", await timed(gpuhub_admission, rounds), 0.0),
        ("pod manifest", await timed(gpuhub_manifest, rounds), await timed(plain_manifest, rounds)),
    ]
    total_gpuhub = sum(r[1] for r in rows)
    total_plain = sum(r[2] for r in rows)
    rows.append(("whole spawn path", total_gpuhub, total_plain))
    return rows


def table(rows: list[tuple[str, float, float]]) -> str:
    lines = [
        f"{'stage':<34} {'gpuhub µs':>11} {'KubeSpawner µs':>15} {'ratio':>7}",
        "-" * 70,
    ]
    for stage, ours, theirs in rows:
        ratio = f"{ours / theirs:.2f}x" if theirs else "n/a"
        theirs_text = f"{theirs:,.0f}" if theirs else "-"
        lines.append(f"{stage:<34} {ours:>11,.0f} {theirs_text:>15} {ratio:>7}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300, help="calls per stage (median taken)")
    args = parser.parse_args()
    with mock.patch("kubespawner.spawner.load_config"):
        rows = asyncio.run(measure(args.rounds))
    print(f"spawn path, median of {args.rounds} calls per stage")
    print(table(rows))


if __name__ == "__main__":
    main()
