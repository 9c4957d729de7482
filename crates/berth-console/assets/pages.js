// The console's pages. Each takes (element, id, ctx) and fills the element; ctx.onLeave(fn)
// registers what to stop when the user navigates away.
import { auth, get, post, del, put, call, follow, openPty } from '/ui/api.js';
import { h, toast, attempt } from '/ui/app.js';
import { Terminal } from '/ui/term.js';
import { agents, environments } from '/ui/managed.js';

const enc = encodeURIComponent;
const fmtBytes = (n) => (n >= 1 << 30 ? (n / (1 << 30)).toFixed(1) + ' GiB' : n >= 1 << 20 ? (n / (1 << 20)).toFixed(1) + ' MiB' : n >= 1024 ? (n / 1024).toFixed(1) + ' KiB' : n + ' B');
const usd = (n) => '$' + Number(n || 0).toFixed(4);
const stateCell = (s) => h('td', { class: 'state-' + s }, s);
const field = (label, input) => h('label', {}, label, input);

function every(ms, fn, ctx) {
  let stopped = false;
  const tick = async () => { if (stopped) return; await fn(); if (!stopped) timer = setTimeout(tick, ms); };
  let timer = setTimeout(tick, ms);
  ctx.onLeave(() => { stopped = true; clearTimeout(timer); });
}

// ---- Boxes ----

async function boxes(el, _id, ctx) {
  const tbody = h('tbody');
  const backend = h('select', { id: 'new-backend' });
  const lifecycle = h('select', { id: 'new-lifecycle' }, ['persistent', 'ephemeral', 'hybrid'].map((l) => h('option', { value: l }, l)));
  const cpus = h('input', { id: 'new-cpus', type: 'number', step: '0.25', min: '0.25', value: '1' });
  const mem = h('input', { id: 'new-memory', type: 'number', min: '16', value: '512' });
  const disk = h('input', { id: 'new-disk', type: 'number', min: '16', value: '1024' });
  const allow = h('input', { id: 'new-allow', placeholder: 'api.anthropic.com, *.example.com' });
  const idle = h('input', { id: 'new-idle', type: 'number', min: '1', placeholder: 'server default' });
  const labels = h('input', { id: 'new-labels', placeholder: 'team=a, env=dev' });
  const keep = h('input', { type: 'checkbox', id: 'new-keep' });
  const form = h('form', { class: 'row', 'aria-label': 'Create a box', onsubmit: async (e) => {
    e.preventDefault();
    const spec = { lifecycle: lifecycle.value, resources: { cpus: Number(cpus.value), memory_mib: Number(mem.value), disk_mib: Number(disk.value), pids: 512 } };
    if (backend.value) spec.backend = backend.value;
    if (allow.value.trim()) spec.network = { allow: allow.value.split(',').map((s) => s.trim()).filter(Boolean) };
    if (idle.value) spec.idle_timeout_s = Number(idle.value);
    if (labels.value.trim()) spec.labels = Object.fromEntries(labels.value.split(',').map((p) => p.split('=').map((x) => x.trim())).filter((p) => p[0]));
    if (keep.checked) spec.keep_workspace = true;
    const b = await attempt(() => post('/v1/boxes', spec));
    if (b) { toast(`Created ${b.id}`); await refresh(); }
  } }, field('Backend', backend), field('Lifecycle', lifecycle), field('CPUs', cpus), field('Memory MiB', mem), field('Disk MiB', disk), field('Network allow', allow), field('Idle timeout s', idle), field('Labels', labels), h('label', {}, 'Keep workspace', keep),
  h('button', { class: 'primary', type: 'submit', id: 'create-box' }, 'Create box'));
  const all = h('input', { type: 'checkbox', id: 'show-all' });
  el.append(h('h1', {}, 'Boxes'), form,
    h('label', { class: 'row' }, h('span', {}, all, ' Show ended boxes')),
    h('table', { id: 'boxes' }, h('thead', {}, h('tr', {}, ['Box', 'State', 'Node', 'Backend', 'Lifecycle', 'CPU s', 'Memory', 'Pids', 'Disk', ''].map((t) => h('th', {}, t)))), tbody));
  const bs = await attempt(() => get('/v1/backends'));
  for (const b of (bs && bs.items) || []) backend.append(h('option', { value: b.name }, b.name));
  all.addEventListener('change', () => refresh());

  async function refresh() {
    const list = await attempt(() => get('/v1/boxes'));
    if (!list) return;
    const items = list.items.filter((b) => all.checked || !['destroyed', 'stopped', 'failed'].includes(b.state));
    const rows = await Promise.all(items.map(async (b) => {
      const s = b.state === 'running' ? await get(`/v1/boxes/${enc(b.id)}/stats`).catch(() => null) : null;
      const actions = h('td', {});
      if (b.lifecycle === 'hybrid' && b.state === 'running') actions.append(h('button', { type: 'button', onclick: async () => { await attempt(() => post(`/v1/boxes/${enc(b.id)}/park`)); refresh(); } }, 'Park'));
      if (!['destroyed'].includes(b.state)) actions.append(' ', h('button', { type: 'button', class: 'danger', 'aria-label': `Destroy ${b.id}`, onclick: async () => { if (confirm(`Destroy ${b.id}?`)) { await attempt(() => del(`/v1/boxes/${enc(b.id)}`)); refresh(); } } }, 'Destroy'));
      return h('tr', { 'data-box': b.id }, h('td', {}, h('a', { href: `#/box/${enc(b.id)}` }, b.id)), stateCell(b.state), h('td', { class: 'node' }, b.node || '-'), h('td', {}, b.backend), h('td', {}, b.lifecycle),
        h('td', { class: 'num' }, s ? (s.cpu_usage_ns / 1e9).toFixed(1) : '-'), h('td', { class: 'num' }, s ? `${fmtBytes(s.memory_bytes)} / ${fmtBytes(s.memory_limit_bytes)}` : '-'),
        h('td', { class: 'num' }, s ? `${s.pids}/${s.pids_limit}` : '-'), h('td', { class: 'num' }, s ? `${fmtBytes(s.disk_used_bytes)} / ${fmtBytes(s.disk_limit_bytes)}` : '-'), actions);
    }));
    tbody.replaceChildren(...rows);
    if (!rows.length) tbody.append(h('tr', {}, h('td', { colspan: 10, class: 'muted' }, 'No boxes.')));
  }
  await refresh();
  every(3000, refresh, ctx);
}

