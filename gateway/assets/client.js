// Live-room client for the gateway's WebSocket protocol (docs/protocol.md; usage in docs/client.md).
//
// A dependency-free ES module. Every gateway node serves it at `/client.js`; bundlers import it
// from `gateway/assets` (a package named `live-room-client`). It runs wherever a WHATWG
// `WebSocket` exists (browsers, Deno, Node.js 22+); elsewhere pass one as `options.WebSocket`.
//
// One `RoomClient` is one member of one room. It reconnects on its own after drops and drains
// (exponential backoff with full jitter, honouring the close codes) and rejoins its room: the room,
// role and name travel in the URL, so every new connection is a new join. It keeps the room's
// position (epoch and offset of the last message) and resumes from it on every reconnect
// (`since`), so that no message is lost or repeated; when the server cannot replay everything it
// emits `recovery` with `recovered: false` (reload your state then).
//
// With a gateway that requires tokens (`--auth jwt`), pass `getToken`: it is called before every
// connection (the token travels as the `token` query parameter, since browsers cannot set headers
// on a WebSocket), and again to refresh the token on the open socket before it expires — on the
// server's `expiring` event, and on the client's own timer from the token's `exp`. A close with
// 4010 (token expired) reconnects with a fresh token; 4501-4503 (kicked, banned, forbidden) do not
// reconnect (a 4010 reconnect resumes from the room position like any other).

/** Version of this client. */
export const VERSION = '0.1.0';

/** Close codes the gateway sends (docs/protocol.md, section 7), plus the ones a browser reports. */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  PROTOCOL_ERROR: 1002,
  NO_STATUS: 1005,
  ABNORMAL: 1006,
  INVALID_UTF8: 1007,
  POLICY: 1008,
  TOO_LARGE: 1009,
  SERVER_RESTART: 1012,
  SLOW_CONSUMER: 4000,
  IDLE_TIMEOUT: 4001,
  BROKER_LOST: 4002,
  TOKEN_EXPIRED: 4010,
  KICKED: 4501,
  BANNED: 4502,
  FORBIDDEN: 4503,
});

const DEFAULTS = Object.freeze({
  role: 'viewer',
  reconnect: true,
  backoff: Object.freeze({ initialDelay: 500, maxDelay: 30_000 }),
  connectTimeout: 10_000,
  pingInterval: 20_000,
  pongTimeout: 10_000,
  refreshBefore: 60_000,
});

const ROOM = /^[A-Za-z0-9_.:-]{1,128}$/;
// Rust's `char::is_control`: the C0 and C1 control characters and DEL.
const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;
const utf8 = new TextEncoder();

/** Whether `room` is a valid room name: 1–128 characters of `A-Z a-z 0-9 _ . : -`. */
export function validRoom(room) {
  return typeof room === 'string' && ROOM.test(room);
}

/** Whether `name` is a valid display name: 1–64 bytes of UTF-8 without control characters. */
export function validName(name) {
  return (
    typeof name === 'string' &&
    name.length > 0 &&
    utf8.encode(name).length <= 64 &&
    !CONTROL.test(name)
  );
}

/**
 * Whether a client should reconnect after a close with `code`.
 *
 * No: 1000 (a deliberate close), 1002, 1003, 1007, 1009, 1010 (the client sent something wrong:
 * it would again), 1008 (policy, e.g. the publish rate: retrying is what it forbids) and
 * 4500–4999 (the gateway's "do not reconnect" range). Yes: everything else — 1006 (the connection
 * dropped, or the handshake failed), 1001, 1011–1014 (the server went away or is restarting:
 * 1012 is a draining node), 4000–4499 (the gateway's "reconnect with backoff" range) and codes
 * this client does not know.
 *
 * @param {number} code
 * @returns {boolean}
 */
