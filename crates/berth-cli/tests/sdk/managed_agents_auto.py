"""The `auto` permission policy with the official `anthropic` Python SDK, unchanged: a read-only
tool (glob) runs without asking, a writing one (write) asks, and the turn waits for the client's
`user.tool_confirmation`. Run by tests/managed_agents_stream.rs with BERTH_ANTHROPIC_URL and
BERTH_KEY; prints one JSON line. Any failed assertion exits non-zero."""

import json
import os

import anthropic

client = anthropic.Anthropic(
    base_url=os.environ["BERTH_ANTHROPIC_URL"], api_key=os.environ["BERTH_KEY"], max_retries=0, timeout=120
)
out = {"sdk": anthropic.__version__}

env = client.beta.environments.create(name="auto-env")
agent = client.beta.agents.create(
    name="auto-agent",
    model="claude-sonnet-4-5",
    tools=[{"type": "agent_toolset_20260401", "default_config": {"permission_policy": {"type": "auto"}}}],
)
assert agent.tools[0].default_config.permission_policy.type == "auto", agent.tools
session = client.beta.sessions.create(agent=agent.id, environment_id=env.id)

uses = []
confirmed = []
with client.beta.sessions.events.stream(session.id) as stream:
    client.beta.sessions.events.send(
        session.id,
        events=[{"type": "user.message", "content": [{"type": "text", "text": "look around then write"}]}],
    )
    for ev in stream:
        if ev.type == "agent.tool_use":
            uses.append({"id": ev.id, "name": ev.name, "permission": ev.evaluated_permission})
        if ev.type == "session.status_idle" and ev.stop_reason.type == "requires_action":
            asked = ev.stop_reason.event_ids[0]
            confirmed.append(asked)
            client.beta.sessions.events.send(
                session.id,
                events=[{"type": "user.tool_confirmation", "tool_use_id": asked, "result": "allow"}],
            )
        if ev.type == "session.status_idle" and ev.stop_reason.type == "end_turn":
            break

out["uses"] = uses
out["confirmed"] = confirmed
print(json.dumps(out))
