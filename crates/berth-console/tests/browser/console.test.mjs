// The console end to end in a real browser: Debian's chromium driven by playwright-core,
// against a real `berth serve` (native boxes, the real Claude Code CLI, the built-in mock
// model). Usage: node console.test.mjs /path/to/berth. Exits non-zero on the first failure.
import { chromium } from 'playwright-core';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import assert from 'node:assert/strict';
import { fromDisk } from './harness.mjs';

const berth = process.argv[2] || process.env.BERTH_BIN;
assert.ok(berth, 'usage: node console.test.mjs /path/to/berth');
const STEP_MS = 30_000;
const TOTAL_MS = 8 * 60_000;
const cleanups = [];
const failTimer = setTimeout(() => { console.error('console tests: over the time limit'); finish(1); }, TOTAL_MS);

async function finish(code) {
  clearTimeout(failTimer);
  for (const f of cleanups.reverse()) { try { await f(); } catch (_) { /* best effort */ } }
  process.exit(code);
}

function step(name) { console.log(`console tests: ${name}`); }

// BERTH_CONSOLE_SCREENSHOTS=<dir>: also save a picture of each page there (the README's).
const shots = process.env.BERTH_CONSOLE_SCREENSHOTS;
async function shot(name) {
  if (!shots) return;
  // Messages of earlier steps are not part of the page's picture.
  await page.evaluate(() => document.getElementById('toast').replaceChildren());
  await new Promise((r) => setTimeout(r, 300)); // let the last frame paint
  await page.screenshot({ path: join(shots, `${name}.jpg`), type: 'jpeg', quality: 70 });
}

// ---- the server ----
const data = mkdtempSync(join(tmpdir(), 'berth-console-'));
const server = spawn(berth, ['serve', '--mock-model', '--listen', '127.0.0.1:0', '--data-dir', data], {
  stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, BERTH_LOG: 'warn' },
});
cleanups.push(() => new Promise((res) => {
  server.once('exit', res);
  server.kill('SIGTERM');
  setTimeout(() => { server.kill('SIGKILL'); res(); }, 20_000);
}).then(() => rmSync(data, { recursive: true, force: true })));
const base = await new Promise((resolve, reject) => {
  let buf = '';
  const t = setTimeout(() => reject(new Error('the server did not start')), 60_000);
  server.stdout.on('data', (d) => {
    buf += d;
    const m = buf.match(/http:\/\/[0-9.]+:[0-9]+/);
    if (m) { clearTimeout(t); resolve(m[0]); }
  });
  server.once('exit', (c) => reject(new Error(`the server exited (${c})`)));
}).catch((e) => { console.error(e); return finish(1); });
server.stdout.resume();
const adminKey = readFileSync(join(data, 'admin.key'), 'utf8').trim();