export function shouldReconnect(code) {
  if (code >= 4000 && code <= 4499) return true;
  if (code >= 4500 && code <= 4999) return false;
  switch (code) {
    case 1000:
    case 1002:
    case 1003:
    case 1007:
    case 1008:
    case 1009:
    case 1010:
      return false;
    default:
      return true;
  }
}

/**
 * The delay before reconnect attempt `attempt` (0 for the first after a connection was lost):
 * exponential backoff with full jitter, a uniform random delay in
 * `[0, min(maxDelay, initialDelay × 2^attempt))` milliseconds, so that the clients of a failed
 * node spread their reconnects instead of arriving together.
 *
 * @param {number} attempt
 * @param {{initialDelay?: number, maxDelay?: number}} [backoff]
 * @param {() => number} [random] uniform in [0, 1)
 * @returns {number} milliseconds
 */
export function backoffDelay(attempt, backoff = {}, random = Math.random) {
  const initial = backoff.initialDelay ?? DEFAULTS.backoff.initialDelay;
  const max = backoff.maxDelay ?? DEFAULTS.backoff.maxDelay;
  const ceiling = Math.min(max, initial * 2 ** Math.min(Math.max(attempt, 0), 30));
  return Math.floor(random() * ceiling);
}

/**
 * The WebSocket URL of `room` on the gateway at `base`. `base` may be `ws:`, `wss:`, `http:` or
 * `https:` (mapped to `ws:`/`wss:`), with a path prefix when the gateway is mounted under one;
 * its query parameters are kept.
 *
 * @param {string} base e.g. `wss://live.example.com` or `https://example.com/live/`
 * @param {string} room
 * @param {{role?: 'host'|'viewer', name?: string|null, since?: string, backlog?: number,
 *   token?: string|null}} [who]
 *   `since`: `EPOCH:OFFSET` to resume after; `backlog`: the last N messages on join;
 *   `token`: a JWT for a gateway that requires one
 * @returns {string}
 */
export function roomUrl(base, room, { role, name, since, backlog, token } = {}) {
  const url = new URL(base);
  if (url.protocol === 'http:') url.protocol = 'ws:';
  else if (url.protocol === 'https:') url.protocol = 'wss:';
  else if (url.protocol !== 'ws:' && url.protocol !== 'wss:') {
    throw new TypeError(`not a WebSocket or HTTP URL: ${base}`);
  }
  if (!validRoom(room)) throw new TypeError(`invalid room name: ${room}`);
  url.pathname = `${url.pathname.replace(/\/+$/, '')}/ws/${room}`;
  url.hash = '';
  if (role) url.searchParams.set('role', role);
  if (name) url.searchParams.set('name', name);
  if (since) url.searchParams.set('since', since);
  if (backlog) url.searchParams.set('backlog', String(backlog));
  if (token) url.searchParams.set('token', token);
  return url.toString();
}

/**
 * The `exp` claim (seconds) of a JSON Web Token, read without verifying it (the client only uses
 * it to time a refresh), or null when the token has none or is not a JWT.
 *
 * @param {string} token
 * @returns {number|null}
 */
export function tokenExpiry(token) {
  try {
    const part = String(token).split('.')[1];
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
    const json = new TextDecoder().decode(Uint8Array.from(atob(b64.padEnd(b64.length + ((4 - (b64.length % 4)) % 4), '=')), (c) => c.charCodeAt(0)));
    const exp = JSON.parse(json).exp;
    return Number.isFinite(exp) ? exp : null;
  } catch {
    return null;
  }
}

/** The URL of the page's own origin, when there is a page. */
function pageOrigin() {
  const loc = globalThis.location;
  return loc && /^https?:$/.test(loc.protocol) ? loc.origin : undefined;
}