// ---- Box ----

async function box(el, id, ctx) {
  const b = await get(`/v1/boxes/${enc(id)}`);
  const info = h('p', { class: 'muted' }, `${b.backend} · ${b.lifecycle} · ${b.resources.cpus} CPU · ${b.resources.memory_mib} MiB · disk ${b.resources.disk_mib} MiB · tenant ${b.tenant}`);
  const panel = h('div');
  const tabs = ['Files', 'Terminal', 'Events', 'Ports', 'Sessions'];
  const bar = h('div', { class: 'tabs', role: 'tablist' });
  let stopTab = null;
  const show = async (name) => {
    if (stopTab) { stopTab(); stopTab = null; }
    for (const t of bar.children) t.setAttribute('aria-selected', String(t.textContent === name));
    panel.replaceChildren();
    const sub = { onLeave: (f) => { stopTab = f; } };
    await attempt(() => ({ Files: files, Terminal: terminal, Events: boxEvents, Ports: ports, Sessions: boxSessions })[name](panel, b, sub));
  };
  for (const t of tabs) bar.append(h('button', { type: 'button', role: 'tab', id: 'tab-' + t.toLowerCase(), onclick: () => show(t) }, t));
  ctx.onLeave(() => { if (stopTab) stopTab(); });
  el.append(h('h1', {}, 'Box ', h('span', { class: 'mono' }, b.id), ' ', h('span', { class: 'state-' + b.state }, b.state)), info, bar, panel);
  await show('Files');
}

