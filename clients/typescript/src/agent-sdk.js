// spawnClaudeCodeProcess for @anthropic-ai/claude-agent-sdk: the CLI runs in a berth box.
//
//   import { query } from '@anthropic-ai/claude-agent-sdk';
//   import { berthSpawn } from 'berth-client/agent-sdk';
//   for await (const m of query({ prompt: 'hi', options: { spawnClaudeCodeProcess: berthSpawn() } })) …
//
// The SDK's CLI arguments become an sdk session's `args` (berth checks them against its
// allowlist and runs its own pinned CLI with its own environment: the executable, `env` and
// `cwd` the SDK passes are not used). stdin/stdout are relayed over the session's WebSocket;
// a dropped socket is reconnected from the stdout offset reached, resending the stdin bytes
// the server had not taken (kept until the server's `stdin_taken` acknowledgement).

import { EventEmitter } from 'node:events';
import { PassThrough } from 'node:stream';
import WebSocket from 'ws';
import { Berth } from './index.js';

/** Largest stdin frame sent: the server takes messages of at most 1 MiB. */
const FRAME = 512 << 10;

function sendChunked(ws, buf) {
  for (let i = 0; i < buf.length; i += FRAME) ws.send(buf.subarray(i, i + FRAME));
}

/** Leading arguments that are not flags (a script path when the SDK runs `node cli.js`). */
function cliArgs(args) {
  const i = args.findIndex((a) => a.startsWith('-'));
  return i < 0 ? [] : args.slice(i);
}

class BerthProcess extends EventEmitter {
  constructor(api, box, spawnOptions, reconnectForMs) {
    super();
    this.api = api;
    this.stdin = new PassThrough();
    this.stdout = new PassThrough();
    this.killed = false;
    this.exitCode = null;
    this.signalCode = null;
    this.sessionId = null;
    this.boxId = null;
    this.reconnects = 0;
    this.reconnectForMs = reconnectForMs;
    this.stdoutOffset = 0;
    // Stdin written but maybe not yet taken by the server: chunks from offset stdinBase on.
    this.stdinLog = [];
    this.stdinLogLength = 0;
    this.stdinBase = 0;
    this.ws = null;
    this.ended = false;
    this.inputEnded = false;
    spawnOptions.signal?.addEventListener('abort', () => this.kill('SIGTERM'));
    this.start(box, cliArgs(spawnOptions.args)).catch((e) => this.fail(e));
  }

  async start(box, args) {
    const s = await this.api.createSession({ kind: 'claude', client: 'sdk', args }, { box });
    this.sessionId = s.id;
    this.boxId = s.box_id;
    this.emit('session', s);
    if (this.killed) return this.stopSession();
    await this.open();
    this.stdin.on('data', (chunk) => {
      this.stdinLog.push(chunk);
      this.stdinLogLength += chunk.length;
      if (this.ws?.readyState === WebSocket.OPEN) sendChunked(this.ws, chunk);
    });
    this.stdin.on('end', () => {
      this.inputEnded = true;
      if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify({ type: 'end_input' }));
    });
  }

  open() {
    return new Promise((resolve, reject) => {
      const url = `${this.api.url.replace(/^http/, 'ws')}/v1/sessions/${this.sessionId}/sdk?stdout_offset=${this.stdoutOffset}`;
      const ws = new WebSocket(url, { headers: { authorization: `Bearer ${this.api.apiKey}` } });
      let hello = false;
      ws.on('message', (data, isBinary) => {
        if (isBinary) {
          this.stdoutOffset += data.length;
          this.stdout.write(data);
          return;
        }
        const msg = JSON.parse(data.toString());
        if (msg.type === 'hello') {
          hello = true;
          const taken = msg.stdin_offset;
          if (!this.trim(taken)) {
            ws.close();
            this.fail(new Error(`berth took ${taken} stdin bytes; this client wrote ${this.stdinBase + this.stdinLogLength}`));
            return resolve();
          }
          this.ws = ws;
          for (const c of this.stdinLog) sendChunked(ws, c);
          if (this.inputEnded) ws.send(JSON.stringify({ type: 'end_input' }));
          resolve();
        } else if (msg.type === 'stdin_taken') {
          if (this.ws === ws) this.trim(msg.offset);
        } else if (msg.type === 'exit') {
          this.finish(msg.code, msg.signal);
        } else if (msg.type === 'error') {
          this.stdout.emit('error', new Error(`berth: ${JSON.stringify(msg.error)}`));
        }
      });
      ws.on('error', (e) => { if (!hello) reject(e); });
      ws.on('close', (code) => {
        if (!hello) return reject(new Error(`berth closed the connection (${code})`));
        if (this.ended || this.killed) return;
        if (code === 4001 || code === 4002 || code === 1008) return this.fail(new Error(`berth closed the session's connection (${code})`));
        this.reconnect();
      });
    });
  }

  async reconnect() {
    this.reconnects += 1;
    const deadline = Date.now() + this.reconnectForMs;
    let delay = 100;
    while (Date.now() < deadline && !this.ended && !this.killed) {
      try {
        await this.open();
        return;
      } catch {
        await new Promise((r) => setTimeout(r, delay));
        delay = Math.min(delay * 2, 2000);
      }
    }
    if (!this.ended && !this.killed) this.fail(new Error('could not reconnect to berth'));
  }

  /** Forget the stdin the server has taken; false if `taken` is not within what was written. */
  trim(taken) {
    if (!Number.isSafeInteger(taken) || taken < this.stdinBase || taken > this.stdinBase + this.stdinLogLength) return false;
    let drop = taken - this.stdinBase;
    this.stdinBase = taken;
    this.stdinLogLength -= drop;
    while (drop > 0) {
      const c = this.stdinLog[0];
      if (c.length <= drop) {
        this.stdinLog.shift();
        drop -= c.length;
      } else {
        this.stdinLog[0] = c.subarray(drop);
        drop = 0;
      }
    }
    return true;
  }

  /** For tests: cut the socket as a network failure would. */
  dropConnection() { this.ws?._socket?.destroy(); }

  finish(code, signal) {
    if (this.ended) return;
    this.ended = true;
    this.exitCode = code ?? null;
    this.signalCode = signal ? `SIG${signal}` : null;
    this.stdout.end();
    this.ws?.close();
    this.emit('exit', this.exitCode, this.signalCode);
  }

  fail(err) {
    if (this.ended) return;
    this.emit('error', err);
    this.finish(1, null);
  }

  async stopSession() {
    if (this.sessionId) await this.api.deleteSession(this.sessionId).catch(() => {});
  }

  kill(signal) {
    if (this.ended || this.killed) return false;
    this.killed = true;
    this.stopSession().finally(() => {
      this.finish(null, signal === 'SIGKILL' ? 9 : 15);
    });
    return true;
  }
}

/**
 * A spawnClaudeCodeProcess that runs the CLI in a berth box. `box`: a box id, a box spec,
 * or undefined for a new ephemeral box. `url`/`apiKey` default to BERTH_URL/BERTH_TOKEN.
 * `onSpawn` receives each process (its `sessionId` and `boxId` are set once the session exists).
 */
export function berthSpawn({ url, apiKey, box, reconnectForMs = 30000, onSpawn } = {}) {
  const api = new Berth({ url, apiKey });
  return (spawnOptions) => {
    const p = new BerthProcess(api, box, spawnOptions, reconnectForMs);
    onSpawn?.(p);
    return p;
  };
}
