export declare class BerthError extends Error {
  readonly status: number;
  readonly code: string;
  readonly detail: string;
}

export interface Box { id: string; state: string; lifecycle: string; backend: string; created_at: string; [k: string]: unknown }
export interface Session {
  id: string; box_id: string; state: string; state_reason?: string | null;
  agent: Record<string, unknown>; agent_session_id?: string | null; last_seq: number; [k: string]: unknown;
}
export interface Event { seq: number; session_id: string; ts: string; type: string; data: any }
export interface ExecResult { exit_code: number | null; signal: number | null; timed_out: boolean; oom_killed: boolean; stdout: string; stderr: string; truncated: boolean }
export interface ExecOptions { stdin?: string; cwd?: string; env?: Record<string, string>; timeout_s?: number; /** Give the command ANTHROPIC_BASE_URL and a token of its own (metered to the box). */ model?: boolean }
export type BoxRef = string | Record<string, unknown>;

export declare class Berth {
  constructor(opts?: { url?: string; apiKey?: string });
  readonly url: string;
  readonly apiKey: string;
  createBox(spec?: Record<string, unknown>): Promise<Box>;
  getBox(id: string): Promise<Box>;
  listBoxes(): Promise<Box[]>;
  deleteBox(id: string): Promise<Box>;
  exec(id: string, argv: string[], opts?: ExecOptions): Promise<ExecResult>;
  readFile(id: string, path: string): Promise<Buffer>;
  writeFile(id: string, path: string, data: string | Uint8Array): Promise<void>;
  listDir(id: string, path?: string): Promise<{ path: string; entries: { name: string; [k: string]: unknown }[]; truncated: boolean }>;
  deleteFile(id: string, path: string): Promise<void>;
  createSession(agent: Record<string, unknown>, opts?: { box?: BoxRef; prompt?: string; workdir?: string; keepOpen?: boolean }): Promise<Session>;
  getSession(id: string): Promise<Session>;
  listSessions(box?: string): Promise<Session[]>;
  deleteSession(id: string): Promise<Session>;
  sendMessage(id: string, content: string | unknown[]): Promise<void>;
  interrupt(id: string): Promise<void>;
  sessionUsage(id: string): Promise<Record<string, any>>;
  usage(opts?: { groupBy?: 'session' | 'box' | 'tenant' | 'model'; from?: string; to?: string }): Promise<Record<string, any>>;
  events(id: string, opts?: { after?: number; retries?: number }): AsyncGenerator<Event>;
}
