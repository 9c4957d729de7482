"""The unchanged claude-agent-sdk driving berth's pinned CLI in a berth box through
BerthTransport; the mock model's scripted rules (in sdk_clients.rs) decide what the agent does."""

import json
import os
import time
from typing import Any

import anyio
import pytest
from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    CLIConnectionError,
    HookMatcher,
    PermissionResultAllow,
    PermissionResultDeny,
    ResultMessage,
    SystemMessage,
    TextBlock,
    ToolResultBlock,
    UserMessage,
    create_sdk_mcp_server,
    query,
    tool,
)

from berth import Berth, BerthError
from berth.agent_sdk import BerthTransport

pytestmark = pytest.mark.anyio

# Every test is bounded: a hang fails instead of holding CI.
LIMIT_S = 120


def texts(messages: list[Any]) -> list[str]:
    return [b.text for m in messages if isinstance(m, AssistantMessage) for b in m.content if isinstance(b, TextBlock)]


def tool_results(messages: list[Any]) -> list[ToolResultBlock]:
    return [b for m in messages if isinstance(m, UserMessage) and isinstance(m.content, list)
            for b in m.content if isinstance(b, ToolResultBlock)]


def ended(api: Berth, sid: str) -> dict:
    """The session once it has ended (its stream of events is then finite), within 30 s."""
    deadline = time.monotonic() + 30
    while True:
        s = api.get_session(sid)
        if s["state"] in ("stopped", "failed"):
            return s
        assert time.monotonic() < deadline, f"session {sid} still {s['state']}"
        time.sleep(0.05)


async def prompt_stream(text: str):
    """A streaming prompt (the SDK needs one for can_use_tool)."""
    yield {"type": "user", "message": {"role": "user", "content": text}, "parent_tool_use_id": None}


async def test_query_runs_bash_in_the_box_with_callbacks_answered_here(api: Berth, box: str, real_key: str):
    asked: list[tuple[str, dict]] = []
    hooked: list[str] = []

    async def can_use_tool(name, tool_input, _ctx):
        asked.append((name, tool_input))
        return PermissionResultAllow()

    async def pre_tool_use(hook_input, _tool_use_id, _ctx):
        hooked.append(hook_input["tool_name"])
        return {}

    opts = ClaudeAgentOptions(
        can_use_tool=can_use_tool,
        hooks={"PreToolUse": [HookMatcher(matcher="Bash", hooks=[pre_tool_use])]},
    )
    t = BerthTransport(opts, box=box)
    messages = []
    with anyio.fail_after(LIMIT_S):
        async for m in query(prompt=prompt_stream("sdk: write a file"), options=opts, transport=t):
            messages.append(m)
    assert t.box_id == box and t.session_id and t.session_id.startswith("ses")
    assert isinstance(messages[-1], ResultMessage) and messages[-1].subtype == "success", messages[-1]
    assert "wrote" in texts(messages)
    assert [n for n, _ in asked] == ["Bash"], asked
    assert "sdk.txt" in asked[0][1]["command"]
    assert hooked == ["Bash"]
    # The command ran in the box, not here.
    assert api.read_file(box, "sdk.txt") == b"from-sdk\n"
    assert not os.path.exists("/workspace/sdk.txt")
    # The CLI in the box talked to berth's gateway with a session token; the real key is
    # neither in the box nor in anything this client received.
    env = api.read_file(box, "env.txt").decode()
    assert "ANTHROPIC_BASE_URL=http://127.0.0.1:" in env
    assert real_key not in env
    assert real_key not in repr(messages)
    # The session's events and usage are berth's as for any session.
    ended(api, t.session_id)
    kinds = [e["type"] for e in api.events(t.session_id)]
    assert "user" in kinds and "result" in kinds and "tool_use" in kinds, kinds
    usage = api.session_usage(t.session_id)
    assert usage["total"]["output_tokens"] > 0, usage


async def test_a_denied_tool_is_not_run(api: Berth, box: str):
    async def deny(name, _input, _ctx):
        return PermissionResultDeny(message="no touching in this test")

    opts = ClaudeAgentOptions(can_use_tool=deny)
    messages = []
    with anyio.fail_after(LIMIT_S):
        async for m in query(prompt=prompt_stream("sdk: denied"), options=opts, transport=BerthTransport(opts, box=box)):
            messages.append(m)
    results = tool_results(messages)
    assert results and results[0].is_error, results
    assert "no touching in this test" in json.dumps(results[0].content)
    r = api.exec(box, ["sh", "-c", "test -e /workspace/denied.txt; echo $?"])
    assert r["stdout"].strip() == "1", "the CLI ran a tool the client denied"


async def test_an_in_process_mcp_tool_is_called_by_the_agent_in_the_box(box: str):
    calls: list[dict] = []

    @tool("add", "Add two numbers", {"a": int, "b": int})
    async def add(args):
        calls.append(args)
        return {"content": [{"type": "text", "text": f"sum={args['a'] + args['b']}"}]}

    opts = ClaudeAgentOptions(
        mcp_servers={"calc": create_sdk_mcp_server("calc", tools=[add])},
        allowed_tools=["mcp__calc__add"],
    )
    messages = []
    with anyio.fail_after(LIMIT_S):
        async for m in query(prompt=prompt_stream("sdk: mcp"), options=opts, transport=BerthTransport(opts, box=box)):
            messages.append(m)
    assert calls == [{"a": 2, "b": 3}]
    assert any("sum=5" in json.dumps(r.content) for r in tool_results(messages)), messages
    assert "added" in texts(messages)