async function files(el, b) {
  let dir = '';
  const list = h('tbody');
  const where = h('p', { class: 'mono', id: 'cwd' });
  const upload = h('input', { type: 'file', id: 'upload', 'aria-label': 'Upload a file here' });
  upload.addEventListener('change', async () => {
    const f = upload.files[0];
    if (!f) return;
    const ok = await attempt(() => put(`/v1/boxes/${enc(b.id)}/files/${pathOf(f.name)}`, f));
    if (ok !== undefined) toast(`Uploaded ${f.name}`);
    upload.value = '';
    load();
  });
  const pathOf = (name) => (dir ? dir + '/' : '') + name.split('/').map(enc).join('/');
  async function load() {
    where.textContent = '/workspace/' + dir;
    const l = await attempt(() => get(`/v1/boxes/${enc(b.id)}/files/${dir}`));
    if (!l) return;
    const rows = [];
    if (dir) rows.push(h('tr', {}, h('td', {}, h('button', { type: 'button', onclick: () => { dir = dir.split('/').slice(0, -1).join('/'); load(); } }, '..')), h('td'), h('td')));
    for (const e of l.entries) {
      const p = pathOf(e.name);
      const name = e.kind === 'dir'
        ? h('button', { type: 'button', onclick: () => { dir = p; load(); } }, e.name + '/')
        : h('span', { class: 'mono' }, e.name);
      const acts = h('td', {});
      if (e.kind === 'file') acts.append(h('button', { type: 'button', 'aria-label': `Download ${e.name}`, onclick: () => download(p, e.name) }, 'Download'), ' ');
      acts.append(h('button', { type: 'button', class: 'danger', 'aria-label': `Delete ${e.name}`, onclick: async () => { if (confirm(`Delete ${e.name}?`)) { await attempt(() => del(`/v1/boxes/${enc(b.id)}/files/${p}`)); load(); } } }, 'Delete'));
      rows.push(h('tr', { 'data-file': e.name }, h('td', {}, name), h('td', { class: 'num' }, e.kind === 'file' ? fmtBytes(e.size) : ''), acts));
    }
    if (l.truncated) rows.push(h('tr', {}, h('td', { colspan: 3, class: 'muted' }, 'More entries than one listing holds.')));
    list.replaceChildren(...rows);
  }
  async function download(p, name) {
    const r = await attempt(() => call('GET', `/v1/boxes/${enc(b.id)}/files/${p}`, undefined, true));
    if (!r) return;
    const url = URL.createObjectURL(await r.blob());
    const a = h('a', { href: url, download: name });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }
  el.append(where, h('div', { class: 'row' }, field('Upload', upload)), h('table', { id: 'files' }, h('thead', {}, h('tr', {}, h('th', {}, 'Name'), h('th', { class: 'num' }, 'Size'), h('th'))), list));
  await load();
}

async function terminal(el, b, ctx) {
  const status = h('p', { class: 'muted', id: 'term-status' }, 'Connecting…');
  const screen = h('div', { id: 'terminal' });
  el.append(status, screen, h('p', { class: 'muted' }, 'Shift+Tab leaves the terminal.'));
  const term = new Terminal(screen);
  term.fit();
  const ws = openPty(b.id, term.cols, term.rows);
  term.onData = (bytes) => { if (ws.readyState === 1) ws.send(bytes); };
  term.onResize = (cols, rows) => { if (ws.readyState === 1) ws.send(JSON.stringify({ type: 'resize', cols, rows })); };
  ws.onopen = () => { status.textContent = 'Connected: a shell in the box as its agent user.'; screen.focus(); };
  ws.onmessage = (m) => {
    if (typeof m.data === 'string') {
      const c = JSON.parse(m.data);
      if (c.type === 'exit') status.textContent = `The shell exited (${c.code ?? 'signal ' + c.signal}).`;
      if (c.type === 'error') status.textContent = `Terminal error: ${c.message}`;
    } else term.write(new Uint8Array(m.data));
  };
  ws.onclose = (e) => { if (!status.textContent.startsWith('The shell')) status.textContent = `Disconnected${e.reason ? ': ' + e.reason : ''}.`; };
  const ro = new ResizeObserver(() => term.fit());
  ro.observe(screen);
  screen.addEventListener('focus', () => term.render());
  screen.addEventListener('blur', () => term.render());
  window.berthTerminal = term; // for tests and the curious: the screen's text
  ctx.onLeave(() => { ro.disconnect(); ws.close(); });
}

