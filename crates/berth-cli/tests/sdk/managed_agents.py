"""The official `anthropic` Python SDK (pinned in scripts/versions), unchanged, against berth's
Managed Agents API. Run by tests/managed_agents.rs with BERTH_ANTHROPIC_URL, BERTH_KEY and
BERTH_OTHER_KEY (a key of another tenant); prints one JSON line the Rust side checks against the
mock model. Any failed assertion exits non-zero."""

import json
import os
import sys

import anthropic

url = os.environ["BERTH_ANTHROPIC_URL"]
key = os.environ["BERTH_KEY"]
other_key = os.environ["BERTH_OTHER_KEY"]

client = anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=120)
other = anthropic.Anthropic(base_url=url, api_key=other_key, max_retries=0, timeout=30)
out = {"sdk": anthropic.__version__}


def expect(exc, fn):
    try:
        fn()
    except exc as e:
        assert e.request_id and e.request_id.startswith("req_"), e.request_id
        body = e.body if isinstance(e.body, dict) else {}
        assert body.get("type") == "error", e.body
        return e
    except Exception as e:  # the wrong class is a failure, named
        raise AssertionError(f"expected {exc.__name__}, got {type(e).__name__}: {e}")
    raise AssertionError(f"expected {exc.__name__}, nothing raised")


# Environment and agent, with versions.
env = client.beta.environments.create(
    name="sdk-env",
    config={"type": "cloud", "networking": {"type": "limited", "allowed_hosts": ["example.com"]}},
)
assert env.id.startswith("env_") and env.config.networking.type == "limited", env
agent = client.beta.agents.create(
    name="sdk-agent",
    model="claude-sonnet-4-5",
    system="Be brief.",
    tools=[{"type": "agent_toolset_20260401"}],
    metadata={"team": "berth"},
)
assert agent.version == 1 and agent.model.id == "claude-sonnet-4-5", agent
v2 = client.beta.agents.update(agent.id, version=1, description="second")
assert v2.version == 2 and v2.description == "second" and v2.system == "Be brief.", v2
# A stale version is a conflict, and the SDK raises its own class for it.
expect(anthropic.ConflictError, lambda: client.beta.agents.update(agent.id, version=1, name="x"))
assert client.beta.agents.retrieve(agent.id, version=1).description is None
assert [a.version for a in client.beta.agents.versions.list(agent.id)] == [2, 1]

# Several pages of agents, walked by the SDK's own iterator.
for i in range(4):
    client.beta.agents.create(name=f"filler-{i}", model="claude-sonnet-4-5")
walked = [a.id for a in client.beta.agents.list(limit=2)]
assert len(walked) == 5 and len(set(walked)) == 5, walked
first = client.beta.agents.list(limit=2)
assert len(first.data) == 2 and first.next_page, first

# A session: stream opened before the message, read to the end of the turn.
session = client.beta.sessions.create(agent=agent.id, environment_id=env.id, title="sdk")
assert session.id.startswith("sesn_") and session.status == "idle", session
assert session.agent.version == 2, session.agent
streamed = []
with client.beta.sessions.events.stream(session.id) as stream:
    sent = client.beta.sessions.events.send(
        session.id,
        events=[{"type": "user.message", "content": [{"type": "text", "text": "please make a file"}]}],
    )
    assert sent.data[0].type == "user.message", sent
    for ev in stream:
        streamed.append(ev)
        if ev.type == "session.status_idle":
            assert ev.stop_reason.type == "end_turn", ev
            break
types = [e.type for e in streamed]
out["streamed_types"] = types
for t in ["user.message", "session.status_running", "span.model_request_start", "agent.message",
          "agent.tool_use", "agent.tool_result", "span.model_request_end", "session.usage",
          "session.status_idle"]:
    assert t in types, (t, types)
