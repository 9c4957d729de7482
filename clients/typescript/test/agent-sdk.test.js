// The unchanged @anthropic-ai/claude-agent-sdk driving berth's CLI in a berth box. Run by
// crates/berth-cli/tests/sdk_clients.rs (BERTH_URL, BERTH_TOKEN, BERTH_TEST_REAL_KEY; the
// mock model's rules are there).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { query } from '@anthropic-ai/claude-agent-sdk';
import { Berth, BerthError } from '../src/index.js';
import { berthSpawn } from '../src/agent-sdk.js';

for (const k of ['BERTH_URL', 'BERTH_TOKEN', 'BERTH_TEST_REAL_KEY']) {
  assert.ok(process.env[k], `${k} must be set (run through the berth-cli sdk_clients test)`);
}
const api = new Berth();

test('a query with a canUseTool callback runs Bash in the box', { timeout: 120_000 }, async () => {
  const box = await api.createBox({ lifecycle: 'persistent', resources: { memory_mib: 1024, disk_mib: 256 } });
  try {
    const asked = [];
    let proc;
    const messages = [];
    const q = query({
      prompt: 'sdk: write a file',
      options: {
        spawnClaudeCodeProcess: berthSpawn({ box: box.id, onSpawn: (p) => { proc = p; } }),
        canUseTool: async (name, input) => {
          asked.push([name, input]);
          return { behavior: 'allow', updatedInput: input };
        },
      },
    });
    for await (const m of q) messages.push(m);
    const result = messages.at(-1);
    assert.equal(result.type, 'result');
    assert.equal(result.subtype, 'success');
    assert.deepEqual(asked.map(([n]) => n), ['Bash']);
    assert.equal(proc.boxId, box.id);
    assert.match(proc.sessionId, /^ses/);
    assert.equal((await api.readFile(box.id, 'sdk.txt')).toString(), 'from-sdk\n');
    const env = (await api.readFile(box.id, 'env.txt')).toString();
    assert.ok(!env.includes(process.env.BERTH_TEST_REAL_KEY), 'the real key reached the box');
    assert.ok(!JSON.stringify(messages).includes(process.env.BERTH_TEST_REAL_KEY));
    const kinds = [];
    for await (const e of api.events(proc.sessionId)) kinds.push(e.type);
    assert.ok(kinds.includes('result') && kinds.includes('tool_use'), kinds.join(','));
  } finally {
    await api.deleteBox(box.id);
  }
});

test('a denied tool is not run', { timeout: 120_000 }, async () => {
  const box = await api.createBox({ lifecycle: 'persistent', resources: { memory_mib: 1024, disk_mib: 256 } });
  try {
    const messages = [];
    const q = query({
      prompt: 'sdk: denied',
      options: {
        spawnClaudeCodeProcess: berthSpawn({ box: box.id }),
        canUseTool: async () => ({ behavior: 'deny', message: 'not from node either' }),
      },
    });
    for await (const m of q) messages.push(m);
    assert.ok(JSON.stringify(messages).includes('not from node either'));
    const r = await api.exec(box.id, ['sh', '-c', 'test -e /workspace/denied.txt; echo $?']);
    assert.equal(r.stdout.trim(), '1');
  } finally {
    await api.deleteBox(box.id);
  }
});

test('arguments off the allowlist are refused by name', async () => {
  await assert.rejects(
    api.createSession({ kind: 'claude', client: 'sdk', args: ['--dangerously-skip-permissions'] }),
    (e) => e instanceof BerthError && e.status === 400 && e.detail.includes('"--dangerously-skip-permissions"'),
  );
});

test('stdin is forgotten once the server took it, and a write over a frame passes', { timeout: 120_000 }, async () => {
  const box = await api.createBox({ lifecycle: 'persistent', resources: { memory_mib: 1024, disk_mib: 256 } });
  let proc;
  try {
    proc = berthSpawn({ box: box.id })({ args: [] });
    proc.stdout.resume();
    const failed = new Promise((_, reject) => proc.on('error', reject));
    await Promise.race([new Promise((resolve) => proc.on('session', resolve)), failed]);
    // Heartbeats: lines the CLI takes and ignores; the last one is over the server's 1 MiB limit.
    const line = JSON.stringify({ type: 'keep_alive', pad: 'x'.repeat(100 << 10) }) + '\n';
    const big = JSON.stringify({ type: 'keep_alive', pad: 'x'.repeat(3 << 19) }) + '\n';
    for (let i = 0; i < 20; i++) proc.stdin.write(line);
    proc.stdin.write(big);
    const total = 20 * line.length + big.length;
    const deadline = Date.now() + 60_000;
    while (!(proc.stdinBase === total && proc.stdinLogLength === 0 && proc.stdinLog.length === 0)) {
      assert.ok(Date.now() < deadline, `taken ${proc.stdinBase} of ${total}, kept ${proc.stdinLogLength}`);
      assert.equal(proc.reconnects, 0, 'the connection was refused (a frame over the limit?)');
      await Promise.race([new Promise((r) => setTimeout(r, 50)), failed]);
    }
  } finally {
    proc?.kill('SIGTERM');
    await api.deleteBox(box.id);
  }
});
