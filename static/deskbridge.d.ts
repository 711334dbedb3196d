// Types for /deskbridge.js, the deskbridge browser client.

export interface DeskBridgeOptions {
  /** WebSocket URL, or several tried in turn (the next one after a failed attempt). Default: `/ws` on this page's host. */
  url?: string | string[];
  /** Returns a JWT (or null for none); called before every connection and before each refresh. */
  token?: (() => Promise<string | null> | string | null) | null;
  /** Where the token goes: an `auth` frame (default: keeps it out of URLs and proxy logs) or `?token=`. */
  tokenIn?: "frame" | "query";
  /** Reconnect delay: `initialMs * factor^attempt` capped at `maxMs`, then a random 50–100 % of it. Defaults 500, 30000, 2. */
  backoff?: { initialMs?: number; maxMs?: number; factor?: number };
  /** How many recent event ids are remembered to drop duplicates (default 5000). */
  dedupe?: number;
  /** A publish with no `ack` or `error` by then rejects with `timeout` (default 45000: above the bridge's 30 s outage buffer TTL). */
  publishTimeoutMs?: number;
  /** A request rejects locally `timeoutMs` + this after it was sent (default 2000). */
  requestMarginMs?: number;
  /** subscribe, unsubscribe, refresh and presence answers are awaited this long (default 10000). */
  controlTimeoutMs?: number;
  /** Ping period; a socket silent for two periods is dropped and reopened (default 15000). */
  heartbeatMs?: number;
  /** With a token provider, refresh this long before `expires_at` (default 90000). */
  refreshBeforeMs?: number;
}

export type ConnectionState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

export interface StateDetail {
  state: ConnectionState;
  /** connecting: the URL tried; */
  url?: string;
  /** connecting / reconnecting: attempts since the last stable session. */
  attempt?: number;
  /** reconnecting: milliseconds until the next attempt. */
  delay?: number;
  /** reconnecting / closed: the WebSocket close code and reason (4401: token refused or expired). */
  code?: number;
  reason?: string;
  /** open: from `welcome`. */
  session?: string;
  user?: string | null;
}

export interface EventFrame {
  op: "event";
  desk: string;
  event: string;
  /** AMQP message_id; duplicates are dropped by it. */
  id: string;
  origin: "desktop" | "web";
  data: Record<string, unknown>;
  ref?: string;
  /** With history on: position in the desk's log, and the log's identity. */
  offset?: number;
  epoch?: string;
  /** A desktop request addressed to this session: answer it with the bridge's `reply` op. */
  reply_id?: string;
}

export interface GapDetail {
  desk: string;
  /** `not_recovered`: a resume could not continue where it left off (`from`..`to` were missed,
   * or, when the log's epoch changed, an unknown number); `conflated`: the bridge kept only
   * the latest event per key while this client was behind. */
  reason: "not_recovered" | "conflated";
  /** conflated: how many events were dropped. */
  dropped?: number;
  /** not_recovered: first and last missed offsets, when known, in the log of `epoch`. */
  from?: number;
  to?: number;
  epoch?: string;
}

export interface PresenceDetail {
  op: "join" | "leave";
  desk: string;
  session: string;
  user?: string;
}

export interface ErrorDetail {
  code: string;
  message: string;
  ref?: string;
  frame?: Record<string, unknown>;
}

export interface DeskBridgeEventMap {
  state: StateDetail;
  /** `ref`: the bridge echoes the `ref` of the op an answer answers; this client sends none on `auth` and `refresh`. */
  welcome: { op: "welcome"; session: string; version: string; desks: string[]; user?: string; expires_at?: number; ref?: string };
  event: EventFrame;
  /** An event dropped because its id (or offset) was seen already. */
  duplicate: EventFrame;
  gap: GapDetail;
  presence: PresenceDetail;
  /** The bridge left these desks (`reason: "permission"` after a refresh). */
  unsubscribed: { op: "unsubscribed"; desks: string[]; reason: string };
  expiring: { op: "expiring"; expires_at: number };
  refreshed: { op: "refreshed"; expires_at: number; ref?: string };
  /** Errors not tied to a promise: refused resubscriptions, `rate_limited`, token provider failures. */
  error: ErrorDetail;
  /** Every frame in and out (tokens shown as `***`). */
  frame: { direction: "in" | "out"; frame: Record<string, unknown> };
}

/** `code`: the bridge's error code, or `disconnected`, `closed`, `timeout`, `cancelled`, `token_provider`. */
export class DeskBridgeError extends Error {
  readonly code: string;
  readonly ref?: string;
  /** false: it never left this client (safe to retry); true: the bridge may have acted on it. */
  readonly sent: boolean;
  readonly frame?: Record<string, unknown>;
}

export class DeskBridge extends EventTarget {
  constructor(options?: DeskBridgeOptions);
  readonly state: ConnectionState;
  readonly session: string | null;
  readonly user: string | null;
  readonly expiresAt: number | null;
  /** Desks the bridge offers (from `welcome`). */
  readonly desks: string[];
  /** Desks kept subscribed across reconnects. */
  readonly subscriptions: Array<{ desk: string; presence: boolean; confirmed: boolean }>;

  on<K extends keyof DeskBridgeEventMap>(type: K, listener: (detail: DeskBridgeEventMap[K]) => void): () => void;
  connect(): void;
  close(): void;
  subscribe(desks: string | string[], options?: { presence?: boolean; last?: number }): Promise<{ desks: string[] }>;
  unsubscribe(desks: string | string[]): Promise<void>;
  publish(desk: string, event: string, data: Record<string, unknown>, options?: { ttlMs?: number }): Promise<{ id: string; routed: boolean }>;
  request(desk: string, event: string, data: Record<string, unknown>, options?: { timeoutMs?: number; ttlMs?: number }): Promise<{ id: string; data: Record<string, unknown> }>;
  /** Answers an event that carried `reply_id` (a desktop app's request). */
  reply(replyId: string, data: Record<string, unknown>): Promise<{ id: string; routed: boolean }>;
  presence(desk: string): Promise<Array<{ session: string; user?: string }>>;
  refresh(token?: string): Promise<{ expiresAt: number }>;
}
