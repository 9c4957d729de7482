"""Live previews (`event_deltas`) with the official `anthropic` Python SDK, unchanged: a stream
that asks for `agent.message` previews gets `event_start` and `event_delta` frames before the
`agent.message` they preview, under its id, and the SDK's own accumulator folds them into that
message's text; a stream that does not ask gets none, the event list never has them, and an
unknown preview type is refused. Run by tests/managed_agents_live.rs with BERTH_ANTHROPIC_URL and
BERTH_KEY; prints one JSON line. Any failed assertion exits non-zero."""

import json
import os
import threading

import anthropic
from anthropic.lib.sessions import accumulate_managed_agents_event

client = anthropic.Anthropic(
    base_url=os.environ["BERTH_ANTHROPIC_URL"], api_key=os.environ["BERTH_KEY"], max_retries=0, timeout=120
)
out = {"sdk": anthropic.__version__}

env = client.beta.environments.create(name="preview-env")
agent = client.beta.agents.create(name="previewer", model="claude-sonnet-4-5")
session = client.beta.sessions.create(agent=agent.id, environment_id=env.id)

try:
    with client.beta.sessions.events.stream(session.id, event_deltas=["agent.reply"]) as s:
        next(iter(s))
    raise AssertionError("an unknown preview type was accepted")
except anthropic.BadRequestError:
    out["refused"] = True

# A second connection without event_deltas reads the same turn: it must see no previews.
plain = []
plain_open = threading.Event()


def read_plain():
    with client.beta.sessions.events.stream(session.id) as s:
        plain_open.set()
        for ev in s:
            plain.append(ev.type)
            if ev.type == "session.status_idle":
                break


reader = threading.Thread(target=read_plain)
reader.start()
plain_open.wait(30)

frames = []
snapshot = None
snapshots = []
with client.beta.sessions.events.stream(session.id, event_deltas=["agent.message", "agent.thinking"]) as stream:
    client.beta.sessions.events.send(
        session.id,
        events=[{"type": "user.message", "content": [{"type": "text", "text": "tell me a long story"}]}],
    )
    for ev in stream:
        snapshot = accumulate_managed_agents_event(snapshot, ev)
        if ev.type == "event_start":
            frames.append({"type": ev.type, "event_type": ev.event.type, "id": ev.event.id})
        elif ev.type == "event_delta":
            frames.append({"type": ev.type, "id": ev.event_id, "text": ev.delta.content.text})
            snapshots.append(snapshot.content[0].text)
        else:
            f = {"type": ev.type, "id": ev.id}
            if ev.type == "agent.message":
                f["text"] = "".join(b.text for b in ev.content)
                # The preview is replaced by the stored event, which it matched.
                assert snapshot.id == ev.id and snapshot.content[0].text == f["text"], (snapshot, ev)
            frames.append(f)
        if ev.type == "session.status_idle":
            break
reader.join(60)

out["frames"] = frames
out["snapshots"] = snapshots
out["plain"] = plain
out["listed"] = [e.type for e in client.beta.sessions.events.list(session.id)]
print(json.dumps(out))
