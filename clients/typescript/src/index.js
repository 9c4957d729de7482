// A client for berth's HTTP API (boxes, exec, files, sessions, events with resume, usage).
// Types: index.d.ts. Errors are BerthError with the HTTP status and the server's
// {"error": {"code", "message"}}.

export class BerthError extends Error {
  constructor(status, code, message) {
    super(`${status} ${code}: ${message}`);
    this.status = status;
    this.code = code;
    this.detail = message;
  }
}

const q = encodeURIComponent;
const qp = (p) => p.replace(/^\/+/, '').split('/').map(q).join('/');

export class Berth {
  constructor({ url, apiKey } = {}) {
    this.url = (url ?? process.env.BERTH_URL ?? '').replace(/\/+$/, '');
    this.apiKey = apiKey ?? process.env.BERTH_TOKEN ?? '';
    if (!this.url) throw new BerthError(0, 'config', 'no berth URL: pass url or set BERTH_URL');
    if (!this.apiKey) throw new BerthError(0, 'config', 'no API key: pass apiKey or set BERTH_TOKEN');
  }

  async request(method, path, { json, body, query } = {}) {
    let url = this.url + path;
    if (query) {
      const qs = new URLSearchParams(Object.entries(query).filter(([, v]) => v != null));
      if ([...qs].length) url += `?${qs}`;
    }
    const headers = { authorization: `Bearer ${this.apiKey}` };
    if (json !== undefined) {
      headers['content-type'] = 'application/json';
      body = JSON.stringify(json);
    }
    let res;
    try {
      res = await fetch(url, { method, headers, body });
    } catch (e) {
      throw new BerthError(0, 'unreachable', String(e?.cause ?? e));
    }
    if (!res.ok) {
      const text = await res.text();
      try {
        const e = JSON.parse(text).error;
        throw new BerthError(res.status, e.code, e.message);
      } catch (e) {
        if (e instanceof BerthError) throw e;
        throw new BerthError(res.status, 'http', text.slice(0, 500));
      }
    }
    return res;
  }

  async json(method, path, opts) {
    const res = await this.request(method, path, opts);
    const text = await res.text();
    return text ? JSON.parse(text) : null;
  }

  // ---- boxes ----
  createBox(spec = {}) { return this.json('POST', '/v1/boxes', { json: spec }); }
  getBox(id) { return this.json('GET', `/v1/boxes/${q(id)}`); }
  async listBoxes() { return (await this.json('GET', '/v1/boxes')).items; }
  deleteBox(id) { return this.json('DELETE', `/v1/boxes/${q(id)}`); }
  exec(id, argv, opts = {}) { return this.json('POST', `/v1/boxes/${q(id)}/exec`, { json: { argv, ...opts } }); }

  // ---- files (relative to the box's /workspace) ----
  async readFile(id, path) {
    const res = await this.request('GET', `/v1/boxes/${q(id)}/files/${qp(path)}`);
    return Buffer.from(await res.arrayBuffer());
  }
  async writeFile(id, path, data) { await this.request('PUT', `/v1/boxes/${q(id)}/files/${qp(path)}`, { body: data }); }
  listDir(id, path = '') { return this.json('GET', `/v1/boxes/${q(id)}/files/${path ? qp(path) : ''}`); }
  async deleteFile(id, path) { await this.request('DELETE', `/v1/boxes/${q(id)}/files/${qp(path)}`); }

  // ---- sessions ----
  createSession(agent, { box, prompt, workdir, keepOpen } = {}) {
    const body = { agent };
    if (box !== undefined) body.box = box;
    if (prompt !== undefined) body.prompt = prompt;
    if (workdir !== undefined) body.workdir = workdir;
    if (keepOpen) body.keep_open = true;
    return this.json('POST', '/v1/sessions', { json: body });
  }
  getSession(id) { return this.json('GET', `/v1/sessions/${q(id)}`); }
  async listSessions(box) { return (await this.json('GET', '/v1/sessions', { query: { box } })).items; }
  deleteSession(id) { return this.json('DELETE', `/v1/sessions/${q(id)}`); }
  async sendMessage(id, content) { await this.json('POST', `/v1/sessions/${q(id)}/messages`, { json: { content } }); }
  async interrupt(id) { await this.json('POST', `/v1/sessions/${q(id)}/interrupt`, { json: {} }); }
  sessionUsage(id) { return this.json('GET', `/v1/sessions/${q(id)}/usage`); }
  usage({ groupBy, from, to } = {}) { return this.json('GET', '/v1/usage', { query: { group_by: groupBy, from, to } }); }

  /**
   * The session's events with seq > after, live, until the server ends the stream; a dropped
   * connection is resumed from the last seq seen (at most `retries` failures in a row).
   */
  async *events(id, { after = 0, retries = 5 } = {}) {
    let last = after;
    let failures = 0;
    for (;;) {
      let res;
      try {
        res = await this.request('GET', `/v1/sessions/${q(id)}/events`, { query: { after: last } });
        failures = 0;
        let buf = '';
        const dec = new TextDecoder();
        for await (const chunk of res.body) {
          buf += dec.decode(chunk, { stream: true });
          let i;
          while ((i = buf.indexOf('\n\n')) >= 0) {
            const frame = buf.slice(0, i);
            buf = buf.slice(i + 2);
            const data = frame.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).replace(/^ /, '')).join('\n');
            const kind = frame.split('\n').find((l) => l.startsWith('event:'))?.slice(6).trim();
            if (!data) continue;
            if (kind === 'error') {
              const e = JSON.parse(data).error ?? {};
              throw new BerthError(0, e.code ?? 'stream', e.message ?? '');
            }
            const ev = JSON.parse(data);
            if (ev.seq > last) {
              last = ev.seq;
              yield ev;
            }
          }
        }
        return;
      } catch (e) {
        if (e instanceof BerthError) throw e;
        if (++failures > retries) throw e;
        await new Promise((r) => setTimeout(r, Math.min(200 * 2 ** failures, 5000)));
      }
    }
  }
}
