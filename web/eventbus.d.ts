// Types of eventbus.js (the DOM bridge's are in eventbus-dom.d.ts).

/** An event as the bus stores and delivers it (DESIGN §1, docs/protocol.md §1). */
export interface StoredEvent {
  seq: number;
  id: string;
  channel: string;
  type: string;
  source: string;
  time: string;
  specversion: "1.0";
  key?: string;
  deleted?: boolean;
  data?: unknown;
  [extension: string]: unknown;
}

/** What `publish` sends: `channel` and `type` at least; `id` is given when missing. */
export interface NewEvent {
  channel: string;
  type: string;
  id?: string;
  key?: string;
  deleted?: boolean;
  data?: unknown;
  [extension: string]: unknown;
}

export interface Ack {
  id: string;
  channel: string;
  seq: number;
  /** true when this id had been stored before (a retry): nothing was stored twice. */
  duplicate: boolean;
}

export interface SubscribeOptions {
  /** Deliver the history after this seq first (0: from the start). Without it: live from now. */
  after?: number;
  /** With `after`: only the latest event per key (tombstones drop keys). */
  compact?: boolean;
  /** Services only: a queue group; each event reaches one member. */
  group?: string;
  /** Called with an error frame about this subscription (e.g. forbidden, truncated). */
  onError?: (frame: { op: "error"; code: string; message: string; [k: string]: unknown }) => void;
}

export interface Subscription {
  readonly channel: string;
  unsubscribe(): void;
}

export type ConnectionState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

export interface EventBusOptions {
  /**
   * A token, or a function returning one (called at every connect and before expiry). Left out,
   * the bus asks the application's connect hook with the page's cookies (docs/protocol.md §9).
   */
  token?: string | (() => string | Promise<string>);
  /** Seconds before the token's expiry to send a fresh one (default 60). */
  refreshBeforeS?: number;
  /** Reconnect backoff (default 250 ms doubling to 10 s, with jitter). */
  backoff?: { initialMs?: number; maxMs?: number };
  /** The WebSocket class (default: globalThis.WebSocket). */
  WebSocket?: typeof WebSocket | null;
  /** "auto" (default: WebSocket where available, else SSE), "websocket" or "sse". */
  transport?: "auto" | "websocket" | "sse";
  /** Base URL of the HTTP API for the SSE transport (default: derived from the WebSocket URL). */
  httpUrl?: string;
  EventSource?: typeof EventSource;
  fetch?: typeof fetch;
}

/**
 * Events: `state` (`event.state`: ConnectionState), `disconnect` (`event.code`, `event.reason`),
 * `error` (`event.error`).
 */
export class EventBus extends EventTarget {
  constructor(url: string, options: EventBusOptions);
  readonly state: ConnectionState;
  readonly identity: string | null;
  connect(): Promise<{ op: "welcome"; identity: string; role: string; connection: string; expires_at: number }>;
  subscribe(channel: string, handler: (event: StoredEvent) => void, options?: SubscribeOptions): Subscription;
  publish(event: NewEvent): Promise<Ack>;
  close(): void;
}

export function backoffDelay(attempt: number, options?: { initialMs?: number; maxMs?: number }, random?: () => number): number;
export function covers(pattern: string, channel: string): boolean;

/** The claims of `POST /v1/tokens` (docs/protocol.md §2). */
export interface TokenClaims {
  sub?: string;
  role?: "client" | "service";
  subscribe?: string[];
  publish?: string[];
  ttl_s?: number;
}
/** Mints a token with an API key or a service token as `credential` (in a backend). */
export function mintToken(
  baseUrl: string,
  claims?: TokenClaims,
  options?: { credential?: string; fetch?: typeof fetch },
): Promise<{ token: string; expires_at: string }>;
