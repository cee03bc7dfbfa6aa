"""Running gpuhub's snapshot code inside a kernel, through the kernel's own execute channel.

The code is sent as text: the kernel-side module (`kernel_side.py`) and the snapshot core
(`gpuhub/core/snapshot.py`) are loaded into the kernel as modules `_gpuhub_kernel` and
`_gpuhub_snapshot_core`, then one function of them runs. Requests are `silent` (no history, no
output in the notebook) and `stop_on_error=False` (a failure never cancels the user's queued
cells); the result comes back as JSON through `user_expressions`.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import time
from functools import cache
from pathlib import Path
from queue import Empty
from typing import Any

from jupyter_client.asynchronous import AsyncKernelClient

from ..core import snapshot as core
from . import kernel_io, kernel_side

RESULT = f"__import__('sys').modules[{kernel_side.MODULE!r}].last_json"


class KernelCommandError(Exception):
    """The kernel could not run a gpuhub command (with a message for the API caller)."""


@cache
def _sources() -> tuple[str, str, str]:
    return (
        Path(core.__file__).read_text(encoding="utf-8"),
        Path(kernel_io.__file__).read_text(encoding="utf-8"),
        Path(kernel_side.__file__).read_text(encoding="utf-8"),
    )


def bootstrap(config: dict[str, Any]) -> str:
    """Code that (re)loads gpuhub's kernel-side modules and configures them, leaving no name
    behind in the user's namespace."""
    core_source, io_source, kernel_source = _sources()
    boot = (
        "import sys, types, hashlib\n"
        "def load(name, source):\n"
        "    digest = hashlib.sha256(source.encode()).hexdigest()\n"
        "    old = sys.modules.get(name)\n"
        "    if getattr(old, '__gpuhub_digest__', None) == digest:\n"
        "        return old  # loaded already: keep its state\n"
        "    module = types.ModuleType(name)\n"
        "    module.__gpuhub_digest__ = digest\n"
        "    sys.modules[name] = module\n"
        "    exec(compile(source, '<' + name + '>', 'exec'), module.__dict__)\n"
        "    if old is not None and hasattr(module, 'adopt'):\n"
        "        module.adopt(old)  # another version was loaded: take over its state\n"
        "    return module\n"
        f"load({kernel_side.CORE_MODULE!r}, {core_source!r})\n"
        f"load({kernel_side.IO_MODULE!r}, {io_source!r})\n"
        f"load({kernel_side.MODULE!r}, {kernel_source!r}).configure(**{config!r})\n"
    )
    return f"exec(compile({boot!r}, '<gpuhub>', 'exec'), {{}})"


@cache
def _digests() -> dict[str, str]:
    names = (kernel_side.CORE_MODULE, kernel_side.IO_MODULE, kernel_side.MODULE)
    return {
        n: hashlib.sha256(src.encode()).hexdigest()
        for n, src in zip(names, _sources(), strict=True)
    }


RELOAD = "gpuhub: helpers not loaded"


def configure(config: dict[str, Any]) -> str:
    """Short code that configures gpuhub's kernel-side modules when the kernel has this
    version of them already, and raises `RELOAD` otherwise (then send `bootstrap`)."""
    check = (
        "import sys\n"
        f"for name, digest in {_digests()!r}.items():\n"
        "    if getattr(sys.modules.get(name), '__gpuhub_digest__', None) != digest:\n"
        f"        raise RuntimeError({RELOAD!r})\n"
        f"sys.modules[{kernel_side.MODULE!r}].configure(**{config!r})\n"
    )
    return f"exec({check!r}, {{}})"


def call(function: str, *args: Any) -> str:
    """Code that calls `_gpuhub_kernel.<function>(*args)` (literal arguments only)."""
    rendered = ", ".join(repr(a) for a in args)
    return f"__import__('sys').modules[{kernel_side.MODULE!r}].{function}({rendered})"


def _client(kernel: Any) -> AsyncKernelClient:
    """A client of its own: a session (and so a ZMQ identity) distinct from the server's and the
    browsers', so replies are never routed to the wrong socket."""
    client = AsyncKernelClient(parent=kernel)
    client.load_connection_info(kernel.get_connection_info())
    return client


async def _until_idle(client: AsyncKernelClient, msg_id: str, timeout: float) -> None:
    """Wait (briefly) for the kernel to publish that it is idle again after our request, so
    that whoever looks at its execution state next does not see our request as user work."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = await client.iopub_channel.get_msg(timeout=left)
        except (Empty, asyncio.TimeoutError):
            return
        if (
            msg.get("msg_type") == "status"
            and msg.get("parent_header", {}).get("msg_id") == msg_id
            and msg.get("content", {}).get("execution_state") == "idle"
        ):
            return


def _process_id(kernel: Any) -> Any:
    """What identifies the kernel's process (a restart replaces it)."""
    provisioner = getattr(kernel, "provisioner", None)
    return getattr(provisioner, "pid", None) or id(getattr(provisioner, "process", None))


