"""Running gpuhub's snapshot code inside a kernel, through the kernel's own execute channel.

The code is sent as text: the kernel-side module (`kernel_side.py`) and the snapshot core
(`gpuhub/snapshot.py`) are loaded into the kernel as modules `_gpuhub_kernel` and
`_gpuhub_snapshot_core`, then one function of them runs. Requests are `silent` (no history, no
output in the notebook) and `stop_on_error=False` (a failure never cancels the user's queued
cells); the result comes back as JSON through `user_expressions`.
"""

from __future__ import annotations

import ast
import asyncio
import json
import time
from functools import cache
from pathlib import Path
from queue import Empty
from typing import Any

from jupyter_client.asynchronous import AsyncKernelClient

from .. import snapshot as core
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
    """Run `code` silently in `kernel` (a jupyter_client KernelManager) and return the JSON
    result the kernel-side module left in `last_json`."""
    client = _client(kernel)
    client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
    deadline = time.monotonic() + timeout
    try:
        try:
            await client.wait_for_ready(timeout=max(1.0, min(60.0, timeout)))
        except RuntimeError as e:
            raise KernelCommandError(f"the kernel does not answer: {e}") from None
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
    finally:
        client.stop_channels()
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