/**
 * @typedef {'idle'|'connecting'|'open'|'reconnecting'|'closed'} State
 *
 * @typedef {object} StateChange
 * @property {State} state the new state
 * @property {State} previous
 * @property {string} [url] `connecting`, `open`: the URL of the connection
 * @property {string} [node] `open`: the node that welcomed the client
 * @property {boolean} [rejoined] `open`: whether this is a rejoin after a lost connection
 * @property {number} [code] `reconnecting`, `closed`: the close code (1006 when the connection
 *   dropped, failed, or was given up by the client's own timeouts)
 * @property {string} [reason] `reconnecting`, `closed`: the close reason text
 * @property {number} [delay] `reconnecting`: milliseconds until the next attempt
 * @property {number} [attempt] `reconnecting`: consecutive attempts without a welcome, from 1
 *
 * @typedef {object} Options
 * @property {string|string[]} [url] the gateway: one URL (a load balancer) or several nodes, tried
 *   in turn; `ws:`, `wss:`, `http:` or `https:`. Default: the page's own origin.
 * @property {string} room the room to join
 * @property {'host'|'viewer'|null} [role] default `viewer`; `null` with `getToken`: the token's grant
 *   decides (a role that the token does not grant is refused with 403)
 * @property {string} [name] display name shown to others as `from`
 * @property {boolean} [reconnect] reconnect after drops and drains; default true
 * @property {{initialDelay?: number, maxDelay?: number}} [backoff] ms; default 500 and 30000
 * @property {number} [connectTimeout] ms from opening a socket to its `welcome`; 0 disables;
 *   default 10000
 * @property {number} [pingInterval] ms of silence before the client sends a `ping`; 0 disables the
 *   heartbeat; default 20000
 * @property {number} [pongTimeout] ms after that ping without any frame before the connection
 *   counts as dead (1006) and is replaced; default 10000
 * @property {typeof WebSocket} [WebSocket] the WebSocket class; default `globalThis.WebSocket`
 * @property {() => string|Promise<string>} [getToken] returns a fresh token from your backend;
 *   called before every connection and to refresh the token on the open socket
 * @property {number} [refreshBefore] ms before the token's `exp` to refresh it, but never before
 *   half its remaining lifetime has passed; default 60000. The server's `expiring` event also
 *   triggers one.
 * @property {boolean} [members] keep the room's member list (rooms that list it to this member);
 *   default false
 * @property {number} [backlog] the last N messages of the room on the first join (the server
 *   caps N at its `--max-backlog`); default 0
 * @property {{epoch: string, offset: number}} [since] resume from a position saved earlier
 *   (e.g. across a page reload) instead of joining fresh
 */

/**
 * One member of one room. Events (`on(type, fn)`):
 *
 * - `state` — {@link StateChange}: `idle` → `connecting` → `open` ⇄ `reconnecting` … `closed`.
 * - `welcome` — `{node, room, role, connection_id, name, user, epoch, offset, recovered?}` on
 *   every (re)join (`user`: the token's `sub`, null without one).
 * - `message` — `{room, from, role, data, id, ts, offset, epoch}`; the client's own messages come
 *   back too. After a resume the missed ones come first, in order; none twice.
 * - `recovery` — `{recovered: false, reason, epoch, offset}`: messages were missed and cannot be
 *   replayed (`reason`: `not_recovered` — history lost, trimmed, or too many missed; `epoch` —
 *   the room's history was lost while connected). Reload the room's state.
 * - `ack` — `{key, offset, epoch, id, duplicate}`: a publish with a `key` was published (or had
 *   been, `duplicate`); an `error` with that `key` means it was not.
 * - `presence` — `{room, hosts, viewers, listing?}`, cluster-wide counts: after `welcome`, then
 *   whenever they change (`listing: false`: a listing room over its bound).
 * - `members` — with the `members` option, the room's member list (docs/protocol.md, section 12):
 *   `{listing: true, members: [{sub, name, role}], v, joined, left}` after the list was read
 *   (on every join, and again after a `reset`) and after each change (`joined`, `left`: that
 *   change's entries), or `{listing: false, over_limit}` when the room does not list to this
 *   member or is over its bound. Also {@link RoomClient#members}.
 * - `error` — `{code, message}`: the server refused a command; the connection stays open.
 * - `pong` — `{ts}`, the answer to {@link RoomClient#ping}.
 * - `refreshed` — `{exp}`: the server accepted a refreshed token.
 * - `expiring` — `{exp}`: the server's warning that the token expires soon (a refresh follows
 *   when `getToken` is set).
 */
