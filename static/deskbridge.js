// deskbridge browser client: one class over the bridge's WebSocket protocol (docs/protocol.md;
// spec v2 sections A–C). An ES module with no build step and no dependency:
//
//   import { DeskBridge } from "/deskbridge.js";
//   const bridge = new DeskBridge({ token: async () => fetchJwt() });
//   bridge.on("event", (e) => console.log(e.desk, e.event, e.data));
//   bridge.connect();
//   await bridge.subscribe(["A"]); // resolves once confirmed: publish() needs an open connection
//   const { id, routed } = await bridge.publish("A", "new_example", { px: 101.5 });
//
// Types: /deskbridge.d.ts.

const DEFAULTS = {
  url: null,
  token: null,
  tokenIn: "frame",
  backoff: { initialMs: 500, maxMs: 30_000, factor: 2 },
  dedupe: 5_000,
  publishTimeoutMs: 45_000,
  requestMarginMs: 2_000,
  controlTimeoutMs: 10_000,
  heartbeatMs: 15_000,
  refreshBeforeMs: 90_000,
};

// The bridge's default `ws.max_desks_per_subscribe`: resubscribing sends desks in batches no
// larger (a smaller limit is handled by retrying desk by desk).
const MAX_DESKS_PER_FRAME = 64;
// A session that lived this long proves the bridge works: the next loss starts the backoff
// again from `initialMs`. A shorter one does not, so a bridge that welcomes and then drops
// every session is not hammered.
const STABLE_MS = 5_000;
// A subscribe refused with `broker_unavailable` is asked again after a pause that starts here
// and doubles up to the cap (each a random 50-100 % of the step, like reconnects).
const RESUBSCRIBE_MS = 500;
const RESUBSCRIBE_MAX_MS = 8_000;
// setTimeout fires at once for delays above 2^31 - 1 ms (a token valid for a month).
const MAX_TIMER_MS = 2 ** 31 - 1;

/** Why an operation failed: the bridge's error `code`, or a local one (`disconnected`, `closed`, `timeout`, `token_provider`). */
export class DeskBridgeError extends Error {
  constructor(code, message, { ref, sent = true, frame } = {}) {
    super(message);
    this.name = "DeskBridgeError";
    this.code = code;
    this.ref = ref;
    // false: the request never left this client, so retrying cannot duplicate it.
    this.sent = sent;
    this.frame = frame;
  }
}

/**
 * A connection to deskbridge that stays up: reconnects with jittered exponential backoff,
 * signs in with a token provider and refreshes before expiry, resubscribes (resuming from the
 * last offset when the bridge keeps history), drops duplicate events, and settles every
 * `publish`, `request` and `presence` promise exactly once.
 *
 * Events (`on(type, fn)` gets `detail`; or `addEventListener`): `state`, `welcome`, `event`,
 * `gap`, `presence`, `unsubscribed`, `expiring`, `refreshed`, `duplicate`, `error`, `frame`.
 */
export class DeskBridge extends EventTarget {
  #opt;
  #urls;
  #urlIndex = 0;
  #ws = null;
  #state = "idle";
  #stopped = true;
  // Bumped by connect() and close(): an awaited token that belongs to an older connect() is dropped.
  #generation = 0;
  #attempt = 0;
  #retryTimer = null;
  #openedAt = 0;
  #lastFrameAt = 0;
  #heartbeat = null;
  #refreshTimer = null;
  #session = null;
  #user = null;
  #expiresAt = null;
  #available = [];
  // Desks the application wants: kept across reconnects. desk -> { presence, last, confirmed }
  #wanted = new Map();
  // Last event position per desk (history on): desk -> { offset, epoch }
  #positions = new Map();
  // subscribe() promises waiting for their desks to be confirmed.
  #waiters = new Set();
  // publish/request promises by ref.
  #pending = new Map();
  // subscribe, unsubscribe, refresh and presence: their answers (and a refused subscribe's
  // error) carry no `ref`, so they go one at a time and the answer is matched to the one in
  // flight, #control[0].
  #control = [];
  #controlPausedUntil = 0;
  // After an `auth` frame to a bridge whose welcome shows it needs none: its ref-less refusal is
  // still to come and must not be taken for the answer to a subscribe.
  #authAnswerDue = false;
  #refreshing = null;
  #nextRef = 0;
  #seen = new Set();
  #seenRing = [];
  #seenAt = 0;

