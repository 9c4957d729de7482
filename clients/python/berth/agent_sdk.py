"""The Claude Agent SDK's CLI in a berth box: a ``Transport`` for ``claude-agent-sdk``.

``BerthTransport(options)`` asks berth for an sdk session (``agent: {"kind": "claude",
"client": "sdk", "args": [...]}``) whose CLI arguments are the ones the SDK would pass to a
local CLI; berth checks them against its allowlist, starts its own pinned CLI in the box
behind its model gateway (the real API key never leaves the server), and relays the CLI's
stdin and stdout over the WebSocket ``/v1/sessions/{id}/sdk``. The SDK's control protocol —
``can_use_tool``, hooks, in-process MCP servers, interrupt, ``set_model``,
``set_permission_mode`` — runs in this process as it would with a local CLI.

A dropped WebSocket is reconnected (for up to ``reconnect_for`` seconds, within the server's
60 s grace): the client asks for stdout from the byte offset it had reached and resends the
stdin bytes the server had not taken, so nothing is lost or repeated. The stdin kept for this
is trimmed at each of the server's ``stdin_taken`` acknowledgements, and a CLI output line
longer than the options' ``max_buffer_size`` (the SDK's default: 1 MiB) is an error, as with
a local CLI.

    from claude_agent_sdk import ClaudeAgentOptions, query
    from berth.agent_sdk import BerthTransport

    opts = ClaudeAgentOptions(allowed_tools=["Bash"])
    async for m in query(prompt="list the files", options=opts, transport=BerthTransport(opts)):
        print(m)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any, Optional, Union

import anyio
import websockets
from websockets.asyncio.client import ClientConnection, connect as ws_connect

from claude_agent_sdk import CLIConnectionError, ClaudeAgentOptions, ProcessError, Transport

from . import Berth, BerthError

__all__ = ["BerthTransport", "cli_args"]

#: Largest stdin frame sent: the server takes messages of at most 1 MiB.
FRAME = 512 << 10
#: The SDK's default cap on one CLI output line.
DEFAULT_MAX_BUFFER = 1 << 20


def cli_args(options: ClaudeAgentOptions) -> list[str]:
    """The CLI arguments the SDK would start a local CLI with (without the executable)."""
    from claude_agent_sdk._internal.transport.subprocess_cli import SubprocessCLITransport

    try:
        from claude_agent_sdk.types import _configure_can_use_tool

        options = _configure_can_use_tool(options)
    except ImportError:  # older SDKs: the same rule by hand
        if options.can_use_tool and not options.permission_prompt_tool_name:
            options = dataclasses.replace(options, permission_prompt_tool_name="stdio")
    # berth owns the executable: the path is only a placeholder for the SDK's argv builder.
    local = SubprocessCLITransport(prompt="", options=dataclasses.replace(options, cli_path="claude"))
    return local._build_command()[1:]


class BerthTransport(Transport):
    """Runs the SDK's CLI in a berth box. ``box``: a box id, a box spec (dict), or None for a
    new ephemeral box. ``url``/``api_key`` default to ``BERTH_URL``/``BERTH_TOKEN``.
    After :meth:`connect`, ``box_id`` and ``session_id`` name the box and the berth session."""

    def __init__(
        self,
        options: ClaudeAgentOptions,
        *,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
        box: Union[str, dict[str, Any], None] = None,
        reconnect_for: float = 30.0,
    ):
        self._options = options
        self._api = Berth(url, api_key)
        self._box = box
        self._reconnect_for = reconnect_for
        self.box_id: Optional[str] = None
        self.session_id: Optional[str] = None
        #: How many times the WebSocket was reconnected.
        self.reconnects = 0
        self._ws: Optional[ClientConnection] = None
        self._gen = 0
        self._stdout_offset = 0
        # Stdin written but maybe not yet taken by the server: bytes from `_stdin_base` on.
        self._stdin_log = bytearray()
        self._stdin_base = 0
        self._lock = anyio.Lock()
        self._ready = False
        self._closed = False
        self._exit: Optional[dict[str, Any]] = None
        self._max_buffer = getattr(options, "max_buffer_size", None) or DEFAULT_MAX_BUFFER

    # ---- Transport ----

    async def connect(self) -> None:
        if self._ws is not None:
            return
        args = cli_args(self._options)
        agent = {"kind": "claude", "client": "sdk", "args": args}
        try:
            s = await anyio.to_thread.run_sync(
                lambda: self._api.create_session(agent, box=self._box)
            )
        except BerthError as e:
            raise CLIConnectionError(f"berth refused the session: {e}") from e
        self.session_id = s["id"]
        self.box_id = s["box_id"]
        async with self._lock:
            await self._open()
        self._ready = True

    async def write(self, data: str) -> None:
        if self._closed:
            raise CLIConnectionError("transport is closed")
        b = data.encode()
        async with self._lock:
            self._stdin_log += b
            gen, ws = self._gen, self._ws
            try:
                assert ws is not None
                await _send(ws, b)
                return
            except websockets.ConnectionClosed:
                pass
        # The reconnect resends everything logged above that the server had not taken.
        await self._reconnect(gen)

    async def end_input(self) -> None:
        msg = json.dumps({"type": "end_input"})
        while not self._closed:
            async with self._lock:
                gen, ws = self._gen, self._ws
                try:
                    assert ws is not None
                    await ws.send(msg)
                    return
                except websockets.ConnectionClosed:
                    pass
            await self._reconnect(gen)

    def read_messages(self) -> AsyncIterator[dict[str, Any]]:
        return self._read()

    async def close(self) -> None:
        self._closed = True
        self._ready = False
        with anyio.move_on_after(5):
            if self._ws is not None:
                await self._ws.close()
        if self.session_id is not None and self._exit is None:
            # The CLI ends with its client (and an ephemeral box with its session).
            sid = self.session_id
            with anyio.move_on_after(15):
                try:
                    await anyio.to_thread.run_sync(lambda: self._api.delete_session(sid), abandon_on_cancel=True)
                except BerthError:
                    pass

    def is_ready(self) -> bool:
        return self._ready

    # ---- for tests: cut the connection as a network failure would ----

    def _drop_connection(self) -> None:
        if self._ws is not None and self._ws.transport is not None:
            self._ws.transport.abort()

    # ---- internals ----

    def _ws_url(self) -> str:
        u = self._api.url
        u = "ws" + u[4:] if u.startswith("http") else u
        return f"{u}/v1/sessions/{self.session_id}/sdk?stdout_offset={self._stdout_offset}"

    async def _open(self) -> None:
        """Connect, read the hello, resend the stdin the server has not taken (lock held)."""
        ws = await ws_connect(
            self._ws_url(),
            additional_headers={"Authorization": f"Bearer {self._api.api_key}"},
            max_size=32 << 20,
            open_timeout=15,
        )
        hello = json.loads(await ws.recv())
        if hello.get("type") != "hello":
            await ws.close()
            raise CLIConnectionError(f"unexpected first frame from berth: {hello}")
        taken = int(hello["stdin_offset"])
        end = self._stdin_base + len(self._stdin_log)
        if not self._stdin_base <= taken <= end:
            await ws.close()
            raise CLIConnectionError(f"berth took {taken} stdin bytes; this client wrote {end}")
        self._trim(taken)
        if self._stdin_log:
            await _send(ws, bytes(self._stdin_log))
        self._ws = ws
        self._gen += 1

    def _trim(self, taken: int) -> None:
        """Forget the stdin the server has taken (offsets out of range are ignored)."""
        if self._stdin_base <= taken <= self._stdin_base + len(self._stdin_log):
            del self._stdin_log[: taken - self._stdin_base]
            self._stdin_base = taken

    async def _reconnect(self, gen: int) -> None:
        async with self._lock:
            if self._gen != gen or self._closed:
                return  # someone else already did
            self.reconnects += 1
            delay = 0.1
            with anyio.move_on_after(self._reconnect_for):
                while True:
                    try:
                        await self._open()
                        return
                    except (OSError, websockets.WebSocketException) as e:
                        if isinstance(e, websockets.InvalidStatus) and e.response.status_code in (400, 401, 403, 404, 409):
                            raise CLIConnectionError(f"berth refused the reconnect: {e}") from e
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 2.0)
            raise CLIConnectionError(f"could not reconnect to berth within {self._reconnect_for} s")

    async def _read(self) -> AsyncIterator[dict[str, Any]]:
        pending = bytearray()
        while True:
            gen, ws = self._gen, self._ws
            if ws is None:
                raise CLIConnectionError("not connected")
            try:
                frame = await ws.recv()
            except websockets.ConnectionClosed as e:
                if self._exit is not None or self._closed:
                    break
                code = e.rcvd.code if e.rcvd is not None else None
                if code in (4001, 4002, 1008):
                    raise CLIConnectionError(f"berth closed the session's connection: {e.rcvd.reason if e.rcvd else e}") from e
                await self._reconnect(gen)
                continue
            if isinstance(frame, str):
                msg = json.loads(frame)
                if msg.get("type") == "exit":
                    self._exit = msg
                elif msg.get("type") == "stdin_taken" and gen == self._gen:
                    self._trim(int(msg["offset"]))
                elif msg.get("type") == "error":
                    raise CLIConnectionError(f"berth: {msg.get('error')}")
                continue
            self._stdout_offset += len(frame)
            pending += frame
            while (i := pending.find(b"\n")) >= 0:
                line = bytes(pending[:i]).strip()
                del pending[: i + 1]
                if line:
                    try:
                        yield json.loads(line)
                    except ValueError:
                        continue  # not a protocol line (the SDK skips these too)
            if len(pending) > self._max_buffer:
                raise CLIConnectionError(
                    f"a CLI output line exceeded max_buffer_size ({self._max_buffer} bytes)"
                )
        if pending.strip():
            try:
                yield json.loads(bytes(pending))
            except ValueError:
                pass
        code = (self._exit or {}).get("code")
        if self._exit is not None and code not in (0, None):
            raise ProcessError(f"Command failed with exit code {code}", exit_code=code, stderr="see the berth session's events")


async def _send(ws: ClientConnection, b: bytes) -> None:
    """Send stdin bytes in frames the server takes (the relay passes bytes, not messages)."""
    for i in range(0, len(b), FRAME):
        await ws.send(b[i : i + FRAME])
