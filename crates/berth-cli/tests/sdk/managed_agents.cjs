// The official TypeScript SDK `@anthropic-ai/sdk` (pinned in scripts/versions), unchanged,
// against berth's Managed Agents API: agent → environment → session, a message streamed to
// `end_turn`, the list equal to the stream, pages, and the SDK's own error classes. Run by
// tests/managed_agents.rs (BERTH_ANTHROPIC_URL, BERTH_KEY; NODE_PATH finds the SDK, so this is
// CommonJS: ES modules ignore NODE_PATH); prints one
// JSON line; a failed check exits non-zero.
const assert = require('node:assert/strict');
const sdk = require('@anthropic-ai/sdk');
const Anthropic = sdk.default ?? sdk;

async function main() {

const baseURL = process.env.BERTH_ANTHROPIC_URL;
const client = new Anthropic({ baseURL, apiKey: process.env.BERTH_KEY, maxRetries: 0 });

const env = await client.beta.environments.create({ name: 'ts-env' });
const agent = await client.beta.agents.create({
  name: 'ts-agent',
  model: 'claude-sonnet-4-5',
  tools: [{ type: 'agent_toolset_20260401' }],
});
assert.equal(agent.version, 1);
const session = await client.beta.sessions.create({ agent: agent.id, environment_id: env.id });
assert.equal(session.status, 'idle');

const stream = await client.beta.sessions.events.stream(session.id);
await client.beta.sessions.events.send(session.id, {
  events: [{ type: 'user.message', content: [{ type: 'text', text: 'please make a file' }] }],
});
const streamed = [];
for await (const ev of stream) {
  streamed.push(ev);
  if (ev.type === 'session.status_idle') break;
}
const types = streamed.map((e) => e.type);
for (const t of ['user.message', 'agent.message', 'agent.tool_use', 'agent.tool_result', 'session.status_idle']) {
  assert.ok(types.includes(t), `${t} in ${types}`);
}
assert.equal(streamed.at(-1).stop_reason.type, 'end_turn');

const listed = [];
for await (const ev of client.beta.sessions.events.list(session.id, { limit: 2 })) listed.push(ev.id);
assert.deepEqual(listed, streamed.map((e) => e.id));

const got = await client.beta.sessions.retrieve(session.id);
await assert.rejects(client.beta.agents.retrieve('agent_nope'), Anthropic.NotFoundError);
const bad = new Anthropic({ baseURL, apiKey: 'berth_wrong', maxRetries: 0 });
await assert.rejects(bad.beta.agents.list(), Anthropic.AuthenticationError);
await client.beta.sessions.delete(session.id);
console.log(JSON.stringify({ usage: { input_tokens: got.usage.input_tokens, output_tokens: got.usage.output_tokens }, types }));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
