// The console's three numbers (issue #21), measured in a real browser against a real server:
//   1. the sessions page with 1,000 sessions stored renders in <= 500 ms;
//   2. the session page keeps up with 200 events a second for over 10 s, dropping none;
//   3. terminal keystroke echo <= 20 ms on loopback (median and p99 over 200 keystrokes).
// Usage: node numbers.test.mjs /path/to/berth. Prints one `numbers:` line per figure and
// exits non-zero when a goal is missed (see the asserts for the margins).
import assert from 'node:assert/strict';
import { loadavg, cpus } from 'node:os';
import { harness, client, until, stats } from './harness.mjs';

const berth = process.argv[2] || process.env.BERTH_BIN;
assert.ok(berth, 'usage: node numbers.test.mjs /path/to/berth');
const { finish, step, server, browser } = harness('numbers', 8 * 60_000);
const SESSIONS = 1000;
const RATE = 200; // events a second
const SECONDS = 12;
const KEYS = 200;
const fmt = (s) => `median ${s.median.toFixed(1)} ms, p99 ${s.p99.toFixed(1)} ms, max ${s.max.toFixed(1)} ms (n=${s.n})`;
const load = () => loadavg().map((l) => l.toFixed(2)).join(' ');

let page = null;
try {
  console.log(`numbers: host load ${load()} on ${cpus().length} cpus`);
  const { base, adminKey } = await server(berth);
  const api = client(base);
  const acme = (await api(adminKey, 'POST', '/v1/keys', { tenant: 'acme' })).json.key;
  const made = await api(acme, 'POST', '/v1/boxes', { resources: { memory_mib: 256, disk_mib: 256 }, idle_timeout_s: 3600 });
  assert.equal(made.status, 201, made.text);
  const boxId = made.json.id;

  step(`store ${SESSIONS} sessions`);
  {
    const t0 = Date.now();
    let next = 0;
    const worker = async () => {
      while (next < SESSIONS) {
        next++;
        const r = await api(acme, 'POST', '/v1/sessions', { box: boxId, agent: { kind: 'command', argv: ['/bin/true'] } });
        assert.equal(r.status, 201, r.text);
      }
    };
    await Promise.all(Array.from({ length: 6 }, worker));
    const listed = (await api(acme, 'GET', '/v1/sessions')).json.items.length;
    assert.equal(listed, SESSIONS);
    console.log(`numbers: ${SESSIONS} sessions stored in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  }

  ({ page } = await browser(base));
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  await page.setViewportSize({ width: 1200, height: 760 });
  await page.goto(`${base}/ui`);
  await page.fill('#key', acme);
  await page.click('button[type=submit]');
  await page.waitForSelector('#boxes');

  step('1. the sessions page with 1,000 sessions');
  // From the hash change (in-app navigation) to the frame that has the first page's rows,
  // and a cold load of /ui#/sessions (the shell, its modules, the key check, the list).
  // (The page's policy allows no eval: the check is written out in each evaluate.)
  const navs = [];
  for (let i = 0; i < 7; i++) {
    await page.evaluate(() => { location.hash = '#/boxes'; });
    await page.waitForSelector('#boxes');
    navs.push(await page.evaluate(() => new Promise((resolve) => {
      const t0 = performance.now();
      location.hash = '#/sessions';
      const check = () => (document.querySelectorAll('#sessions tbody tr[data-session]').length >= 100
        ? resolve(performance.now() - t0) : requestAnimationFrame(check));
      requestAnimationFrame(check);
    })));
  }
  const colds = [];
  for (let i = 0; i < 5; i++) {
    // A new document each time (a goto that only changes the hash would not load one).
    await page.goto('about:blank');
    await page.goto(`${base}/ui#/sessions`);
    colds.push(await page.evaluate(() => new Promise((resolve) => {
      const check = () => (document.querySelectorAll('#sessions tbody tr[data-session]').length >= 100
        ? resolve(performance.now()) : requestAnimationFrame(check));
      check();
    })));
  }
  const nav = stats(navs);
  const cold = stats(colds);
  console.log(`numbers: sessions page (${SESSIONS} stored), in-app navigation: ${fmt(nav)}`);
  console.log(`numbers: sessions page (${SESSIONS} stored), cold load of /ui#/sessions: ${fmt(cold)}`);
  assert.ok(nav.median <= 500 && cold.median <= 500, 'the sessions page renders in 500 ms');
  assert.equal(await page.textContent('#sessions-page'), `1–100 of ${SESSIONS}`);
  // Paging works over the whole list: the last page holds the oldest session.
  await page.fill('#sessions-filter', '');
  for (let i = 0; i < SESSIONS / 100 - 1; i++) await page.click('#sessions-next');
  assert.equal(await page.textContent('#sessions-page'), `${SESSIONS - 99}–${SESSIONS} of ${SESSIONS}`);
  assert.ok(await page.isDisabled('#sessions-next'));

  step(`2. the session page at ${RATE} events a second for ${SECONDS} s`);
  {
    // A command agent printing one line (one event) per 1/RATE s on average, paced by the
    // clock (a batch every 50 ms brings it up to date), SECONDS * RATE lines in all.
    const total = SECONDS * RATE;
    const script = `start=$(date +%s%N); n=0; while [ $n -lt ${total} ]; do now=$(date +%s%N); t=$(( (now - start) * ${RATE} / 1000000000 + 1 )); [ $t -gt ${total} ] && t=${total}; if [ $t -gt $n ]; then seq -f "ev-%g" $n $((t - 1)); n=$t; fi; sleep 0.05; done`;
    // When each event reached the page (wall clock, as the server's timestamps are).
    await page.goto(`${base}/ui#/sessions`);
    await page.waitForSelector('#sessions');
    await page.evaluate(() => {
      window.__seen = new Map();
      new MutationObserver((ms) => {
        const now = Date.now();
        for (const m of ms) for (const n of m.addedNodes) {
          if (n.nodeType !== 1) continue;
          const evs = n.classList.contains('ev') ? [n] : n.querySelectorAll('.ev');
          for (const e of evs) if (!window.__seen.has(e.dataset.seq)) window.__seen.set(e.dataset.seq, now);
        }
      }).observe(document.getElementById('main'), { childList: true, subtree: true });
    });
    const s = await api(acme, 'POST', '/v1/sessions', { box: boxId, agent: { kind: 'command', argv: ['/bin/sh', '-c', script] } });
    assert.equal(s.status, 201, s.text);
    await page.evaluate((id) => { location.hash = `#/session/${id}`; }, s.json.id);
    await until('the session ends', async () => !['starting', 'running'].includes((await api(acme, 'GET', `/v1/sessions/${s.json.id}`)).json.state), (SECONDS + 60) * 1000);
    const stream = await fetch(`${base}/v1/sessions/${s.json.id}/events?after=0`, { headers: { Authorization: `Bearer ${acme}` }, signal: AbortSignal.timeout(60_000) });
    const stored = (await stream.text()).split('\n').filter((l) => l.startsWith('data:')).map((l) => JSON.parse(l.slice(5)));
    const out = stored.filter((e) => e.type === 'stdout');
    assert.equal(out.length, SECONDS * RATE, `the server stored ${out.length} of ${SECONDS * RATE} lines`);
    assert.equal(stored.filter((e) => e.type === 'events_dropped').length, 0, 'the server dropped events');
    const span = (Date.parse(out[out.length - 1].ts) - Date.parse(out[0].ts)) / 1000;
    const rate = (out.length - 1) / span;
    assert.ok(span >= 10, `the stream lasted ${span} s`);
    assert.ok(rate >= RATE * 0.95, `the agent produced ${rate.toFixed(0)} events a second`);
    await until('every stored event on the page', async () => (await page.evaluate(() => window.__seen.size)) >= stored.length, 10_000);
    const onPage = await page.$$eval('#conversation .ev', (els) => els.map((e) => Number(e.dataset.seq)));
    assert.deepEqual(onPage, stored.map((e) => e.seq), 'the page shows every stored event once, in order');
    const seen = await page.evaluate(() => Object.fromEntries(window.__seen));
    const lags = out.map((e) => seen[String(e.seq)] - Date.parse(e.ts));
    const lag = stats(lags);
    console.log(`numbers: session page at ${rate.toFixed(0)} events/s for ${span.toFixed(1)} s: ${onPage.length} of ${stored.length} stored events rendered; stored-to-rendered lag ${fmt(lag)}`);
    // Keeping up: the page is never more than a second behind the store.
    assert.ok(lag.p99 <= 1000 && lag.max <= 2000, 'the page fell behind the stream');
  }

  step(`3. terminal keystroke echo over ${KEYS} keystrokes`);
  {
    await page.goto(`${base}/ui#/box/${boxId}`);
    await page.click('#tab-terminal');
    await page.waitForSelector('#term-status:has-text("Connected")');
    await page.focus('#terminal');
    // A comment line, so nothing typed runs; wait for the shell's prompt first.
    await until('the prompt', () => page.evaluate(() => /[$#>]\s*$/.test(window.berthTerminal.text().trimEnd())))
      .catch(async (e) => { console.error(JSON.stringify(await page.evaluate(() => window.berthTerminal.text()))); throw e; });
    await page.keyboard.press('#');
    await until('the # echoed', () => page.evaluate(() => window.berthTerminal.text().includes('#')));
    // keydown (the event's own time) -> the echoed bytes reach the emulator -> the frame
    // after them (the screen repainted).
    await page.evaluate(() => {
      const t = window.berthTerminal;
      window.__echo = [];
      let pending = null;
      document.addEventListener('keydown', (e) => { pending = { key: e.timeStamp }; }, true);
      const write = t.write.bind(t);
      t.write = (b) => {
        write(b);
        const p = pending;
        if (!p) return;
        pending = null;
        p.echo = performance.now() - p.key;
        requestAnimationFrame(() => { p.paint = performance.now() - p.key; window.__echo.push(p); });
      };
    });
    for (let i = 0; i < KEYS; i++) {
      await page.keyboard.press('x');
      await page.evaluate((n) => new Promise((resolve) => {
        const check = () => (window.__echo.length > n ? resolve() : requestAnimationFrame(check));
        check();
      }), i);
    }
    const all = await page.evaluate(() => window.__echo);
    await page.keyboard.press('Control+U');
    const echo = stats(all.map((p) => p.echo));
    const paint = stats(all.map((p) => p.paint));
    console.log(`numbers: keystroke echo (keydown to echoed bytes): ${fmt(echo)}`);
    console.log(`numbers: keystroke echo on screen (keydown to the next frame): ${fmt(paint)}`);
    assert.ok(echo.median <= 20, 'median keystroke echo over 20 ms');
    assert.ok(echo.p99 <= 50, 'p99 keystroke echo over 50 ms');
  }

  assert.deepEqual(errors, [], 'errors in the page');
  console.log(`numbers: host load ${load()}`);
  step('all passed');
  await finish(0);
} catch (e) {
  console.error('numbers: FAILED:', e);
  await finish(1);
}