async function boxEvents(el, b, ctx) {
  const tbody = h('tbody');
  let after = 0;
  el.append(h('table', { id: 'box-events' }, h('thead', {}, h('tr', {}, ['#', 'Time', 'Type', 'Data'].map((t) => h('th', {}, t)))), tbody));
  const load = async () => {
    const r = await attempt(() => get(`/v1/boxes/${enc(b.id)}/events?after=${after}`));
    for (const e of (r && r.items) || []) {
      after = Math.max(after, e.seq);
      tbody.append(h('tr', {}, h('td', { class: 'num' }, e.seq), h('td', {}, e.ts), h('td', {}, e.type), h('td', {}, h('pre', {}, JSON.stringify(e.data)))));
    }
  };
  await load();
  every(2000, load, ctx);
}

// A port as a link a browser can open: the server issues a short-lived link for this box and
// port (signed, no API key in it); the page behind it runs sandboxed in an opaque origin.
async function ports(el, b) {
  const port = h('input', { type: 'number', min: '1', max: '65535', value: '8000', id: 'port' });
  const out = h('div', { id: 'port-links' });
  el.append(h('p', { class: 'muted' }, 'Open a port a process in the box listens on. The link is valid for 15 minutes, for this box and port only, and carries no API key; its pages run sandboxed (no access to this console).'),
    h('form', { class: 'row', onsubmit: async (e) => {
      e.preventDefault();
      const n = Number(port.value);
      const link = await attempt(() => post(`/v1/boxes/${enc(b.id)}/port-links`, { port: n }));
      if (!link) return;
      out.prepend(h('p', { 'data-port': n }, h('a', { href: link.url, target: '_blank', rel: 'noopener noreferrer', class: 'mono', id: `port-link-${n}` }, `port ${n}`),
        h('span', { class: 'muted' }, ` · valid until ${link.expires_at}`)));
    } }, field('Port', port), h('button', { type: 'submit', id: 'port-open' }, 'Get link')), out);
}

async function boxSessions(el, b) {
  const list = await get(`/v1/sessions?box=${enc(b.id)}`);
  el.append(sessionTable(list.items));
}

// ---- Sessions ----

// Sessions in pages of PAGE rows: one request for the whole list (no per-row fetches), and
// only the shown page is in the document, so a thousand stored sessions render as fast as a
// hundred.
const PAGE = 100;

function sessionRows(items) {
  return items.map((s) => h('tr', { 'data-session': s.id }, h('td', {}, h('a', { href: `#/session/${enc(s.id)}` }, s.id)), stateCell(s.state), h('td', {}, s.agent.kind),
    h('td', {}, h('a', { href: `#/box/${enc(s.box_id)}` }, s.box_id)), h('td', {}, s.created_at)));
}

function sessionTable(items) {
  const tbody = h('tbody');
  const where = h('span', { class: 'muted', id: 'sessions-page', 'aria-live': 'polite' });
  const prev = h('button', { type: 'button', id: 'sessions-prev', onclick: () => show(start - PAGE) }, 'Newer');
  const next = h('button', { type: 'button', id: 'sessions-next', onclick: () => show(start + PAGE) }, 'Older');
  const filter = h('input', { id: 'sessions-filter', type: 'search', placeholder: 'id, box, state or agent', 'aria-label': 'Filter sessions' });
  let start = 0;
  let shown = items;
  function show(at) {
    start = Math.max(0, Math.min(at, Math.max(0, shown.length - 1)));
    start -= start % PAGE;
    tbody.replaceChildren(...sessionRows(shown.slice(start, start + PAGE)));
    if (!shown.length) tbody.append(h('tr', {}, h('td', { colspan: 5, class: 'muted' }, 'No sessions.')));
    where.textContent = shown.length ? `${start + 1}–${Math.min(start + PAGE, shown.length)} of ${shown.length}` : '';
    prev.disabled = start === 0;
    next.disabled = start + PAGE >= shown.length;
  }
  filter.addEventListener('input', () => {
    const q = filter.value.trim().toLowerCase();
    shown = q ? items.filter((s) => [s.id, s.box_id, s.state, s.agent.kind].some((f) => String(f).toLowerCase().includes(q))) : items;
    show(0);
  });
  show(0);
  return h('div', {}, h('div', { class: 'row' }, filter, prev, next, where),
    h('table', { id: 'sessions' }, h('thead', {}, h('tr', {}, ['Session', 'State', 'Agent', 'Box', 'Created'].map((t) => h('th', {}, t)))), tbody));
}