  /**
   * @param {object} [options] see deskbridge.d.ts `DeskBridgeOptions`; every field is optional.
   */
  constructor(options = {}) {
    super();
    this.#opt = { ...DEFAULTS, ...options, backoff: { ...DEFAULTS.backoff, ...options.backoff } };
    const url = this.#opt.url ?? defaultUrl();
    this.#urls = Array.isArray(url) ? [...url] : [url];
    if (this.#urls.length === 0) throw new TypeError("DeskBridge: `url` lists no URL");
  }

  /** `idle` | `connecting` | `open` | `reconnecting` | `closed`. */
  get state() { return this.#state; }
  /** The session id from `welcome` (desktop apps see it as `x-session`), or null. */
  get session() { return this.#session; }
  /** The token's `sub` (auth.mode = "jwt"), or null. */
  get user() { return this.#user; }
  /** The token's expiry, Unix seconds, or null. */
  get expiresAt() { return this.#expiresAt; }
  /** Desks this bridge offers (from `welcome`). */
  get desks() { return [...this.#available]; }
  /** Desks this client keeps subscribed, and whether the bridge has confirmed each on this connection. */
  get subscriptions() {
    return [...this.#wanted].map(([desk, s]) => ({ desk, presence: s.presence, confirmed: s.confirmed }));
  }

  /**
   * Listens to one kind of event; returns a function that stops listening.
   * @param {string} type
   * @param {(detail: any) => void} listener
   * @returns {() => void}
   */
  on(type, listener) {
    const wrapped = (e) => listener(e.detail);
    this.addEventListener(type, wrapped);
    return () => this.removeEventListener(type, wrapped);
  }

  /** Opens the connection, and keeps reopening it until close(). */
  connect() {
    if (!this.#stopped) return;
    this.#stopped = false;
    this.#generation += 1;
    this.#attempt = 0;
    this.#open();
  }

  /**
   * Closes for good (until connect()): pending promises reject with `closed`, no reconnect.
   * Subscriptions are kept for the next connect().
   */
  close() {
    this.#stopped = true;
    this.#generation += 1;
    clearTimeout(this.#retryTimer);
    const closed = new DeskBridgeError("closed", "the client was closed");
    if (this.#ws) this.#lost(this.#ws, 1000, "client closed", closed);
    for (const waiter of this.#waiters) waiter.reject(closed);
    this.#waiters.clear();
    this.#setState("closed", { code: 1000, reason: "client closed" });
  }

  /**
   * Subscribes to desks, now and after every reconnect. Resolves once the bridge confirmed all
   * of them; rejects (and forgets the desks) when it refuses them (`unknown_desk`, `forbidden`).
   * May be called before connect().
   * @param {string | string[]} desks
   * @param {{presence?: boolean, last?: number}} [options] `presence`: also get join/leave;
   *   `last`: with history, start with the last N retained events (first subscribe only).
   * @returns {Promise<{desks: string[]}>}
   */
  subscribe(desks, { presence = false, last } = {}) {
    desks = deskList(desks);
    const fresh = [];
    for (const desk of desks) {
      const current = this.#wanted.get(desk);
      if (!current || current.presence !== presence) {
        this.#wanted.set(desk, { presence, last, confirmed: false });
        fresh.push(desk);
      }
    }
    const promise = new Promise((resolve, reject) => {
      const waiter = { desks: new Set(desks), resolve: () => resolve({ desks }), reject };
      if (this.#confirmed(waiter)) waiter.resolve();
      else this.#waiters.add(waiter);
    });
    if (fresh.length && this.#state === "open") {
      this.#queueSubscribes(fresh);
      this.#pump();
    }
    return promise;
  }

  /**
   * Stops receiving these desks (and forgets their positions). Resolves once the bridge
   * answered, or at once when not connected (the next session starts without them).
   * @param {string | string[]} desks
   * @returns {Promise<void>}
   */
  unsubscribe(desks) {
    const gone = deskList(desks).filter((desk) => this.#wanted.has(desk));
    const cancelled = new DeskBridgeError("cancelled", "unsubscribed before the bridge confirmed", { sent: false });
    for (const desk of gone) this.#forget(desk, cancelled);
    if (!gone.length || this.#state !== "open") return Promise.resolve();
    return new Promise((resolve, reject) => {
      this.#enqueue({
        frame: { op: "unsubscribe", desks: gone },
        answers: (f) => f.op === "unsubscribed" && !f.reason && sameSet(f.desks, gone),
        done: () => resolve(),
        // Lost with the connection: done all the same, the next session starts without them.
        fail: (error) => (error.code === "disconnected" ? resolve() : reject(error)),
      });
    });
  }

  /**
   * Publishes an event for a desk. Resolves when the broker confirmed it (`routed: false`: no
   * desktop queue was bound for it); rejects with the bridge's code, or `disconnected` (not
   * connected: `sent: false`; the connection dropped while waiting: `sent: true`, outcome
   * unknown), or `timeout`.
   * @param {string} desk
   * @param {string} event
   * @param {object} data a JSON object
   * @param {{ttlMs?: number}} [options] `ttlMs`: AMQP expiration
   * @returns {Promise<{id: string, routed: boolean}>}
   */
  publish(desk, event, data, { ttlMs } = {}) {
    const frame = { op: "publish", desk, event, data };
    if (ttlMs != null) frame.ttl_ms = ttlMs;
    return this.#call(frame, this.#opt.publishTimeoutMs, (ack) => ({ id: ack.id, routed: ack.routed }));
  }

  /**
   * Asks the desktop apps of a desk and waits for the first reply (spec v2 C). Rejects with
   * `no_responder`, `timeout` (the bridge's, or this client's after `timeoutMs` + a margin),
   * `forbidden`, `disconnected`, ...
   * @param {string} desk
   * @param {string} event
   * @param {object} data a JSON object
   * @param {{timeoutMs?: number, ttlMs?: number}} [options] `timeoutMs`: default 10000, bridge max 60000
   * @returns {Promise<{id: string, data: object}>}
   */
  request(desk, event, data, { timeoutMs = 10_000, ttlMs } = {}) {
    const frame = { op: "request", desk, event, data, timeout_ms: timeoutMs };
    if (ttlMs != null) frame.ttl_ms = ttlMs;
    const local = timeoutMs + this.#opt.requestMarginMs;
    return this.#call(frame, local, (reply) => ({ id: reply.id, data: reply.data }));
  }

  /**
   * Answers a desktop app's request: an event that carried `reply_id`. Resolves when the broker
   * has the answer; rejects with `unknown_request` (answered already, expired, or not asked of
   * this session), `disconnected`, `timeout`.
   * @param {string} replyId the event's `reply_id`
   * @param {object} data a JSON object
   * @returns {Promise<{id: string, routed: boolean}>}
   */
  reply(replyId, data) {
    const frame = { op: "reply", reply_id: replyId, data };
    return this.#call(frame, this.#opt.publishTimeoutMs, (ack) => ({ id: ack.id, routed: ack.routed }));
  }

  /**
   * Who is on a desk, across every bridge instance (spec v2 C).
   * @param {string} desk
   * @returns {Promise<Array<{session: string, user?: string}>>}
   */
  presence(desk) {
    if (this.#state !== "open") return Promise.reject(notConnected());
    return new Promise((resolve, reject) => {
      // The spec's answer has no ref; one is sent anyway so that a bridge without presence
      // (whose `unknown_op` echoes it) is told apart from a refused subscribe.
      this.#enqueue({
        frame: { op: "presence", desk, ref: this.#ref("q") },
        answers: (f) => f.op === "presence" && f.desk === desk && Array.isArray(f.sessions),
        done: (f) => resolve(f.sessions),
        fail: reject,
      });
    });
  }

  /**
   * Sends `refresh` with `token`, or with a new one from the token provider. Done by itself
   * before expiry when a provider is set.
   * @param {string} [token]
   * @returns {Promise<{expiresAt: number}>}
   */
  refresh(token) {
    if (this.#state !== "open") return Promise.reject(notConnected());
    if (!token && this.#refreshing) return this.#refreshing;
    const refreshing = (async () => {
      const fresh = token ?? (await this.#token());
      if (!fresh) throw new DeskBridgeError("token_provider", "no token to refresh with", { sent: false });
      if (this.#state !== "open") throw notConnected();
      return new Promise((resolve, reject) => {
        this.#enqueue({
          frame: { op: "refresh", token: fresh },
          answers: (f) => f.op === "refreshed",
          done: (f) => resolve({ expiresAt: f.expires_at }),
          fail: reject,
        });
      });
    })();
    if (!token) {
      this.#refreshing = refreshing;
      const clear = () => { if (this.#refreshing === refreshing) this.#refreshing = null; };
      refreshing.then(clear, clear);
    }
    return refreshing;
  }

  // --- connection ---

  async #open() {
    clearTimeout(this.#retryTimer);
    const generation = this.#generation;
    const url = this.#urls[this.#urlIndex % this.#urls.length];
    this.#setState("connecting", { url, attempt: this.#attempt });
    let token = null;
    if (this.#opt.token) {
      try {
        token = await this.#token();
      } catch (error) {
        if (generation !== this.#generation) return;
        this.#emit("error", { code: "token_provider", message: error.message });
        return this.#retry({ code: 0, reason: "no token" });
      }
      if (generation !== this.#generation) return;
    }
    let target = url;
    if (token && this.#opt.tokenIn === "query") {
      target += (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token);
    }
    let ws;
    try {
      ws = new WebSocket(target);
    } catch (error) {
      this.#emit("error", { code: "bad_url", message: error.message });
      this.#urlIndex += 1;
      return this.#retry({ code: 0, reason: "bad url" });
    }
    this.#ws = ws;
    this.#authAnswerDue = false;
    ws.onopen = () => {
      this.#lastFrameAt = Date.now();
      if (token && this.#opt.tokenIn === "frame") {
        this.#authAnswerDue = true;
        this.#send({ op: "auth", token });
      }
    };
    ws.onmessage = (message) => {
      if (ws === this.#ws) this.#receive(message.data);
    };
    ws.onclose = (e) => this.#lost(ws, e.code, e.reason, null);
  }

  async #token() {
    try {
      return (await this.#opt.token?.()) ?? null;
    } catch (error) {
      throw new DeskBridgeError("token_provider", `the token provider failed: ${error?.message ?? error}`, { sent: false });
    }
  }

  /** The socket `ws` is gone (closed by either side, or given up on): settle what it carried, then reconnect. */
  #lost(ws, code, reason, error) {
    if (ws !== this.#ws) return;
    this.#ws = null;
    ws.onopen = ws.onmessage = ws.onclose = null;
    if (ws.readyState < 2) ws.close(code === 1000 ? 1000 : 4000, String(reason).slice(0, 100));
    clearInterval(this.#heartbeat);
    clearTimeout(this.#refreshTimer);
    const wasOpen = this.#state === "open";
    const why = error ?? new DeskBridgeError("disconnected", `connection lost (${code}${reason ? ` ${reason}` : ""}) before an answer came`);
    for (const [ref, call] of this.#pending) {
      clearTimeout(call.timer);
      call.reject(new DeskBridgeError(why.code, why.message, { ref }));
    }
    this.#pending.clear();
    const control = this.#control;
    this.#control = [];
    for (const op of control) {
      clearTimeout(op.timer);
      op.fail(new DeskBridgeError(why.code, why.message, { sent: op.sent }));
    }
    for (const wanted of this.#wanted.values()) wanted.confirmed = false;
    this.#session = null;
    if (this.#stopped) return;
    if (!wasOpen) this.#urlIndex += 1; // try the next URL
    else if (Date.now() - this.#openedAt >= STABLE_MS) this.#attempt = 0;
    this.#retry({ code, reason });
  }

  /**
   * Waits, then opens again. The wait is `initialMs * factor^attempt`, capped at `maxMs`, of
   * which a random half is kept (between 50 % and 100 %), so that browsers dropped together by
   * a bridge restart do not all come back in the same instant.
   */
  #retry({ code, reason }) {
    const { initialMs, maxMs, factor } = this.#opt.backoff;
    const ceiling = Math.min(maxMs, initialMs * factor ** this.#attempt);
    const delay = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
    this.#attempt += 1;
    this.#setState("reconnecting", { delay, attempt: this.#attempt, code, reason });
    this.#retryTimer = setTimeout(() => this.#open(), delay);
  }

  #receive(text) {
    this.#lastFrameAt = Date.now();
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return this.#emit("error", { code: "bad_frame", message: `the bridge sent a frame that is not JSON: ${String(text).slice(0, 200)}` });
    }
    if (frame === null || typeof frame !== "object") return;
    this.#emit("frame", { direction: "in", frame });
    switch (frame.op) {
      case "welcome": return this.#welcomed(frame);
      case "event": return this.#event(frame);
      case "ack": return this.#settle(frame.ref, frame);
      case "reply": return this.#settle(frame.ref, frame);
      case "error": return this.#error(frame);
      case "subscribed": return this.#subscribed(frame);
      case "unsubscribed":
        if (frame.reason) {
          // The bridge left these desks itself (a refreshed token no longer allows them).
          const error = new DeskBridgeError("forbidden", `the bridge left desks ${frame.desks} (${frame.reason})`, { frame });
          for (const desk of frame.desks ?? []) this.#forget(desk, error);
          return this.#emit("unsubscribed", frame);
        }
        return this.#answered(frame);
      case "refreshed":
        this.#scheduleRefresh(frame.expires_at);
        this.#emit("refreshed", frame);
        return this.#answered(frame);
      case "presence": return this.#answered(frame);
      case "join":
      case "leave": return this.#emit("presence", frame);
      case "gap": return this.#emit("gap", { desk: frame.desk, reason: "conflated", dropped: frame.dropped });
      case "expiring":
        this.#emit("expiring", frame);
        // Already refreshed (the timer came first): that token's expiry is later.
        if (!this.#opt.token || this.#expiresAt > frame.expires_at) return;
        this.refresh().catch((error) => this.#emit("error", errorDetail(error)));
        return;
      default: return; // pong, and ops of later bridge versions
    }
  }

  #welcomed(frame) {
    this.#session = frame.session ?? null;
    this.#user = frame.user ?? null;
    this.#available = Array.isArray(frame.desks) ? frame.desks : [];
    this.#openedAt = Date.now();
    // Our `auth` was answered by this welcome when it names a user; otherwise the bridge needs
    // no token and its refusal of the frame is still on the way.
    if (frame.user !== undefined) this.#authAnswerDue = false;
    const gone = [...this.#wanted.keys()].filter((desk) => !this.#available.includes(desk));
    for (const desk of gone) {
      const error = new DeskBridgeError("unknown_desk", `this bridge has no desk ${desk}`, { sent: false });
      this.#forget(desk, error);
      this.#emit("error", errorDetail(error));
    }
    this.#expiresAt = null;
    this.#scheduleRefresh(frame.expires_at);
    this.#queueSubscribes([...this.#wanted.keys()]);
    this.#setState("open", { session: this.#session, user: this.#user });
    this.#emit("welcome", frame);
    clearInterval(this.#heartbeat);
    this.#heartbeat = setInterval(() => this.#beat(), this.#opt.heartbeatMs);
    this.#pump();
  }

  /**
   * The bridge pings and the browser answers by itself, but a page cannot see those pings: a
   * silent network (a laptop waking up, a proxy that dropped the route) would leave this
   * client waiting for ever. So it pings too, and gives up on a socket that said nothing for
   * two periods.
   */
  #beat() {
    if (!this.#ws) return;
    if (Date.now() - this.#lastFrameAt > 2 * this.#opt.heartbeatMs) {
      return this.#lost(this.#ws, 4000, "no answer from the bridge", null);
    }
    this.#send({ op: "ping" });
  }

  #scheduleRefresh(expiresAt) {
    clearTimeout(this.#refreshTimer);
    if (typeof expiresAt !== "number") return;
    const previous = this.#expiresAt;
    this.#expiresAt = expiresAt;
    // The same expiry again means the provider gave the same token: a timer would only
    // repeat it. The bridge's `expiring` (and at worst close 4401, then a fresh token on
    // reconnect) still apply.
    if (!this.#opt.token || (previous !== null && expiresAt <= previous)) return;
    const delay = Math.max(0, Math.min(MAX_TIMER_MS, expiresAt * 1000 - Date.now() - this.#opt.refreshBeforeMs));
    this.#refreshTimer = setTimeout(() => {
      this.refresh().catch((error) => this.#emit("error", errorDetail(error)));
    }, delay);
  }

  // --- events ---

  #event(frame) {
    if (typeof frame.id === "string") {
      if (this.#seen.has(frame.id)) return this.#emit("duplicate", frame);
      this.#remember(frame.id);
    }
    if (typeof frame.offset === "number" && typeof frame.epoch === "string") {
      const last = this.#positions.get(frame.desk);
      if (last && last.epoch === frame.epoch && frame.offset <= last.offset) return this.#emit("duplicate", frame);
      this.#positions.set(frame.desk, { offset: frame.offset, epoch: frame.epoch });
    }
    this.#emit("event", frame);
  }

  /** Remembers the last `dedupe` ids: a ring, so memory stays bounded on a busy desk. */
  #remember(id) {
    const size = this.#opt.dedupe;
    if (size <= 0) return;
    const evicted = this.#seenRing[this.#seenAt];
    if (evicted !== undefined) this.#seen.delete(evicted);
    this.#seenRing[this.#seenAt] = id;
    this.#seenAt = (this.#seenAt + 1) % size;
    this.#seen.add(id);
  }

  // --- subscriptions ---

  #queueSubscribes(desks) {
    // One frame per presence choice (it applies to every desk of a frame), in batches.
    for (const presence of [false, true]) {
      const group = desks.filter((desk) => this.#wanted.get(desk)?.presence === presence);
      for (let i = 0; i < group.length; i += MAX_DESKS_PER_FRAME) {
        this.#enqueueSubscribe(group.slice(i, i + MAX_DESKS_PER_FRAME), presence);
      }
    }
  }

  #enqueueSubscribe(desks, presence, { front = false, attempt = 0 } = {}) {
    const frame = { op: "subscribe", desks };
    const since = {};
    for (const desk of desks) {
      const position = this.#positions.get(desk);
      const last = this.#wanted.get(desk)?.last;
      if (position) since[desk] = { offset: position.offset, epoch: position.epoch };
      else if (last) since[desk] = { last };
    }
    if (Object.keys(since).length) frame.since = since;
    if (presence) frame.presence = true;
    this.#enqueue({
      frame,
      answers: (f) => f.op === "subscribed" && sameSet(f.desks, desks),
      done: () => {},
      fail: (error) => {
        if (["disconnected", "closed", "timeout"].includes(error.code)) return; // kept: resubscribed on reconnect
        if (error.code === "broker_unavailable") return this.#subscribeLater(desks, presence, attempt);
        if (desks.length > 1) {
          // Subscribe is all or nothing: find the desks at fault one by one, keep the others.
          for (const desk of [...desks].reverse()) this.#enqueueSubscribe([desk], presence, { front: true });
          return;
        }
        this.#forget(desks[0], error);
        this.#emit("error", errorDetail(error));
      },
    }, { front });
  }

  /**
   * Asks again for `desks` after a pause, on this same session: `broker_unavailable` means the
   * bridge cannot serve them yet (it is attaching to the desks' history streams right after its
   * start, or its broker is away). A reconnect resubscribes everything anyway.
   */
  #subscribeLater(desks, presence, attempt) {
    const session = this.#session;
    const ceiling = Math.min(RESUBSCRIBE_MAX_MS, RESUBSCRIBE_MS * 2 ** attempt);
    const delay = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
    setTimeout(() => {
      // Only what is still wanted, unconfirmed and with the same presence choice.
      const still = desks.filter((desk) => {
        const wanted = this.#wanted.get(desk);
        return wanted && !wanted.confirmed && wanted.presence === presence;
      });
      if (this.#session === session && this.#state === "open" && still.length) {
        this.#enqueueSubscribe(still, presence, { attempt: attempt + 1 });
      }
    }, delay);
  }

  #subscribed(frame) {
    for (const desk of frame.desks ?? []) {
      const wanted = this.#wanted.get(desk);
      if (wanted) wanted.confirmed = true;
      if (wanted) wanted.last = undefined; // a snapshot is asked for once
    }
    for (const [desk, recovered] of Object.entries(frame.recovered ?? {})) {
      if (recovered) continue;
      const position = this.#positions.get(desk);
      const first = frame.first_offset?.[desk];
      const gap = { desk, reason: "not_recovered", epoch: position?.epoch, from: position ? position.offset + 1 : undefined, to: typeof first === "number" ? first - 1 : undefined };
      // The old position belongs to a log that cannot be resumed: the next event sets a new one.
      this.#positions.delete(desk);
      this.#emit("gap", gap);
    }
    for (const waiter of this.#waiters) {
      if (this.#confirmed(waiter)) {
        this.#waiters.delete(waiter);
        waiter.resolve();
      }
    }
    this.#answered(frame);
  }

  #confirmed(waiter) {
    return [...waiter.desks].every((desk) => this.#wanted.get(desk)?.confirmed);
  }

  /** No longer wants `desk`: rejects the subscribe() promises waiting for it. */
  #forget(desk, error) {
    this.#wanted.delete(desk);
    this.#positions.delete(desk);
    for (const waiter of this.#waiters) {
      if (waiter.desks.has(desk)) {
        this.#waiters.delete(waiter);
        waiter.reject(error);
      }
    }
  }

  // --- requests with a ref ---

  #call(frame, timeoutMs, toResult) {
    if (this.#state !== "open") return Promise.reject(notConnected());
    const ref = this.#ref(frame.op === "publish" ? "p" : "r");
    frame.ref = ref;
    let text;
    try {
      text = JSON.stringify(frame);
    } catch (error) {
      return Promise.reject(new DeskBridgeError("bad_request", `data cannot be sent as JSON: ${error.message}`, { ref, sent: false }));
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(ref);
        reject(new DeskBridgeError("timeout", `no answer from the bridge within ${timeoutMs} ms`, { ref }));
      }, timeoutMs);
      this.#pending.set(ref, { resolve: (answer) => resolve(toResult(answer)), reject, timer, sentAt: Date.now() });
      this.#sendText(text, frame);
    });
  }

  /** An `ack` or `reply` for `ref`; an answer to a ref already given up on is only logged (the `frame` event). */
  #settle(ref, frame) {
    const call = this.#pending.get(ref);
    if (!call) return;
    this.#pending.delete(ref);
    clearTimeout(call.timer);
    call.resolve(frame);
  }

  #error(frame) {
    const error = new DeskBridgeError(frame.code ?? "internal", frame.message ?? String(frame.code), { ref: frame.ref, frame });
    const op = this.#control[0];
    if (frame.ref !== undefined) {
      const call = this.#pending.get(frame.ref);
      if (call) {
        this.#pending.delete(frame.ref);
        clearTimeout(call.timer);
        return call.reject(error);
      }
      if (op?.sent && op.frame.ref === frame.ref) return this.#finish(op, null, error);
      return this.#emit("error", errorDetail(error));
    }
    if (this.#authAnswerDue) {
      // The refusal of our `auth` by a bridge that needs no token (see #welcomed).
      this.#authAnswerDue = false;
      this.#emit("error", errorDetail(error));
      return this.#pump();
    }
    if (error.code === "rate_limited") {
      // docs/protocol.md: a client that sees `rate_limited` must treat its unanswered requests of
      // that second as dropped. Their outcome is unknown (`sent: true`): an early one may still be acked.
      const since = Date.now() - 1000;
      for (const [ref, call] of this.#pending) {
        if (call.sentAt < since) continue;
        this.#pending.delete(ref);
        clearTimeout(call.timer);
        call.reject(new DeskBridgeError("rate_limited", error.message, { ref, frame }));
      }
      if (op?.sent && op.sentAt >= since) {
        // Control requests are repeated after the window instead: they are safe to repeat.
        clearTimeout(op.timer);
        op.sent = false;
        this.#controlPausedUntil = Date.now() + 1000;
        setTimeout(() => this.#pump(), 1050);
      }
      return this.#emit("error", errorDetail(error));
    }
    if (op?.sent) return this.#finish(op, null, error);
    this.#emit("error", errorDetail(error));
  }

  // --- the control queue ---

  /** Queues a control request; `front`: next, after the one in flight (the caller pumps). */
  #enqueue(op, { front = false } = {}) {
    op.sent = false;
    if (!front) {
      this.#control.push(op);
      return this.#pump();
    }
    this.#control.splice(this.#control[0]?.sent ? 1 : 0, 0, op);
  }

  /** Sends the next control request when none is in flight. */
  #pump() {
    if (this.#state !== "open" || this.#authAnswerDue || Date.now() < this.#controlPausedUntil) return;
    const op = this.#control[0];
    if (!op || op.sent) return;
    op.sent = true;
    op.sentAt = Date.now();
    op.timer = setTimeout(() => {
      this.#finish(op, null, new DeskBridgeError("timeout", `no answer to ${op.frame.op} within ${this.#opt.controlTimeoutMs} ms`));
    }, this.#opt.controlTimeoutMs);
    this.#send(op.frame);
  }

  #answered(frame) {
    const op = this.#control[0];
    if (op?.sent && op.answers(frame)) this.#finish(op, frame, null);
  }

  #finish(op, frame, error) {
    clearTimeout(op.timer);
    const index = this.#control.indexOf(op);
    if (index < 0) return;
    this.#control.splice(index, 1);
    if (error) op.fail(error);
    else op.done(frame);
    this.#pump();
  }

  // --- plumbing ---

  #send(frame) {
    this.#sendText(JSON.stringify(frame), frame);
  }

  #sendText(text, frame) {
    if (this.#ws?.readyState !== 1) return; // the close handler settles what was waiting
    this.#ws.send(text);
    // Tokens stay out of whatever logs the frames.
    const shown = frame.token ? { ...frame, token: "***" } : frame;
    this.#emit("frame", { direction: "out", frame: shown });
  }

  #ref(prefix) {
    this.#nextRef += 1;
    return `${prefix}${this.#nextRef}`;
  }

  #setState(state, detail = {}) {
    this.#state = state;
    this.#emit("state", { state, ...detail });
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

function defaultUrl() {
  const url = new URL("/ws", globalThis.location?.href ?? "http://127.0.0.1:8080/");
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

function notConnected() {
  return new DeskBridgeError("disconnected", "not connected to the bridge", { sent: false });
}

/** Desk names without repeats; one name alone is a list of one (not its letters). */
function deskList(desks) {
  return [...new Set(typeof desks === "string" ? [desks] : desks)];
}

function sameSet(a, b) {
  return Array.isArray(a) && a.length === b.length && a.every((x) => b.includes(x));
}

function errorDetail(error) {
  return { code: error.code, message: error.message, ref: error.ref, frame: error.frame };
}
