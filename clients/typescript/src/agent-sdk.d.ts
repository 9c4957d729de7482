import type { EventEmitter } from 'node:events';
import type { Readable, Writable } from 'node:stream';
import type { BoxRef } from './index.js';

/** A berth sdk session standing in for the CLI process (satisfies the SDK's SpawnedProcess). */
export interface BerthProcess extends EventEmitter {
  stdin: Writable;
  stdout: Readable;
  readonly killed: boolean;
  readonly exitCode: number | null;
  readonly signalCode: NodeJS.Signals | null;
  /** Set once berth has made the session. */
  readonly sessionId: string | null;
  readonly boxId: string | null;
  readonly reconnects: number;
  kill(signal: NodeJS.Signals): boolean;
  dropConnection(): void;
}

export interface BerthSpawnOptions {
  url?: string;
  apiKey?: string;
  box?: BoxRef;
  reconnectForMs?: number;
  onSpawn?: (p: BerthProcess) => void;
}

export declare function berthSpawn(opts?: BerthSpawnOptions): (options: {
  command: string; args: string[]; cwd?: string; env: Record<string, string | undefined>; signal: AbortSignal;
}) => BerthProcess;