async function sessions(el) {
  const kind = h('select', { id: 'new-agent' }, h('option', { value: 'claude' }, 'claude'), h('option', { value: 'command' }, 'command'));
  const argv = h('input', { id: 'new-argv', placeholder: 'command agent: /bin/cat' });
  const boxId = h('input', { id: 'new-session-box', placeholder: 'box id (empty: a new ephemeral box)' });
  const prompt = h('input', { id: 'new-prompt', placeholder: 'first message' });
  const mode = h('select', { id: 'new-permission-mode' }, ['bypassPermissions', 'default', 'acceptEdits', 'plan'].map((m) => h('option', { value: m }, m)));
  const wrap = h('div');
  el.append(h('h1', {}, 'Sessions'), h('form', { class: 'row', 'aria-label': 'Start a session', onsubmit: async (e) => {
    e.preventDefault();
    const spec = { agent: kind.value === 'claude' ? { kind: 'claude', permission_mode: mode.value } : { kind: 'command', argv: argv.value.split(' ').filter(Boolean) }, keep_open: true };
    if (boxId.value.trim()) spec.box = boxId.value.trim();
    if (prompt.value.trim()) spec.prompt = prompt.value.trim();
    const s = await attempt(() => post('/v1/sessions', spec));
    if (s) location.hash = `#/session/${enc(s.id)}`;
  } }, field('Agent', kind), field('Permission mode', mode), field('Command', argv), field('Box', boxId), field('Prompt', prompt), h('button', { class: 'primary', type: 'submit', id: 'start-session' }, 'Start')), wrap);
  const list = await get('/v1/sessions');
  wrap.append(sessionTable(list.items.slice().reverse()));
}

function content(blocks) {
  if (typeof blocks === 'string') return [h('pre', {}, blocks)];
  return (blocks || []).map((b) => {
    if (b.type === 'text') return h('pre', {}, b.text);
    if (b.type === 'tool_use') return h('pre', { class: 'mono' }, `→ ${b.name} ${JSON.stringify(b.input)}`);
    if (b.type === 'thinking') return h('pre', { class: 'muted' }, b.thinking || '');
    return h('pre', { class: 'muted' }, JSON.stringify(b));
  });
}