async def test_interrupt_then_a_second_turn_in_the_same_client(api: Berth, box: str):
    opts = ClaudeAgentOptions()
    t = BerthTransport(opts, box=box)
    with anyio.fail_after(LIMIT_S):
        async with ClaudeSDKClient(opts, transport=t) as client:
            await client.query("sdk: slow")
            start = time.monotonic()
            first: list[Any] = []
            async for m in client.receive_response():
                first.append(m)
                if isinstance(m, SystemMessage) and m.subtype == "init":
                    # The model's answer is 30 s away: interrupt the turn.
                    await client.interrupt()
            assert time.monotonic() - start < 25, "the interrupt did not end the turn"
            assert isinstance(first[-1], ResultMessage), first[-1]
            assert "late" not in texts(first)
            await client.query("sdk: hello")
            second = [m async for m in client.receive_response()]
            assert "hello from the mock" in texts(second)
            assert isinstance(second[-1], ResultMessage) and not second[-1].is_error
            # The control requests the CLI answers go through the relay as well.
            await client.set_permission_mode("acceptEdits")
            await client.set_model("claude-haiku-4-5-sdk-test")
            await client.query("sdk: hello")
            third = [m async for m in client.receive_response()]
            models = [m.model for m in third if isinstance(m, AssistantMessage)]
            assert models and all(m == "claude-haiku-4-5-sdk-test" for m in models), third
            sid = t.session_id
    ended(api, sid)
    kinds = [e["data"] for e in api.events(sid) if e["type"] == "status"]
    assert any(d.get("interrupt") for d in kinds), kinds


async def test_a_dropped_socket_reconnects_without_losing_output(api: Berth, box: str):
    opts = ClaudeAgentOptions()
    t = BerthTransport(opts, box=box)
    with anyio.fail_after(LIMIT_S):
        async with ClaudeSDKClient(opts, transport=t) as client:
            await client.query("sdk: reconnect")
            got: list[Any] = []
            async for m in client.receive_response():
                got.append(m)
                if isinstance(m, SystemMessage) and m.subtype == "init" and t.reconnects == 0:
                    # The model answers in 1.5 s: its output arrives while this client is away.
                    t._drop_connection()
            sid = t.session_id
    assert t.reconnects == 1
    # Nothing repeated: the init came before the drop and only then.
    inits = [m for m in got if isinstance(m, SystemMessage) and m.subtype == "init"]
    assert len(inits) == 1, got
    assert texts(got) == ["after the drop"], got
    assert isinstance(got[-1], ResultMessage) and got[-1].subtype == "success"
    # Everything the CLI wrote reached this client exactly once: the same assistant and result
    # messages as the session's own record of the CLI's output.
    ended(api, sid)
    events = list(api.events(sid))
    assert len([e for e in events if e["type"] == "assistant"]) == len([m for m in got if isinstance(m, AssistantMessage)])
    assert len([e for e in events if e["type"] == "result"]) == 1


async def test_arguments_off_the_allowlist_are_refused_by_name(api: Berth):
    for args, named in [
        (["--dangerously-skip-permissions"], "--dangerously-skip-permissions"),
        (["/bin/sh", "-c", "id"], "/bin/sh"),
        (["--output-format", "text"], "--output-format"),
        (["--settings", '{"env": {"ANTHROPIC_BASE_URL": "http://elsewhere"}}'], "--settings"),
    ]:
        with pytest.raises(BerthError) as e:
            api.create_session({"kind": "claude", "client": "sdk", "args": args})
        assert e.value.status == 400 and f'"{named}"' in e.value.message, e.value
    # Through the transport: the SDK's extra_args reach the same check.
    opts = ClaudeAgentOptions(extra_args={"dangerously-skip-permissions": None})
    with pytest.raises(CLIConnectionError, match="dangerously-skip-permissions"):
        await BerthTransport(opts).connect()
    # No session was left behind by the refusals.
    assert all(s["agent"].get("client") != "sdk" or s["state"] != "idle" for s in api.list_sessions())


async def test_stdin_is_forgotten_once_taken_and_writes_over_a_frame_pass(box: str):
    """The stdin kept for a reconnect is trimmed at the server's acknowledgements (it would
    otherwise hold every byte ever written), and one write larger than the server's 1 MiB
    message limit still passes (sent in frames)."""
    opts = ClaudeAgentOptions()
    t = BerthTransport(opts, box=box)
    with anyio.fail_after(LIMIT_S):
        await t.connect()
        try:
            async with anyio.create_task_group() as tg:
                async def drain() -> None:
                    async for _ in t.read_messages():
                        pass

                tg.start_soon(drain)
                # Heartbeats: lines the CLI takes and ignores.
                line = json.dumps({"type": "keep_alive", "pad": "x" * (100 << 10)}) + "\n"
                big = json.dumps({"type": "keep_alive", "pad": "x" * (3 << 19)}) + "\n"
                for _ in range(20):
                    await t.write(line)
                await t.write(big)
                total = 20 * len(line) + len(big)
                while not (t._stdin_base == total and not t._stdin_log):
                    assert t.reconnects == 0, "the connection was refused (a frame over the limit?)"
                    await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
        finally:
            await t.close()
