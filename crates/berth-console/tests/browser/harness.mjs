// What the browser tests share: a real `berth serve` on loopback (the built-in mock model, a
// fresh data directory), Debian's chromium through playwright-core (no browser download, an
// empty profile), API calls, bounded waits, and clean-up on every exit.
//
// BERTH_CONSOLE_ASSETS=<dir>: serve /ui/* from that directory instead of the binary's embedded
// copy (to try an edit of the console without a rebuild; never set in CI).
import { chromium } from 'playwright-core';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const STEP_MS = 30_000;

export function harness(name, totalMs) {
  const cleanups = [];
  let failTimer = null;

  async function finish(code) {
    clearTimeout(failTimer);
    for (const f of cleanups.reverse()) { try { await f(); } catch (_) { /* best effort */ } }
    process.exit(code);
  }
  failTimer = setTimeout(() => { console.error(`${name}: over the time limit`); finish(1); }, totalMs);

  const step = (what) => console.log(`${name}: ${what}`);

  async function server(berth, env) {
    const data = mkdtempSync(join(tmpdir(), 'berth-console-'));
    const proc = spawn(berth, ['serve', '--mock-model', '--listen', '127.0.0.1:0', '--data-dir', data], {
      stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, BERTH_LOG: 'warn', ...(env || {}) },
    });
    cleanups.push(() => new Promise((res) => {
      proc.once('exit', res);
      proc.kill('SIGTERM');
      setTimeout(() => { proc.kill('SIGKILL'); res(); }, 20_000);
    }).then(() => rmSync(data, { recursive: true, force: true })));
    const base = await new Promise((resolve, reject) => {
      let buf = '';
      const t = setTimeout(() => reject(new Error('the server did not start')), 60_000);
      proc.stdout.on('data', (d) => {
        buf += d;
        const m = buf.match(/http:\/\/[0-9.]+:[0-9]+/);
        if (m) { clearTimeout(t); resolve(m[0]); }
      });
      proc.once('exit', (c) => reject(new Error(`the server exited (${c})`)));
    });
    proc.stdout.resume();
    return { base, adminKey: readFileSync(join(data, 'admin.key'), 'utf8').trim(), pid: proc.pid };
  }

  async function browser(base) {
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
    const page = context.pages()[0] || await context.newPage();
    page.setDefaultTimeout(STEP_MS);
    return { context, page };
  }

  return { finish, step, server, browser, cleanups };
}

// Serve the console's files from BERTH_CONSOLE_ASSETS (a development aid, see above).
export async function fromDisk(context, base) {
  const dir = process.env.BERTH_CONSOLE_ASSETS;
  if (!dir) return;
  const types = { html: 'text/html; charset=utf-8', js: 'text/javascript; charset=utf-8', css: 'text/css; charset=utf-8', svg: 'image/svg+xml' };
  const handler = async (route) => {
    const file = new URL(route.request().url()).pathname.slice(4) || 'index.html';
    const resp = await route.fetch();
    let body;
    try { body = readFileSync(join(dir, file)); } catch (_) { return route.fulfill({ response: resp }); }
    await route.fulfill({ response: resp, status: 200, body, headers: { ...resp.headers(), 'content-type': types[file.split('.').pop()] || 'application/octet-stream' } });
  };
  await context.route(`${base}/ui`, handler);
  await context.route(`${base}/ui/*`, handler);
}

export function client(base) {
  return async function api(key, method, path, body) {
    const r = await fetch(base + path, {
      method, headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await r.text();
    let json = null;
    try { json = text ? JSON.parse(text) : null; } catch (_) { json = text; }
    return { status: r.status, json, text, headers: r.headers };
  };
}

export async function until(what, fn, ms = STEP_MS) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out: ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

// Order statistics of a list of numbers (ms).
export function stats(xs) {
  const s = xs.slice().sort((a, b) => a - b);
  const at = (q) => s[Math.min(s.length - 1, Math.floor(q * s.length))];
  return { n: s.length, median: at(0.5), p99: at(0.99), max: s[s.length - 1], min: s[0] };
}