function renderEvent(ev, sid, answered) {
  const d = ev.data || {};
  const box = h('div', { class: 'ev ev-' + ev.type, 'data-seq': ev.seq, 'data-type': ev.type }, h('div', { class: 'kind' }, `${ev.type} · #${ev.seq}`));
  switch (ev.type) {
    case 'assistant': box.append(...content(d.message && d.message.content).filter((_, i) => (d.message.content[i] || {}).type !== 'tool_use'));
      if (d.message && d.message.usage) box.append(h('div', { class: 'muted' }, `tokens in ${d.message.usage.input_tokens ?? 0} · out ${d.message.usage.output_tokens ?? 0}`));
      break;
    case 'tool_use': box.append(h('div', {}, h('strong', {}, d.name || 'tool')), h('pre', { class: 'mono' }, JSON.stringify(d.input, null, 2))); break;
    case 'tool_result': box.append(...content(d.content)); if (d.is_error) box.classList.add('error'); break;
    case 'user': box.append(h('pre', {}, typeof d.content === 'string' ? d.content : JSON.stringify(d.content ?? d))); break;
    case 'result': box.append(h('pre', {}, d.result || d.subtype || ''), h('div', { class: 'muted' }, `${d.num_turns ?? '?'} turns · ${d.total_cost_usd !== undefined ? usd(d.total_cost_usd) : ''}`)); break;
    case 'system': box.append(h('details', {}, h('summary', {}, d.subtype || 'system'), h('pre', { class: 'muted' }, JSON.stringify(d, null, 2)))); break;
    case 'status': box.append(h('span', { class: 'state-' + d.state }, d.state), d.reason ? ` — ${d.reason}` : ''); break;
    case 'stdout': case 'stderr': case 'error': box.append(h('pre', {}, d.text ?? d.message ?? JSON.stringify(d))); break;
    case 'permission_request': {
      const msg = h('input', { placeholder: 'message (for a deny)', 'aria-label': 'Message' });
      const answer = (allow) => attempt(async () => {
        await post(`/v1/sessions/${enc(sid)}/permissions/${enc(d.request_id)}`, { allow, message: msg.value || undefined });
      });
      const buttons = h('div', { class: 'row' }, h('button', { type: 'button', class: 'primary', onclick: () => answer(true) }, 'Allow'), h('button', { type: 'button', class: 'danger', onclick: () => answer(false) }, 'Deny'), msg);
      box.append(h('div', {}, 'May the agent use ', h('strong', {}, d.tool_name), '?'), h('pre', { class: 'mono' }, JSON.stringify(d.input, null, 2)), buttons);
      answered.set(d.request_id, buttons);
      break;
    }
    case 'permission_answer': {
      const b = answered.get(d.request_id);
      if (b) b.replaceChildren(h('span', { class: 'muted' }, d.allow ? 'Allowed' : 'Denied'));
      box.append(h('span', {}, `${d.allow ? 'allowed' : 'denied'}${d.by ? ' by ' + d.by : ''}${d.message ? ': ' + d.message : ''}`));
      break;
    }
    default: box.append(h('pre', { class: 'muted' }, JSON.stringify(d)));
  }
  return box;
}

async function session(el, id, ctx) {
  const s = await get(`/v1/sessions/${enc(id)}`);
  const state = h('span', { id: 'session-state', class: 'state-' + s.state }, s.state);
  const conv = h('div', { class: 'conv', id: 'conversation', 'aria-live': 'polite' });
  const text = h('textarea', { id: 'message', rows: 2, cols: 60, 'aria-label': 'Message to the agent' });
  const answered = new Map();
  el.append(h('h1', {}, 'Session ', h('span', { class: 'mono' }, s.id), ' ', state),
    h('p', { class: 'muted' }, `${s.agent.kind} in `, h('a', { href: `#/box/${enc(s.box_id)}` }, s.box_id), ` · tenant ${s.tenant}`),
    conv,
    h('form', { class: 'row', onsubmit: async (e) => {
      e.preventDefault();
      const content = text.value;
      if (!content.trim()) return;
      if (await attempt(() => post(`/v1/sessions/${enc(id)}/messages`, { content })) !== undefined) text.value = '';
    } }, text, h('button', { class: 'primary', type: 'submit', id: 'send' }, 'Send'),
    h('button', { type: 'button', id: 'interrupt', onclick: () => attempt(() => post(`/v1/sessions/${enc(id)}/interrupt`)) }, 'Interrupt')));
  text.addEventListener('keydown', (e) => { if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) e.target.form.requestSubmit(); });
  const abort = new AbortController();
  ctx.onLeave(() => abort.abort());
  // Events are rendered once per frame, all that arrived since the last one in one append: a
  // fast agent (hundreds of events a second, or a long replay) costs one layout a frame.
  let queue = [];
  const flush = () => {
    const batch = queue;
    queue = [];
    const frag = document.createDocumentFragment();
    for (const ev of batch) {
      if (ev.type === 'status' && ev.data) { state.textContent = ev.data.state; state.className = 'state-' + ev.data.state; }
      frag.append(renderEvent(ev, id, answered));
    }
    conv.append(frag);
  };
  follow(`/v1/sessions/${enc(id)}/events`, 0, (ev) => {
    if (!queue.length) requestAnimationFrame(flush);
    queue.push(ev);
  }, abort.signal).catch((e) => toast(e.message, true));
}

