"""Time from starting a ClaudeSDKClient to its first assistant message, with the SDK's own
local transport (the CLI as a child process talking to the model directly) and with
BerthTransport (the CLI in an existing berth box behind the gateway), alternating runs.
Run by `berth-bench sdk`, which starts the mock model and the server and prints the table.

Env: BERTH_URL, BERTH_TOKEN, BERTH_BENCH_BOX, BERTH_CLAUDE_BIN, BERTH_BENCH_MOCK_URL.
Prints {"local": [ms, ...], "berth": [ms, ...]}.
"""

import json
import os
import sys
import tempfile
import time

import anyio
from claude_agent_sdk import AssistantMessage, ClaudeAgentOptions, ClaudeSDKClient

from berth.agent_sdk import BerthTransport


async def first_answer(opts: ClaudeAgentOptions, transport=None) -> float:
    t0 = time.perf_counter()
    async with ClaudeSDKClient(opts, transport=transport) as c:
        await c.query("hello")
        async for m in c.receive_messages():
            if isinstance(m, AssistantMessage):
                took = time.perf_counter() - t0
                break
    return took * 1000


async def main(runs: int) -> None:
    out: dict[str, list[float]] = {"local": [], "berth": []}
    scratch = tempfile.mkdtemp()
    for i in range(runs):
        local = ClaudeAgentOptions(
            cli_path=os.environ["BERTH_CLAUDE_BIN"],
            cwd=scratch,
            env={
                "ANTHROPIC_BASE_URL": os.environ["BERTH_BENCH_MOCK_URL"],
                "ANTHROPIC_API_KEY": "sk-bench",
                "CLAUDE_CONFIG_DIR": f"{scratch}/cfg{i}",
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            },
        )
        with anyio.fail_after(60):
            out["local"].append(await first_answer(local))
        opts = ClaudeAgentOptions()
        with anyio.fail_after(60):
            out["berth"].append(await first_answer(opts, BerthTransport(opts, box=os.environ["BERTH_BENCH_BOX"])))
    print(json.dumps(out))


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]))
