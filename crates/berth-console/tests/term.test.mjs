// The console's terminal emulator against hostile output from a box: escape sequences with
// huge counts end at once (clamped to the screen), and the screen keeps its size. Each case
// runs in a child process with a deadline, so an unclamped loop fails instead of hanging.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const term = fileURLToPath(new URL('../assets/term.js', import.meta.url));

function run(sequence) {
  // No DOM: the emulator's parser and screen, without the element it renders into.
  const script = `
    const { Terminal } = await import(${JSON.stringify(term)});
    const t = Object.create(Terminal.prototype);
    t.cols = 80; t.rows = 24; t.reset();
    t.csi(${JSON.stringify(sequence[0])}, ${JSON.stringify(sequence[1])});
    const widths = new Set(t.screen.map((r) => r.length));
    console.log(JSON.stringify({ rows: t.screen.length, widths: [...widths], x: t.x, y: t.y }));
  `;
  return spawnSync(process.execPath, ['--input-type=module', '-e', script], {
    timeout: 10_000,
    encoding: 'utf8',
  });
}

for (const [final, count] of [['S', '2000000000'], ['T', '2000000000'], ['@', '2000000000'],
  ['L', '2000000000'], ['M', '2000000000'], ['P', '2000000000'], ['X', '2000000000'],
  ['H', '2000000000;2000000000'], ['C', '99999999999999']]) {
  test(`ESC[${count}${final} ends at once and keeps the screen whole`, () => {
    const r = run([final, count]);
    assert.equal(r.signal, null, `killed (${r.signal}): the count was not clamped`);
    assert.equal(r.status, 0, r.stderr);
    const out = JSON.parse(r.stdout);
    assert.equal(out.rows, 24);
    assert.deepEqual(out.widths, [80]);
    assert.ok(out.x >= 0 && out.x < 80 && out.y >= 0 && out.y < 24, r.stdout);
  });
}