// ---- Usage ----

const METRICS = [['input_tokens', 'Input tokens'], ['output_tokens', 'Output tokens'], ['cache_read_tokens', 'Cache read'], ['model_usd', 'Model USD'], ['container_hours', 'Box hours'], ['container_usd', 'Box USD'], ['total_usd', 'Total USD']];
const fmtMetric = (k, v) => (k.endsWith('usd') ? usd(v) : k === 'container_hours' ? Number(v).toFixed(4) : String(v));

async function usage(el) {
  const by = h('select', { id: 'usage-by' }, ['tenant', 'model', 'box', 'session', 'day'].map((g) => h('option', { value: g }, g)));
  const metric = h('select', { id: 'usage-metric' }, METRICS.map(([k, l]) => h('option', { value: k }, l)));
  metric.value = 'total_usd';
  const out = h('div');
  let rows = [];
  const csv = h('button', { type: 'button', id: 'usage-csv', onclick: () => {
    const head = ['key', ...METRICS.map(([k]) => k)];
    const lines = [head.join(',')].concat(rows.map((r) => [JSON.stringify(r.key), ...METRICS.map(([k]) => r.usage[k])].join(',')));
    const url = URL.createObjectURL(new Blob([lines.join('\n') + '\n'], { type: 'text/csv' }));
    const a = h('a', { href: url, download: `berth-usage-by-${by.value}.csv` });
    document.body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } }, 'Export CSV');
  el.append(h('h1', {}, 'Usage'), h('div', { class: 'row' }, field('Group by', by), field('Chart', metric), csv), out);

  async function load() {
    let total;
    if (by.value === 'day') {
      // One report per UTC day, the last 14 days (the API groups by key, not by time).
      const today = new Date(Date.UTC(new Date().getUTCFullYear(), new Date().getUTCMonth(), new Date().getUTCDate()));
      const days = [];
      for (let i = 13; i >= 0; i--) days.push(new Date(today.getTime() - i * 86400000));
      const reports = await Promise.all(days.map((d) => get(`/v1/usage?group_by=tenant&from=${d.toISOString().slice(0, 19)}Z&to=${new Date(d.getTime() + 86400000).toISOString().slice(0, 19)}Z`)));
      rows = reports.map((r, i) => ({ key: days[i].toISOString().slice(0, 10), usage: r.total }));
      total = await get('/v1/usage?group_by=tenant');
      total = total.total;
    } else {
      const r = await get(`/v1/usage?group_by=${by.value}`);
      rows = r.groups;
      total = r.total;
    }
    draw(total);
  }
  function draw(total) {
    const k = metric.value;
    const max = Math.max(0, ...rows.map((r) => Number(r.usage[k]) || 0)) || 1;
    const chart = h('div', { id: 'usage-chart', role: 'img', 'aria-label': `${k} by ${by.value}` }, rows.map((r) => {
      const fill = h('div', { class: 'fill' });
      fill.style.width = `${(100 * (Number(r.usage[k]) || 0)) / max}%`;
      return h('div', { class: 'bar' }, h('span', { class: 'label mono', title: r.key }, r.key), h('div', { class: 'track' }, fill), h('span', { class: 'value' }, fmtMetric(k, r.usage[k])));
    }));
    const table = h('table', { id: 'usage-table' }, h('thead', {}, h('tr', {}, h('th', {}, by.value), METRICS.map(([, l]) => h('th', { class: 'num' }, l)))),
      h('tbody', {}, rows.map((r) => h('tr', {}, h('td', { class: 'mono' }, r.key), METRICS.map(([m]) => h('td', { class: 'num' }, fmtMetric(m, r.usage[m]))))),
        h('tr', { id: 'usage-total' }, h('th', {}, 'Total'), METRICS.map(([m]) => h('td', { class: 'num', 'data-metric': m, 'data-value': String(total[m]) }, fmtMetric(m, total[m]))))));
    out.replaceChildren(chart, table);
  }
  by.addEventListener('change', () => attempt(load));
  metric.addEventListener('change', () => attempt(load));
  await load();
}