async def run(kernel: Any, code: str, timeout: float) -> Any:
    """Run `code` silently in `kernel` (a jupyter_client KernelManager) with a client of its own
    for this request, and return the JSON result the kernel-side module left in `last_json`.
    (`KernelClients.run` keeps one client per kernel instead.)"""
    client = _client(kernel)
    client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
    try:
        await _ready(client, timeout)
        return await _execute(kernel, client, code, timeout)
    finally:
        client.stop_channels()


async def _ready(client: AsyncKernelClient, timeout: float) -> None:
    try:
        await client.wait_for_ready(timeout=max(1.0, min(60.0, timeout)))
    except RuntimeError as e:
        raise KernelCommandError(f"the kernel does not answer: {e}") from None


async def _drain(client: AsyncKernelClient) -> None:
    """Drop what the kernel published since our last request (the user's cells' output)."""
    channel = client.iopub_channel
    while await channel.msg_ready():
        await channel.get_msg(timeout=0)


async def _execute(kernel: Any, client: AsyncKernelClient, code: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    msg_id = client.execute(
        code,
        silent=True,
        store_history=False,
        user_expressions={"result": RESULT},
        allow_stdin=False,
        stop_on_error=False,
    )
    process = _process_id(kernel)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise KernelCommandError(f"no answer from the kernel within {timeout:g} s")
        try:
            reply = await client.shell_channel.get_msg(timeout=min(left, 1.0))
        except (Empty, asyncio.TimeoutError):
            if not await kernel.is_alive() or _process_id(kernel) != process:
                raise KernelCommandError("the kernel died before it answered") from None
            continue
        if reply.get("parent_header", {}).get("msg_id") == msg_id:
            break
    await _until_idle(client, msg_id, min(2.0, max(0.1, deadline - time.monotonic())))
    content = reply["content"]
    if content.get("status") != "ok":
        raise KernelCommandError(
            f"the kernel raised {content.get('ename')}: {content.get('evalue')}"
        )
    expression = content.get("user_expressions", {}).get("result", {})
    if expression.get("status") != "ok":
        raise KernelCommandError(
            f"the kernel returned no result ({expression.get('ename')}: {expression.get('evalue')})"
        )
    text = expression["data"]["text/plain"]
    try:
        return json.loads(ast.literal_eval(text))
    except (ValueError, SyntaxError) as e:
        raise KernelCommandError(f"the kernel returned an unreadable result: {e}") from None


class KernelClients:
    """One client per kernel, kept from one request to the next, so that a request costs an
    execute round trip and nothing more: connecting a client and `wait_for_ready` (which waits
    for 0.2 s of silence on the kernel's IOPub channel) happen once per kernel process. A
    client is replaced when its kernel's process changes (a restart) and dropped after a
    request that failed, when the kernel is shut down (`forget`) and at `close`. Requests to
    one kernel must not overlap (the caller holds a lock per kernel)."""

    def __init__(self) -> None:
        self._clients: dict[str, tuple[AsyncKernelClient, Any]] = {}
        self._loaded: set[str] = set()  # kernels whose client saw the helpers loaded

    async def run(self, kernel_id: str, kernel: Any, code: str, timeout: float) -> Any:
        entry = self._clients.get(kernel_id)
        if entry is not None and entry[1] != _process_id(kernel):
            self.forget(kernel_id)
            entry = None
        if entry is None:
            client = _client(kernel)
            client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
            try:
                await _ready(client, timeout)
            except BaseException:
                client.stop_channels()
                raise
            entry = self._clients[kernel_id] = (client, _process_id(kernel))
        client = entry[0]
        try:
            await _drain(client)
            return await _execute(kernel, client, code, timeout)
        except KernelCommandError:
            self.forget(kernel_id)
            raise
        except Exception as e:  # the client was closed under us: a restart or a shutdown
            self.forget(kernel_id)
            raise KernelCommandError(f"the connection to the kernel failed: {e!r}") from None
        except BaseException:
            self.forget(kernel_id)
            raise

    async def command(
        self, kernel_id: str, kernel: Any, config: dict[str, Any], code: str, timeout: float
    ) -> Any:
        """Configure gpuhub's kernel-side modules, loading them first if this kernel process
        does not have them (the whole source is sent only then), and run `code`."""
        entry = self._clients.get(kernel_id)
        if entry is not None and entry[1] == _process_id(kernel) and kernel_id in self._loaded:
            try:
                return await self.run(kernel_id, kernel, configure(config) + "\n" + code, timeout)
            except KernelCommandError as e:
                if RELOAD not in str(e):
                    raise
        self._loaded.discard(kernel_id)
        result = await self.run(kernel_id, kernel, bootstrap(config) + "\n" + code, timeout)
        self._loaded.add(kernel_id)
        return result

    def forget(self, kernel_id: str) -> None:
        self._loaded.discard(kernel_id)
        entry = self._clients.pop(kernel_id, None)
        if entry is not None:
            entry[0].stop_channels()

    def close(self) -> None:
        for kernel_id in list(self._clients):
            self.forget(kernel_id)
