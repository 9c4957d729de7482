// The console's only way to the server: the public API, with the key the user typed.
// The key lives in this tab's sessionStorage only: never in a URL, never in a cookie.

const KEY = 'berth.key';

export const auth = {
  get key() { return sessionStorage.getItem(KEY); },
  set(k) { sessionStorage.setItem(KEY, k); },
  clear() { sessionStorage.removeItem(KEY); },
  admin: false,
  tenant: '',
};

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || `HTTP ${status}`);
    this.status = status;
    this.code = code;
  }
}

function headers(extra) {
  return Object.assign({ Authorization: 'Bearer ' + (auth.key || '') }, extra || {});
}

async function failure(r) {
  let body = {};
  try { body = await r.json(); } catch (_) { /* not JSON */ }
  const e = body.error || {};
  return new ApiError(r.status, e.code, e.message || r.statusText);
}

// One API call; JSON in and out unless `raw` (then the Response) or a Blob body.
export async function call(method, path, body, raw) {
  const init = { method, headers: headers(), cache: 'no-store', credentials: 'omit' };
  if (body instanceof Blob) {
    init.body = body;
    init.headers['Content-Type'] = 'application/octet-stream';
  } else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers['Content-Type'] = 'application/json';
  }
  const r = await fetch(path, init);
  if (!r.ok) throw await failure(r);
  if (raw) return r;
  const text = await r.text();
  return text ? JSON.parse(text) : null;
}

export const get = (p) => call('GET', p);
export const post = (p, b) => call('POST', p, b === undefined ? {} : b);
export const del = (p) => call('DELETE', p);
export const put = (p, blob) => call('PUT', p, blob);

const sleep = (ms) => new Promise((res) => setTimeout(res, ms));

// Follow a session's SSE stream from `after` (replayed from the store, then live), calling
// `onEvent` for each event in order; a dropped connection resumes after the last seq seen.
// Ends when the server ends the stream (the session is over) or `signal` aborts.
export async function follow(path, after, onEvent, signal) {
  let last = after;
  for (let attempt = 0; !signal.aborted; attempt++) {
    try {
      const r = await fetch(`${path}?after=${last}`, {
        headers: headers({ Accept: 'text/event-stream' }),
        cache: 'no-store', credentials: 'omit', signal,
      });
      if (!r.ok) throw await failure(r);
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buf += value;
        let i;
        while ((i = buf.indexOf('\n\n')) >= 0) {
          const frame = buf.slice(0, i);
          buf = buf.slice(i + 2);
          const data = frame.split('\n').filter((l) => l.startsWith('data:'))
            .map((l) => l.slice(5).replace(/^ /, '')).join('\n');
          if (!data) continue;
          const ev = JSON.parse(data);
          if (typeof ev.seq === 'number') {
            if (ev.seq <= last) continue;
            last = ev.seq;
          }
          attempt = 0;
          onEvent(ev);
        }
      }
    } catch (e) {
      if (signal.aborted) return;
      if (e instanceof ApiError && e.status < 500) throw e;
      await sleep(Math.min(5000, 250 * 2 ** Math.min(attempt, 5)));
    }
  }
}

// A terminal WebSocket to a box. Browsers cannot set headers on a WebSocket: the key goes as
// a subprotocol entry (`berth.key.<key>`), the server selects `berth.pty`.
export function openPty(boxId, cols, rows) {
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const url = `${proto}//${location.host}/v1/boxes/${encodeURIComponent(boxId)}/pty?cols=${cols}&rows=${rows}`;
  const ws = new WebSocket(url, ['berth.pty', 'berth.key.' + auth.key]);
  ws.binaryType = 'arraybuffer';
  return ws;
}