// ---- Keys (admin) ----

async function keys(el) {
  const tenant = h('input', { id: 'new-key-tenant', required: true, placeholder: 'tenant name' });
  const admin = h('input', { type: 'checkbox', id: 'new-key-admin' });
  const secret = h('div');
  const tbody = h('tbody');
  el.append(h('h1', {}, 'API keys'), h('form', { class: 'row', onsubmit: async (e) => {
    e.preventDefault();
    const k = await attempt(() => post('/v1/keys', { tenant: tenant.value.trim(), admin: admin.checked }));
    if (!k) return;
    secret.replaceChildren(h('p', {}, 'The new key, shown once:'), h('div', { class: 'secret', id: 'new-secret' }, k.key));
    load();
  } }, field('Tenant', tenant), h('label', {}, 'Admin', admin), h('button', { class: 'primary', type: 'submit' }, 'Create key')), secret,
  h('table', { id: 'keys' }, h('thead', {}, h('tr', {}, ['Key', 'Tenant', 'Admin', 'Created', ''].map((t) => h('th', {}, t)))), tbody));
  async function load() {
    const l = await get('/v1/keys');
    tbody.replaceChildren(...l.items.map((k) => h('tr', {}, h('td', { class: 'mono' }, k.id), h('td', {}, k.tenant), h('td', {}, k.admin ? 'yes' : ''), h('td', {}, k.created_at),
      h('td', {}, h('button', { type: 'button', class: 'danger', onclick: async () => { if (confirm(`Delete key ${k.id}? Its streams and terminals close.`)) { await attempt(() => del(`/v1/keys/${enc(k.id)}`)); load(); } } }, 'Delete')))));
  }
  await load();
}

// ---- Triggers ----

async function triggers(el) {
  const boxId = h('input', { id: 'trigger-box', placeholder: 'box id (empty: a new box per firing)' });
  const prompt = h('input', { id: 'trigger-prompt', required: true, placeholder: 'prompt, e.g. Review {{pull_request.url}}' });
  const schedule = h('input', { id: 'trigger-schedule', placeholder: 'cron, e.g. 0 */15 * * * * (optional)' });
  const secret = h('div');
  const tbody = h('tbody');
  el.append(h('h1', {}, 'Triggers'), h('form', { class: 'row', onsubmit: async (e) => {
    e.preventDefault();
    const spec = { agent: { kind: 'claude' }, prompt: prompt.value };
    if (boxId.value.trim()) spec.box = boxId.value.trim();
    if (schedule.value.trim()) spec.schedule = schedule.value.trim();
    const t = await attempt(() => post('/v1/triggers', spec));
    if (!t) return;
    secret.replaceChildren(h('p', {}, `Webhook ${t.webhook_path || '(none)'}; its secret, shown once:`), h('div', { class: 'secret', id: 'trigger-secret' }, t.secret || ''));
    load();
  } }, field('Box', boxId), field('Prompt', prompt), field('Schedule', schedule), h('button', { class: 'primary', type: 'submit' }, 'Create trigger')), secret,
  h('table', { id: 'triggers' }, h('thead', {}, h('tr', {}, ['Trigger', 'Prompt', 'Schedule', 'Fired', 'Last session', ''].map((t) => h('th', {}, t)))), tbody));
  async function load() {
    const l = await get('/v1/triggers');
    tbody.replaceChildren(...l.items.map((t) => h('tr', {}, h('td', { class: 'mono' }, t.id), h('td', {}, t.prompt), h('td', {}, t.schedule || ''), h('td', { class: 'num' }, t.fired),
      h('td', {}, t.last_session_id ? h('a', { href: `#/session/${enc(t.last_session_id)}` }, t.last_session_id) : ''),
      h('td', {}, h('button', { type: 'button', class: 'danger', onclick: async () => { await attempt(() => del(`/v1/triggers/${enc(t.id)}`)); load(); } }, 'Delete')))));
  }
  await load();
}

export const pages = { boxes, box, sessions, session, usage, keys, triggers, agents, environments };
export { auth };