export class RoomClient {
  /** @type {string[]} */ #urls;
  #index = 0;
  #room;
  #role;
  #name;
  #opts;
  #WebSocket;
  /** The live socket, or null; events of any other socket are ignored. */
  #ws = null;
  /** @type {State} */ #state = 'idle';
  /** Consecutive attempts that ended before a welcome; reset by each welcome. */
  #attempt = 0;
  #welcome = null;
  #joinedOnce = false;
  #lastReceived = 0;
  #pingSent = false;
  #retryTimer = null;
  #connectTimer = null;
  #heartbeatTimer = null;
  #refreshTimer = null;
  /** Whether a refresh is under way (one at a time). */
  #refreshing = false;
  /** Bumped by every open and close, so that a token that arrives late is not used. */
  #generation = 0;
  /** @type {Map<string, Set<Function>>} */ #listeners = new Map();
  /** The room's epoch as last seen, or null before one is known. */
  #epoch = null;
  /** Offset of the last message received in `#epoch`. */
  #offset = 0;
  /** Messages at or below this offset are the join's backlog, not live ones. */
  #backlogUntil = 0;
  /** Whether the current connection asked to resume. */
  #resuming = false;

  /** @param {Options} options */
  constructor(options) {
    const opts = { ...DEFAULTS, ...options, backoff: { ...DEFAULTS.backoff, ...options?.backoff } };
    const urls = [opts.url ?? pageOrigin()].flat().filter((u) => u !== undefined && u !== '');
    if (urls.length === 0) throw new TypeError('options.url is required outside a web page');
    // With a token, `role: null` lets the token's grant decide.
    if (opts.role !== 'host' && opts.role !== 'viewer' && !(opts.role === null && opts.getToken)) {
      throw new TypeError('options.role must be "host" or "viewer" (or null with getToken)');
    }
    if (opts.name != null && opts.name !== '' && !validName(opts.name)) {
      throw new TypeError('options.name must be 1-64 bytes without control characters');
    }
    const WS = opts.WebSocket ?? globalThis.WebSocket;
    if (typeof WS !== 'function') throw new TypeError('no WebSocket: pass options.WebSocket');
    if (opts.getToken != null && typeof opts.getToken !== 'function') {
      throw new TypeError('options.getToken must be a function returning a token');
    }
    this.#room = opts.room;
    this.#role = opts.role;
    this.#name = opts.name || null;
    // Refuse bad URLs and room names now, not on every reconnect.
    for (const u of urls) roomUrl(u, this.#room);
    this.#urls = urls.map(String);
    this.#opts = opts;
    this.#WebSocket = WS;
    if (opts.since && typeof opts.since.epoch === 'string' && Number.isSafeInteger(opts.since.offset)) {
      this.#epoch = opts.since.epoch;
      this.#offset = opts.since.offset;
    }
  }

  /** @returns {State} */
  get state() {
    return this.#state;
  }
  /** The room this client joins. */
  get room() {
    return this.#room;
  }
  /** `host` or `viewer`: the role asked for, or (with `role: null`) the one the server gave. */
  get role() {
    return this.#role ?? this.#welcome?.role ?? null;
  }
  /** The display name, or null. */
  get name() {
    return this.#name;
  }
  /** The last `welcome` event, or null before the first. */
  get welcome() {
    return this.#welcome;
  }
  /** The user id (`sub`) the server admitted this client as, or null (anonymous, no auth). */
  get user() {
    return this.#welcome?.user ?? null;
  }
  /**
   * The room position this client has: `{epoch, offset}` of the last message received (what it
   * resumes from), or null before the room had one.
   */
  get position() {
    return this.#epoch === null ? null : { epoch: this.#epoch, offset: this.#offset };
  }
  /**
   * The room's members as `[{sub, name, role}]` sorted by `sub` (with the `members` option, once
   * read), or null: not read yet, or the room does not list them to this member.
   */
  get members() {
    return this.#list === null ? null : [...this.#list.values()].sort((a, b) => (a.sub < b.sub ? -1 : 1));
  }

  /** The node of the current connection, or null when not `open`. */
  get node() {
    return this.#state === 'open' ? this.#welcome.node : null;
  }

  /**
   * Subscribes `fn` to events of `type`.
   * @param {'state'|'welcome'|'message'|'recovery'|'ack'|'presence'|'members'|'error'|'pong'|'refreshed'|'expiring'} type
   * @param {(event: any) => void} fn
   * @returns {() => void} unsubscribes
   */
  on(type, fn) {
    if (!this.#listeners.has(type)) this.#listeners.set(type, new Set());
    this.#listeners.get(type).add(fn);
    return () => this.off(type, fn);
  }

  /** Unsubscribes `fn` from events of `type`. */
  off(type, fn) {
    this.#listeners.get(type)?.delete(fn);
  }

  /** Starts joining the room (again, after `closed`). Returns the client. */
  connect() {
    if (this.#state === 'idle' || this.#state === 'closed') {
      this.#attempt = 0;
      this.#open();
    }
    return this;
  }

  /**
   * Leaves the room for good: no reconnect until {@link RoomClient#connect}.
   * @param {number} [code] 1000 or 3000–4999
   * @param {string} [reason]
   */
  close(code = 1000, reason = '') {
    this.#generation += 1;
    this.#stopTimers();
    const ws = this.#ws;
    this.#ws = null;
    if (ws) {
      detach(ws);
      try {
        ws.close(code, reason);
      } catch {
        // Already closing, or a code the WebSocket refuses: the socket is dropped either way.
      }
    }
    if (this.#state !== 'closed' && this.#state !== 'idle') {
      this.#setState('closed', { code, reason });
    }
  }

  /**
   * Publishes `data` (any JSON value) to the room. Text is best sent this way too: a bare text
   * frame that happens to be JSON (`42`, `true`) would be refused by the server.
   * @param {any} data
   * @param {{key?: string}} [options] `key`: an idempotency key (1-128 bytes): the server answers
   *   with an `ack` event (or an `error` carrying the key), and a repeat with the same key — say
   *   after a reconnect, when no ack came — is not published twice
   * @returns {boolean} whether it was handed to an open connection (false while reconnecting:
   *   nothing is queued, live messages go stale)
   */
  publish(data, { key } = {}) {
    if (data === undefined) throw new TypeError('publish(data): data must be a JSON value');
    if (key !== undefined && (typeof key !== 'string' || key.length === 0 || utf8.encode(key).length > 128)) {
      throw new TypeError('publish(data, {key}): key must be 1-128 bytes');
    }
    return this.#send(JSON.stringify(key === undefined ? { type: 'publish', data } : { type: 'publish', data, key }));
  }

  /** Asks the server for a `pong` event. Returns whether it was sent. */
  ping() {
    return this.#send('{"type":"ping"}');
  }

  #send(text) {
    const ws = this.#ws;
    if (!ws || this.#state !== 'open' || ws.readyState !== 1) return false;
    ws.send(text);
    return true;
  }

  /**
   * Sends a fresh token on the open socket (`refresh`). Called on `expiring` and by the client's
   * own timer; callable by the application too. Resolves to whether a token was sent.
   * @returns {Promise<boolean>}
   */
  async refresh() {
    if (!this.#opts.getToken || this.#refreshing) return false;
    this.#refreshing = true;
    const generation = this.#generation;
    try {
      const token = await this.#opts.getToken();
      if (generation !== this.#generation || typeof token !== 'string' || token === '') return false;
      // A token that does not outlive the current one (getToken returned the same) is not sent:
      // it would extend nothing.
      const exp = tokenExpiry(token);
      if (exp !== null && this.#tokenExp !== null && exp <= this.#tokenExp) return false;
      const sent = this.#send(JSON.stringify({ type: 'refresh', token }));
      if (sent) this.#tokenExp = exp;
      return sent;
    } catch (err) {
      this.#emit('error', { code: 'refresh_failed', message: String(err?.message ?? err) });
      return false;
    } finally {
      this.#refreshing = false;
    }
  }

  /** Schedules the proactive refresh of a token that expires at `exp` (seconds). */
  #scheduleRefresh(exp) {
    clearTimeout(this.#refreshTimer);
    this.#refreshTimer = null;
    if (!this.#opts.getToken || !Number.isFinite(exp)) return;
    const left = exp * 1000 - Date.now();
    const delay = Math.max(0, Math.max(left - this.#opts.refreshBefore, left / 2));
    this.#refreshTimer = setTimeout(() => {
      this.#refreshTimer = null;
      this.refresh();
    }, delay);
  }

  /** The join's URL parameters: a resume from the room position when there is one. */
  #joinParams() {
    this.#resuming = this.#epoch !== null;
    return {
      role: this.#role,
      name: this.#name,
      since: this.#resuming ? `${this.#epoch}:${this.#offset}` : undefined,
      backlog: this.#resuming ? undefined : this.#opts.backlog,
    };
  }

  #open() {
    const params = this.#joinParams();
    if (!this.#opts.getToken) {
      this.#openWith(params, null);
      return;
    }
    const generation = ++this.#generation;
    // The URL without its token: state events end up in logs and on pages.
    const url = roomUrl(this.#urls[this.#index], this.#room, params);
    this.#setState('connecting', { url });
    Promise.resolve()
      .then(() => this.#opts.getToken())
      .then((token) => {
        if (generation !== this.#generation) return;
        if (typeof token !== 'string' || token === '') throw new TypeError('getToken() returned no token');
        this.#openWith(params, token);
      })
      .catch((err) => {
        if (generation !== this.#generation) return;
        // No token (the backend is down, the user logged out): a failed attempt, with backoff.
        this.#lost(CloseCode.ABNORMAL, `getToken failed: ${String(err?.message ?? err)}`);
      });
  }

  #openWith(params, token) {
    const url = roomUrl(this.#urls[this.#index], this.#room, { ...params, token });
    this.#tokenExp = token ? tokenExpiry(token) : null;
    let ws;
    try {
      ws = new this.#WebSocket(url);
    } catch (err) {
      // E.g. a port the browser blocks: count it as a failed attempt.
      if (this.#state !== 'connecting') this.#setState('connecting', { url });
      this.#lost(CloseCode.ABNORMAL, String(err?.message ?? err));
      return;
    }
    this.#ws = ws;
    ws.onmessage = (ev) => {
      if (this.#ws === ws) this.#receive(ev.data);
    };
    ws.onclose = (ev) => {
      if (this.#ws !== ws) return;
      this.#ws = null;
      this.#lost(ev.code, ev.reason);
    };
    // A failure is followed by a close event; nothing to do here.
    ws.onerror = () => {};
    if (this.#opts.connectTimeout > 0) {
      this.#connectTimer = setTimeout(() => this.#giveUp(ws, 'connect timeout'), this.#opts.connectTimeout);
    }
    if (this.#state !== 'connecting') this.#setState('connecting', { url });
  }

  /** The `exp` of the token the current connection was opened with. */
  #tokenExp = null;

  /** The member list by `sub` (null: not read, or not listed), its version, and while a read
   * is under way the pages so far and the diffs that arrived meanwhile. */
  #list = null;
  #listV = 0;
  #reading = null;

  /** Starts reading the list from its first page (diffs that arrive meanwhile wait). */
  #readMembers() {
    this.#reading = { pages: new Map(), v: null, diffs: [] };
    this.#send('{"type":"members"}');
  }

  /** A `members` page, an `error` `not_listed`, or a `members_diff`; true when handled here. */
  #onMembers(event) {
    if (event.type === 'error' && event.code === 'not_listed' && this.#reading) {
      this.#reading = null;
      this.#list = null;
      this.#emit('members', { listing: false, over_limit: false });
      return true;
    }
    if (event.type === 'members' && this.#reading) {
      const r = this.#reading;
      if (event.over_limit) {
        this.#reading = null;
        this.#list = null;
        this.#emit('members', { listing: false, over_limit: true });
        return true;
      }
      if (r.v === null) r.v = event.v;
      for (const m of event.members) r.pages.set(m.sub, m);
      if (event.cursor !== null) {
        this.#send(JSON.stringify({ type: 'members', cursor: event.cursor }));
        return true;
      }
      this.#reading = null;
      this.#list = r.pages;
      this.#listV = r.v;
      this.#emit('members', { listing: true, members: this.members, v: this.#listV, joined: [], left: [] });
      for (const d of r.diffs) this.#onMembers(d);
      return true;
    }
    if (event.type !== 'members_diff') return false;
    if (this.#reading) {
      this.#reading.diffs.push(event);
      return true;
    }
    if (event.reset) {
      this.#readMembers();
      return true;
    }
    if (event.over_limit) {
      this.#list = null;
      this.#emit('members', { listing: false, over_limit: true });
      return true;
    }
    if (this.#list === null || event.v <= this.#listV) return true;
    for (const m of event.joined ?? []) this.#list.set(m.sub, m);
    for (const l of event.left ?? []) this.#list.delete(l.sub);
    this.#listV = event.v;
    this.#emit('members', {
      listing: true, members: this.members, v: event.v, joined: event.joined ?? [], left: event.left ?? [],
    });
    return true;
  }

  #receive(data) {
    this.#lastReceived = Date.now();
    this.#pingSent = false;
    if (typeof data !== 'string') return;
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      return;
    }
    if (event === null || typeof event !== 'object' || typeof event.type !== 'string') return;
    if (event.type === 'state') return;
    if (event.type === 'welcome') {
      clearTimeout(this.#connectTimer);
      this.#connectTimer = null;
      this.#attempt = 0;
      this.#welcome = event;
      this.#welcomed(event);
      const rejoined = this.#joinedOnce;
      this.#joinedOnce = true;
      this.#startHeartbeat();
      this.#scheduleRefresh(this.#tokenExp);
      this.#emit('welcome', event);
      // The URL without its token: state events end up in logs and on pages.
      const url = roomUrl(this.#urls[this.#index], this.#room, { role: this.#role, name: this.#name });
      this.#setState('open', { url, node: event.node, rejoined });
      if (this.#opts.members) this.#readMembers();
      return;
    }
    if (event.type === 'refreshed') this.#scheduleRefresh(event.exp);
    if (event.type === 'expiring') this.refresh();
    if (event.type === 'message' && !this.#track(event)) return;
    if (this.#opts.members && this.#onMembers(event)) return;
    this.#emit(event.type, event);
  }

  /** Takes the room position from a welcome. */
  #welcomed(w) {
    if (this.#resuming && w.recovered === true) return; // the missed messages follow
    const lost = this.#resuming && w.recovered === false;
    const typed = typeof w.epoch === 'string' && Number.isSafeInteger(w.offset);
    this.#epoch = typed ? w.epoch : null;
    this.#offset = typed ? w.offset : 0;
    this.#backlogUntil = this.#offset;
    if (lost) {
      this.#emit('recovery', { recovered: false, reason: 'not_recovered', epoch: this.#epoch, offset: this.#offset });
    }
  }

  /**
   * Follows the room position with a message; returns whether to emit it. A message already
   * seen is dropped; a jump in offsets (the node missed messages, e.g. during a Redis outage)
   * resumes on a new connection, which replays them.
   */
  #track(m) {
    if (!Number.isSafeInteger(m.offset) || typeof m.epoch !== 'string') return true; // plain PUBLISH
    if (m.epoch !== this.#epoch) {
      const known = this.#epoch !== null;
      this.#epoch = m.epoch;
      this.#offset = m.offset;
      this.#backlogUntil = 0;
      if (known) this.#emit('recovery', { recovered: false, reason: 'epoch', epoch: m.epoch, offset: m.offset });
      return true;
    }
    if (m.offset <= this.#backlogUntil) return true; // the join's backlog
    if (m.offset <= this.#offset) return false;
    if (m.offset > this.#offset + 1) {
      this.#resync();
      return false;
    }
    this.#offset = m.offset;
    return true;
  }

  /** Replaces the connection at once, resuming from the position: it replays what was missed. */
  #resync() {
    const ws = this.#ws;
    if (!ws) return;
    this.#ws = null;
    this.#stopTimers();
    detach(ws);
    try {
      ws.close(1000, 'resync');
    } catch {
      // Dropped either way.
    }
    this.#open();
  }

  /** The connection ended with `code`: reconnect or stop, by the code. */
  #lost(code, reason) {
    this.#stopTimers();
    if (this.#state === 'closed') return;
    if (!this.#opts.reconnect || !shouldReconnect(code)) {
      this.#setState('closed', { code, reason });
      return;
    }
    // With several URLs, the next attempt goes to the next one: this one just failed or drained.
    this.#index = (this.#index + 1) % this.#urls.length;
    const delay = backoffDelay(this.#attempt, this.#opts.backoff);
    this.#attempt += 1;
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = null;
      this.#open();
    }, delay);
    this.#setState('reconnecting', { code, reason, delay, attempt: this.#attempt });
  }

  /** Drops a socket that is not answering, without waiting for its close handshake. */
  #giveUp(ws, reason) {
    if (this.#ws !== ws) return;
    this.#ws = null;
    detach(ws);
    try {
      ws.close();
    } catch {
      // Nothing more to do: the socket is dropped.
    }
    this.#lost(CloseCode.ABNORMAL, reason);
  }

  /**
   * After `pingInterval` of silence, send a ping; after `pongTimeout` more, the connection is dead
   * (a half-open TCP connection the browser would not notice for minutes).
   */
  #startHeartbeat() {
    const every = this.#opts.pingInterval;
    if (!every) return;
    const ws = this.#ws;
    this.#lastReceived = Date.now();
    this.#pingSent = false;
    const check = Math.max(100, Math.min(every, this.#opts.pongTimeout) / 2);
    this.#heartbeatTimer = setInterval(() => {
      const silent = Date.now() - this.#lastReceived;
      if (silent >= every + this.#opts.pongTimeout) {
        this.#giveUp(ws, 'heartbeat timeout');
      } else if (silent >= every && !this.#pingSent) {
        this.#pingSent = this.ping();
      }
    }, check);
  }

  #stopTimers() {
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#connectTimer);
    clearInterval(this.#heartbeatTimer);
    clearTimeout(this.#refreshTimer);
    this.#retryTimer = this.#connectTimer = this.#heartbeatTimer = this.#refreshTimer = null;
  }

  #setState(state, detail) {
    const previous = this.#state;
    this.#state = state;
    this.#emit('state', { state, previous, ...detail });
  }

  #emit(type, event) {
    for (const fn of [...(this.#listeners.get(type) ?? [])]) {
      try {
        fn(event);
      } catch (err) {
        // A listener's bug must not break the connection; report it like an event handler's.
        if (typeof globalThis.reportError === 'function') globalThis.reportError(err);
        else setTimeout(() => { throw err; });
      }
    }
  }
}

function detach(ws) {
  ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
}