async function api(key, method, path, body) {
  const r = await fetch(base + path, {
    method, headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = text; }
  return { status: r.status, json, text };
}

async function until(what, fn, ms = STEP_MS) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out: ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

let page = null;
try {
  const acme = (await api(adminKey, 'POST', '/v1/keys', { tenant: 'acme' })).json.key;
  const globex = (await api(adminKey, 'POST', '/v1/keys', { tenant: 'globex' })).json.key;
  const foreign = await api(globex, 'POST', '/v1/boxes', { resources: { memory_mib: 256, disk_mib: 128 } });
  assert.equal(foreign.status, 201, foreign.text);
  const foreignBox = foreign.json.id;

  // ---- the browser: Debian's chromium, no download, an empty profile ----
  const profile = mkdtempSync(join(tmpdir(), 'berth-chromium-'));
  cleanups.push(() => rmSync(profile, { recursive: true, force: true }));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    acceptDownloads: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  cleanups.push(() => context.close());
  await fromDisk(context, base);
  page = context.pages()[0] || await context.newPage();
  page.setDefaultTimeout(STEP_MS);
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  // Refused calls the tests make on purpose (a wrong key, another tenant's box) are logged by
  // the browser as failed loads; anything else logged as an error is a console bug.
  page.on('console', (m) => { if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) pageErrors.push(m.text()); });

  // The key is never in a URL, a cookie or the document; it is in this tab's session storage.
  async function keyStaysHidden(key) {
    assert.ok(!page.url().includes(key), 'key in the URL');
    assert.equal(await page.evaluate(() => document.cookie), '', 'a cookie was set');
    const html = await page.content();
    assert.ok(!html.includes(key), 'key in the document');
    assert.equal(await page.evaluate(() => sessionStorage.getItem('berth.key')), key);
    assert.equal(await page.evaluate(() => JSON.stringify(localStorage).includes('berth_')), false, 'key in local storage');
  }

  step('the console is served with a strict policy');
  const resp = await page.goto(`${base}/ui`);
  assert.equal(resp.status(), 200);
  const csp = resp.headers()['content-security-policy'] || '';
  assert.match(csp, /script-src 'self'/);
  assert.ok(!csp.includes('unsafe-inline'), csp);
  assert.equal(resp.headers()['x-content-type-options'], 'nosniff');
  assert.match(resp.headers()['cache-control'] || '', /no-store/);

  await page.setViewportSize({ width: 1200, height: 760 });
  step('sign in');
  await shot('sign-in');
  await page.fill('#key', 'berth_wrong');
  await page.click('button[type=submit]');
  await page.waitForSelector('text=That key was not accepted.');
  await page.fill('#key', acme);
  await page.click('button[type=submit]');
  await page.waitForSelector('#boxes');
  await keyStaysHidden(acme);

  step('create a box');
  await page.fill('#new-memory', '256');
  await page.fill('#new-disk', '256');
  await page.fill('#new-idle', '600');
  await page.fill('#new-labels', 'team=web, env=test');
  await page.click('#create-box');
  const row = await page.waitForSelector('#boxes tr[data-box]');
  const boxId = await row.getAttribute('data-box');
  const made = (await api(acme, 'GET', `/v1/boxes/${boxId}`)).json;
  assert.equal(made.state, 'running');
  assert.equal(made.resources.memory_mib, 256);
  assert.equal(made.idle_timeout_s, 600);
  assert.deepEqual(made.labels, { team: 'web', env: 'test' });
  await page.waitForSelector(`tr[data-box="${boxId}"] td.num:has-text("MiB")`);
  // The node that holds it (a single server is a one-node cluster).
  assert.ok(made.node, `a box names its node: ${JSON.stringify(made)}`);
  assert.equal(await page.locator(`tr[data-box="${boxId}"] td.node`).innerText(), made.node);
  await shot('boxes');

  step('a tenant cannot see another tenant\'s box');
  assert.equal(await page.locator(`tr[data-box="${foreignBox}"]`).count(), 0);
  await page.goto(`${base}/ui#/box/${foreignBox}`);
  await page.waitForSelector('#toast .msg.err');
  assert.match(await page.textContent('#toast'), /not found/);
  assert.equal(await page.locator('#tab-terminal').count(), 0);

  step('the terminal runs a shell in the box');
  await page.goto(`${base}/ui#/box/${boxId}`);
  await page.click('#tab-terminal');
  await page.waitForSelector('#term-status:has-text("Connected")');
  await page.focus('#terminal');
  await page.keyboard.type('echo hi-$((40+2)) > /workspace/from-term; cat /workspace/from-term; ls /workspace\n');
  await until('the shell\'s output on the page', () => page.evaluate(() => {
    const t = window.berthTerminal.text();
    return t.includes('hi-42\n') && t.includes('from-term');
  }));
  await shot('terminal');

  step('terminal keystroke echo');
  // Each key's round trip: sent over the socket, typed into the box's terminal, echoed back.
  const echo = await page.evaluate(async () => {
    const t = window.berthTerminal;
    const times = [];
    for (let i = 0; i < 30; i++) {
      const echoed = new Promise((resolve) => {
        const write = t.write.bind(t);
        t.write = (b) => { t.write = write; write(b); resolve(); };
      });
      const t0 = performance.now();
      t.onData(new TextEncoder().encode('x'));
      await echoed;
      times.push(performance.now() - t0);
    }
    t.onData(new Uint8Array([0x15])); // ^U: clear the typed line
    return times.sort((a, b) => a - b);
  });
  console.log(`console tests: keystroke echo ms: median ${echo[15].toFixed(1)}, max ${echo[29].toFixed(1)}`);
  assert.ok(echo[15] <= 20, `median keystroke echo ${echo[15]} ms`);
  await keyStaysHidden(acme);

  step('upload and download a file');
  await page.click('#tab-files');
  await page.setInputFiles('#upload', { name: 'hello.txt', mimeType: 'text/plain', buffer: Buffer.from('hello from the browser\n') });
  await page.waitForSelector('tr[data-file="hello.txt"]');
  assert.equal((await api(acme, 'GET', `/v1/boxes/${boxId}/files/hello.txt`)).text, 'hello from the browser\n');
  const [download] = await Promise.all([
    page.waitForEvent('download'),
    page.click('tr[data-file="hello.txt"] button:has-text("Download")'),
  ]);
  assert.equal(readFileSync(await download.path(), 'utf8'), 'hello from the browser\n');
  assert.equal(await page.locator('tr[data-file="from-term"]').count(), 1);
  await shot('files');

  step('a port opens from a signed link, sandboxed, without the key');
  {
    const web = await api(acme, 'POST', '/v1/sessions', { box: boxId, agent: { kind: 'command', argv: ['/usr/bin/python3', '-m', 'http.server', '8000', '--bind', '127.0.0.1', '--directory', '/workspace'] } });
    assert.equal(web.status, 201, web.text);
    await until('the box serves port 8000', async () => (await api(acme, 'GET', `/v1/boxes/${boxId}/ports/8000/hello.txt`)).status === 200);
    await page.click('#tab-ports');
    await page.fill('#port', '8000');
    await page.click('#port-open');
    const href = await (await page.waitForSelector('#port-link-8000')).getAttribute('href');
    assert.match(href, /^\/v1\/port-links\/[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\/$/);
    assert.ok(!href.includes(acme) && !href.includes(acme.slice(6, 30)), 'the key is in the link');
    await shot('ports');
    // Opened as a plain link (a new tab, no header): the box's page, in an opaque origin.
    const [tab] = await Promise.all([page.context().waitForEvent('page'), page.click('#port-link-8000')]);
    await tab.waitForLoadState();
    assert.equal(new URL(tab.url()).pathname, href);
    assert.match(await tab.textContent('body'), /hello\.txt/);
    assert.equal(await tab.evaluate(() => window.origin), 'null', 'the port\'s page shares the console\'s origin');
    assert.match(await tab.evaluate(() => { try { return String(sessionStorage.getItem('berth.key')); } catch (e) { return 'refused: ' + e.name; } }), /^refused/);
    const viaLink = await fetch(base + href + 'hello.txt');
    assert.equal(await viaLink.text(), 'hello from the browser\n');
    assert.match(viaLink.headers.get('content-security-policy'), /^sandbox /);
    assert.ok(!viaLink.headers.get('content-security-policy').includes('allow-same-origin'));
    await tab.close();
    // A changed token, another tenant, and a deleted key open nothing.
    assert.equal((await fetch(base + href.replace(/.\/$/, (m) => (m[0] === 'A' ? 'B' : 'A') + '/'))).status, 401);
    assert.equal((await api(globex, 'POST', `/v1/boxes/${boxId}/port-links`, { port: 8000 })).status, 404);
    const second = (await api(adminKey, 'POST', '/v1/keys', { tenant: 'acme' })).json;
    const link = (await api(second.key, 'POST', `/v1/boxes/${boxId}/port-links`, { port: 8000 })).json;
    assert.equal((await fetch(base + link.url + 'hello.txt')).status, 200);
    assert.equal((await api(adminKey, 'DELETE', `/v1/keys/${second.id}`)).status, 204);
    assert.equal((await fetch(base + link.url + 'hello.txt')).status, 401, 'a deleted key\'s link still opens');
    assert.equal((await api(acme, 'DELETE', `/v1/sessions/${web.json.id}`)).status, 200);
  }

  step('a fast agent\'s events all reach the page');
  {
    const burst = await api(acme, 'POST', '/v1/sessions', { box: boxId, agent: { kind: 'command', argv: ['/bin/sh', '-c', 'i=0; while [ $i -lt 1000 ]; do echo ev-$i; i=$((i+1)); done'] } });
    assert.equal(burst.status, 201, burst.text);
    const t0 = Date.now();
    await page.goto(`${base}/ui#/session/${burst.json.id}`);
    await page.waitForSelector('.ev-stdout:has-text("ev-999")', { timeout: 60_000 });
    const lines = await page.$$eval('#conversation .ev-stdout pre', (els) => els.map((e) => e.textContent));
    const seen = new Set(lines.flatMap((l) => l.split('\n')).filter((l) => l.startsWith('ev-')));
    assert.equal(seen.size, 1000, `${seen.size} of 1000 lines on the page`);
    console.log(`console tests: 1000 events on the page in ${Date.now() - t0} ms`);
  }

  step('watch a session and answer its permission requests');
  await page.goto(`${base}/ui#/sessions`);
  await page.selectOption('#new-permission-mode', 'default');
  await page.fill('#new-prompt', 'make a file');
  await page.click('#start-session');
  await page.waitForURL(/#\/session\//);
  const sid = decodeURIComponent(page.url().split('#/session/')[1]);
  await page.waitForSelector('.ev-assistant:has-text("create a file in the workspace")', { timeout: 60_000 });
  const write = await page.waitForSelector('.ev-permission_request:has-text("Write")', { timeout: 60_000 });
  await (await write.$('button:has-text("Allow")')).click();
  await page.waitForSelector('.ev-permission_answer:has-text("allowed")');
  // The Write ran because it was allowed; the agent's read-only Bash needs no answer.
  await page.waitForSelector('.ev-tool_result:has-text("Hello from an agent")', { timeout: 60_000 });
  await page.waitForSelector('.ev-result', { timeout: 60_000 });
  await shot('session');
  const session = (await api(acme, 'GET', `/v1/sessions/${sid}`)).json;
  const written = await api(acme, 'GET', `/v1/boxes/${session.box_id}/files/hello.txt`);
  assert.equal(written.text, 'Hello from an agent in a berth box!\n', 'the allowed Write ran');
  // Every event the API has is on the page, once, in order (the ended session's stream ends).
  assert.equal((await api(acme, 'DELETE', `/v1/sessions/${sid}`)).status, 200);
  await page.waitForSelector('#session-state:has-text("stopped")');
  const stream = await fetch(`${base}/v1/sessions/${sid}/events?after=0`, {
    headers: { Authorization: `Bearer ${acme}` }, signal: AbortSignal.timeout(STEP_MS),
  });
  const events = (await stream.text()).split('\n').filter((l) => l.startsWith('data:')).map((l) => JSON.parse(l.slice(5)).seq);
  assert.ok(events.length > 5, `${events.length} events`);
  await until('every event on the page', async () => (await page.locator('#conversation .ev').count()) >= events.length);
  const shown = await page.$$eval('#conversation .ev', (els) => els.map((e) => Number(e.dataset.seq)));
  assert.deepEqual(shown, events);
  await keyStaysHidden(acme);

  step('usage totals equal the API\'s');
  // Nothing may run while the two are compared (box time grows by the second).
  for (const b of (await api(acme, 'GET', '/v1/boxes')).json.items) await api(acme, 'DELETE', `/v1/boxes/${b.id}`);
  await until('every box stopped', async () => (await api(acme, 'GET', '/v1/boxes')).json.items.every((b) => ['destroyed', 'stopped', 'failed'].includes(b.state)));
  for (const by of ['tenant', 'model', 'box']) {
    await page.goto(`${base}/ui#/usage`);
    await page.selectOption('#usage-by', by);
    await page.waitForSelector(`#usage-table th:has-text("${by}")`);
    const report = (await api(acme, 'GET', `/v1/usage?group_by=${by}`)).json;
    const onPage = await page.$$eval('#usage-total td[data-metric]', (tds) => Object.fromEntries(tds.map((t) => [t.dataset.metric, Number(t.dataset.value)])));
    for (const [metric, value] of Object.entries(onPage)) assert.equal(value, report.total[metric], `${by} ${metric}`);
    assert.ok(report.total.input_tokens > 0, 'the session was metered');
    assert.equal(await page.locator('#usage-table tbody tr').count(), report.groups.length + 1);
    if (by === 'model') await shot('usage');
  }

  step('Managed Agents: environments and agents, per tenant');
  {
    const ma = (key, method, path, body) => api(key, method, '/anthropic/v1' + path, body);
    const theirs = await ma(globex, 'POST', '/agents', { name: 'globex-agent', model: 'claude-sonnet-4-5' });
    assert.equal(theirs.status, 200, theirs.text);
    const theirEnv = await ma(globex, 'POST', '/environments', { name: 'globex-env' });
    assert.equal(theirEnv.status, 200, theirEnv.text);

    await page.goto(`${base}/ui#/environments`);
    await page.waitForSelector('#environments');
    await page.fill('#env-name', 'web-env');
    await page.fill('#env-description', 'reaches GitHub');
    await page.fill('#env-hosts', 'api.github.com, *.example.com');
    // Keyboard only: Enter submits the form, Enter on a focused button presses it.
    await page.press('#env-hosts', 'Enter');
    const envRow = await page.waitForSelector('#environments tr[data-env]:has-text("web-env")');
    const envId = await envRow.getAttribute('data-env');
    const env = (await ma(acme, 'GET', `/environments/${envId}`)).json;
    assert.deepEqual(env.config.networking.allowed_hosts, ['api.github.com', '*.example.com']);
    assert.equal(env.description, 'reaches GitHub');
    assert.equal(await page.locator(`#environments tr[data-env="${theirEnv.json.id}"]`).count(), 0, 'another tenant\'s environment');
    await shot('environments');
    page.once('dialog', (d) => d.accept());
    await page.focus(`#environments tr[data-env="${envId}"] button:has-text("Archive")`);
    await page.keyboard.press('Enter');
    await until('the environment archived', async () => (await ma(acme, 'GET', `/environments/${envId}`)).json.archived_at);
    await page.waitForSelector(`#environments tr[data-env="${envId}"]`, { state: 'detached' });
    await page.check('#envs-archived');
    await page.waitForSelector(`#environments tr[data-env="${envId}"] td.archived:not(:empty)`);

    await page.goto(`${base}/ui#/agents`);
    await page.waitForSelector('#agents');
    await page.fill('#agent-name', 'reviewer');
    await page.fill('#agent-system', 'Review the diff.');
    await page.selectOption('#agent-policy', 'always_ask');
    await page.click('#create-agent');
    const agentRow = await page.waitForSelector('#agents tr[data-agent]:has-text("reviewer")');
    const agentId = await agentRow.getAttribute('data-agent');
    const agent = (await ma(acme, 'GET', `/agents/${agentId}`)).json;
    assert.equal(agent.system, 'Review the diff.');
    assert.equal(agent.model.id, 'claude-sonnet-4-5');
    assert.equal(agent.tools[0].type, 'agent_toolset_20260401');
    assert.equal(agent.tools[0].default_config.permission_policy.type, 'always_ask');
    assert.equal(await page.locator(`#agents tr[data-agent="${theirs.json.id}"]`).count(), 0, 'another tenant\'s agent');
    const v2 = await ma(acme, 'POST', `/agents/${agentId}`, { version: 1, system: 'Review the diff, briefly.' });
    assert.equal(v2.status, 200, v2.text);
    await page.click(`#agents tr[data-agent="${agentId}"] button:has-text("Versions")`);
    await page.waitForSelector('#versions tr[data-version="2"]:has-text("briefly")');
    assert.equal(await page.locator('#versions tbody tr').count(), 2);
    await shot('agents');
    page.once('dialog', (d) => d.accept());
    await page.click(`#agents tr[data-agent="${agentId}"] button:has-text("Archive")`);
    await until('the agent archived', async () => (await ma(acme, 'GET', `/agents/${agentId}`)).json.archived_at);
    // The other tenant's objects are untouched, and acme's are not found for it.
    assert.equal((await ma(globex, 'GET', `/agents/${agentId}`)).status, 404);
    assert.equal((await ma(globex, 'GET', `/agents/${theirs.json.id}`)).json.archived_at, null);
    await keyStaysHidden(acme);
  }

  step('keys page is for admins only');
  assert.equal(await page.locator('#nav-keys').isHidden(), true);
  await page.click('#signout');
  await page.waitForSelector('#key');
  assert.equal(await page.evaluate(() => sessionStorage.getItem('berth.key')), null);
  await page.fill('#key', adminKey);
  await page.click('button[type=submit]');
  await page.waitForSelector('#nav-keys:not([hidden])');
  await page.click('#nav-keys');
  await page.fill('#new-key-tenant', 'initech');
  await page.click('button:has-text("Create key")');
  const secret = (await page.textContent('#new-secret')).trim();
  assert.equal((await api(secret, 'GET', '/v1/boxes')).status, 200, 'the shown key works');
  await shot('keys');
  await keyStaysHidden(adminKey);

  assert.deepEqual(pageErrors, [], 'errors in the page');
  step('all passed');
  await finish(0);
} catch (e) {
  console.error('console tests: FAILED:', e);
  if (page) {
    const seen = await page.$$eval('#conversation .ev', (els) => els.map((el) => el.textContent.slice(0, 160))).catch(() => []);
    if (seen.length) console.error('conversation on the page:\n' + seen.join('\n'));
  }
  await finish(1);
}