tool_uses = {e.id: e for e in streamed if e.type == "agent.tool_use"}
assert [e.name for e in tool_uses.values()] == ["write", "bash"], list(tool_uses.values())
results = [e for e in streamed if e.type == "agent.tool_result"]
assert all(r.tool_use_id in tool_uses for r in results), results
assert any("Hello from an agent" in r.to_json() for r in results), results
ends = [e for e in streamed if e.type == "span.model_request_end"]
out["span_output_tokens"] = sum(e.model_usage.output_tokens for e in ends)
out["span_input_tokens"] = sum(e.model_usage.input_tokens for e in ends)

# The list holds what streamed, in the same order; pages of 3 give the same.
listed = list(client.beta.sessions.events.list(session.id))
assert [(e.id, e.type) for e in listed] == [(e.id, e.type) for e in streamed], (listed, streamed)
paged = list(client.beta.sessions.events.list(session.id, limit=3))
assert [e.id for e in paged] == [e.id for e in listed]
only = list(client.beta.sessions.events.list(session.id, types=["agent.tool_use"]))
assert [e.id for e in only] == list(tool_uses), only
newest = client.beta.sessions.events.list(session.id, order="desc", limit=1)
assert newest.data[0].id == listed[-1].id

# Usage comes from berth's metered ledger.
got = client.beta.sessions.retrieve(session.id)
assert got.status == "idle", got.status
out["usage"] = {"input_tokens": got.usage.input_tokens, "output_tokens": got.usage.output_tokens}
# The turn's session.usage event carries the same (metered) totals.
usage_events = [e for e in streamed if e.type == "session.usage"]
assert len(usage_events) == 1, types
u = usage_events[0].usage
assert (u.input_tokens, u.output_tokens) == (got.usage.input_tokens, got.usage.output_tokens), (u, got.usage)

# Sessions in both directions, and a status filter.
s2 = client.beta.sessions.create(agent={"type": "agent", "id": agent.id, "version": 1}, environment_id=env.id)
assert s2.agent.version == 1
s3 = client.beta.sessions.create(
    agent={"type": "agent_with_overrides", "id": agent.id, "system": "Overridden."}, environment_id=env.id
)
assert s3.agent.system == "Overridden." and s3.agent.version == 2, s3.agent
forward = [s.id for s in client.beta.sessions.list(limit=1)]
assert forward == [s3.id, s2.id, session.id], forward
page = client.beta.sessions.list(limit=1)
while page.next_page:
    page = client.beta.sessions.list(limit=1, page=page.next_page)
backward = [page.data[0].id]
while page.prev_page:
    page = client.beta.sessions.list(limit=1, page=page.prev_page)
    backward.append(page.data[0].id)
assert backward == [session.id, s2.id, s3.id], backward
asc = [s.id for s in client.beta.sessions.list(order="asc")]
assert asc == [session.id, s2.id, s3.id], asc
archived = client.beta.sessions.archive(s2.id)
assert archived.status == "terminated" and archived.archived_at is not None
assert [s.id for s in client.beta.sessions.list()] == [s3.id, session.id]
idle = [s.id for s in client.beta.sessions.list(statuses=["idle"], include_archived=True)]
assert idle == [s3.id, session.id], idle
deleted = client.beta.sessions.delete(s3.id)
assert deleted.type == "session_deleted"

# Errors: the SDK's own classes, from Anthropic's envelope.
expect(anthropic.NotFoundError, lambda: client.beta.agents.retrieve("agent_nope"))
expect(anthropic.NotFoundError, lambda: client.beta.sessions.retrieve(s3.id))
expect(anthropic.NotFoundError, lambda: other.beta.sessions.retrieve(session.id))
expect(anthropic.NotFoundError, lambda: other.beta.agents.retrieve(agent.id))
assert list(other.beta.agents.list()) == []
bad = anthropic.Anthropic(base_url=url, api_key="berth_wrong", max_retries=0)
expect(anthropic.AuthenticationError, lambda: bad.beta.agents.list())
expect(anthropic.BadRequestError, lambda: client.beta.environments.create(
    name="open", config={"type": "cloud", "networking": {"type": "unrestricted"}}))
expect(anthropic.ConflictError, lambda: client.beta.environments.create(name="sdk-env"))

client.beta.sessions.delete(session.id)
print(json.dumps(out))
