"""A custom tool round trip with the official `anthropic` Python SDK, unchanged: the agent's
model calls the client's tool, the client sees `agent.custom_tool_use` and the session idle with
`requires_action`, sends `user.custom_tool_result`, and the turn ends. Run by
tests/managed_agents_tools.rs with BERTH_ANTHROPIC_URL and BERTH_KEY; prints one JSON line the
Rust side checks against the mock model. Any failed assertion exits non-zero."""

import json
import os

import anthropic

client = anthropic.Anthropic(
    base_url=os.environ["BERTH_ANTHROPIC_URL"], api_key=os.environ["BERTH_KEY"], max_retries=0, timeout=120
)
out = {"sdk": anthropic.__version__}

env = client.beta.environments.create(name="custom-env")
agent = client.beta.agents.create(
    name="weather-agent",
    model="claude-sonnet-4-5",
    tools=[
        {
            "type": "custom",
            "name": "get_weather",
            "description": "The weather in a city, from the client.",
            "input_schema": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        }
    ],
)
assert agent.tools[0].type == "custom" and agent.tools[0].name == "get_weather", agent.tools
session = client.beta.sessions.create(agent=agent.id, environment_id=env.id)

streamed = []
answered = None
with client.beta.sessions.events.stream(session.id) as stream:
    client.beta.sessions.events.send(
        session.id,
        events=[{"type": "user.message", "content": [{"type": "text", "text": "what is the weather in Paris?"}]}],
    )
    for ev in stream:
        streamed.append(ev)
        if ev.type == "agent.custom_tool_use":
            assert ev.name == "get_weather" and ev.input == {"city": "Paris"}, ev
        if ev.type == "session.status_idle" and ev.stop_reason.type == "requires_action":
            uses = [e for e in streamed if e.type == "agent.custom_tool_use"]
            assert [u.id for u in uses] == ev.stop_reason.event_ids, (uses, ev)
            # Waiting on the client: the session says so.
            assert client.beta.sessions.retrieve(session.id).status == "idle"
            sent = client.beta.sessions.events.send(
                session.id,
                events=[
                    {
                        "type": "user.custom_tool_result",
                        "custom_tool_use_id": uses[0].id,
                        "content": [{"type": "text", "text": "sunny, 21 C in Paris"}],
                    }
                ],
            )
            assert sent.data[0].type == "user.custom_tool_result", sent
            answered = uses[0].id
        if ev.type == "session.status_idle" and ev.stop_reason.type == "end_turn":
            break

types = [e.type for e in streamed]
out["types"] = types
assert answered, types
results = [e for e in streamed if e.type == "user.custom_tool_result"]
assert len(results) == 1 and results[0].custom_tool_use_id == answered, results
assert "sunny, 21 C in Paris" in results[0].to_json(), results[0]
# After the result the turn ran again and ended with the model's text.
after = types[types.index("user.custom_tool_result"):]
assert "session.status_running" in after and "agent.message" in after, types
# The list holds what streamed.
listed = list(client.beta.sessions.events.list(session.id))
assert [(e.id, e.type) for e in listed] == [(e.id, e.type) for e in streamed], (listed, streamed)

# A second answer to the same use is refused, as is an answer to something else.
for bad in [answered, streamed[0].id]:
    try:
        client.beta.sessions.events.send(
            session.id,
            events=[{"type": "user.custom_tool_result", "custom_tool_use_id": bad, "content": []}],
        )
        raise AssertionError(f"a result for {bad} was taken")
    except anthropic.APIStatusError as e:
        assert e.status_code in (400, 409), e
        out.setdefault("refused", []).append(e.status_code)

client.beta.sessions.delete(session.id)
print(json.dumps(out))
