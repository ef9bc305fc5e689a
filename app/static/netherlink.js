// NetherLink web client: one WebSocket to a gateway, reconnect, heartbeats,
// idempotent sends, gap-free sync from a stored cursor, read, recall, edit, reactions, typing.
// A plain ES module with no dependencies: import it from /static/netherlink.js.
// The wire protocol is docs/protocol.md; this module's API is docs/web-client.md.
//
// Ids (msg_id, user_id, group_id, cursor) stay strings: snowflake ids exceed
// 2^53 and a JavaScript Number would corrupt them. Compare them with compareIds.

const CLOSE_UNAUTHORIZED = 4401;
const RECONNECT_AT_ONCE = new Set([1012, 4503, 4429]); // restart, lost delivery channel, too slow
const RETRYABLE_SEND_ERRORS = new Set(["internal", "rate_limited"]);

const DEFAULTS = {
  ackTimeout: 15000,        // ms without ack/error before a send is re-sent (same client_msg_id)
  backoffBase: 500,         // ms, first reconnect delay (doubles per failed attempt)
  backoffMax: 30000,        // ms, reconnect delay cap
  syncLimit: 100,           // entries per sync page
  heartbeatInterval: 30,    // s, until hello says otherwise
  maxFrameChars: 65536,     // the gateway's WS_MAX_FRAME_BYTES default; larger frames close the socket (1009)
  seenLimit: 20000,         // msg_ids remembered for de-duplication
  storagePrefix: "netherlink:",
};

/** Numeric order of two decimal id strings (no Number() on the way): -1, 0 or 1. */
export function compareIds(a, b) {
  a = String(a); b = String(b);
  if (a.length !== b.length) return a.length < b.length ? -1 : 1;
  return a < b ? -1 : a > b ? 1 : 0;
}

/** The conversation id of a private chat: p_<low>_<high> (ids compared numerically). */
export function privateConversationId(userA, userB) {
  return compareIds(userA, userB) <= 0 ? `p_${userA}_${userB}` : `p_${userB}_${userA}`;
}

/** An error answered by the REST API: `status` (HTTP), `code` and `message` of its JSON body. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || code || `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

/** One REST call: JSON in, JSON out; throws ApiError for an error status or a network failure (status 0). */
export async function apiRequest(baseUrl, method, path, { token, body, query } = {}) {
  let url = `${trimSlash(baseUrl)}${path}`;
  if (query) {
    const qs = new URLSearchParams(Object.entries(query).filter(([, v]) => v !== undefined && v !== null && v !== ""));
    if ([...qs].length) url += `?${qs}`;
  }
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    throw new ApiError(0, "network", "the server cannot be reached");
  }
  if (resp.status === 204) return null;
  let data = null;
  try { data = await resp.json(); } catch { /* not JSON */ }
  if (!resp.ok) throw new ApiError(resp.status, data && data.error, data && data.message);
  return data;
}

/** POST /api/ws-ticket with the bearer token; resolves to the one-time ticket (valid 30 s) for /ws?ticket=. */
export function wsTicket(baseUrl, token) {
  return apiRequest(baseUrl, "POST", "/api/ws-ticket", { token }).then((answer) => answer.ticket);
}

/** POST /api/auth/refresh; resolves to {access_token, refresh_token, user_id, expires_in, ...} (store the new
 *  refresh_token: the old one is used up). */
export function refreshTokens(baseUrl, refreshToken) {
  return apiRequest(baseUrl, "POST", "/api/auth/refresh", { body: { refresh_token: refreshToken } });
}

/** POST /api/auth/logout: this session's tokens stop working, its sockets are closed. */
export function logoutSession(baseUrl, token) {
  return apiRequest(baseUrl, "POST", "/api/auth/logout", { token });
}

/** POST /api/auth/login; resolves to {access_token, refresh_token, user_id, expires_in, ...}. */
export function login(baseUrl, username, password) {
  return apiRequest(baseUrl, "POST", "/api/auth/login", { body: { username, password } });
}

/** POST /api/auth/register; resolves to {user_id}. */
export function register(baseUrl, username, password) {
  return apiRequest(baseUrl, "POST", "/api/auth/register", { body: { username, password } });
}

/**
 * POST /api/media: upload a File or Blob as the raw body with its own type (docs/openapi.yaml).
 * onProgress(sentBytes, totalBytes) follows the upload; resolves to
 * {media_id, content_type, size, sha256, width, height, filename, thumbnail_url};
 * rejects with ApiError (413 too large, 415 wrong type, 429 rate limited, status 0 network).
 */
export function uploadMedia(baseUrl, token, blob, { filename, contentType, onProgress } = {}) {
  const name = filename || blob.name;
  const url = `${trimSlash(baseUrl)}/api/media` + (name ? `?${new URLSearchParams({ filename: name })}` : "");
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();  // fetch cannot report upload progress
    xhr.open("POST", url);
    xhr.setRequestHeader("Authorization", `Bearer ${token}`);
    xhr.setRequestHeader("Content-Type", contentType || blob.type || "application/octet-stream");
    xhr.upload.onprogress = (e) => { if (onProgress) onProgress(e.loaded, e.lengthComputable ? e.total : blob.size); };
    xhr.onerror = () => reject(new ApiError(0, "network", "the server cannot be reached"));
    xhr.onload = () => {
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
      if (xhr.status === 201) resolve(data);
      else reject(new ApiError(xhr.status, data && data.error, data && data.message));
    };
    xhr.send(blob);
  });
}

/**
 * GET /api/media/{id} (or its thumbnail) with the bearer token, as an object URL for an <img> or a
 * download link (the token cannot go into an <img src>). Revoke it with URL.revokeObjectURL when done.
 */
export async function mediaObjectUrl(baseUrl, token, mediaId, { thumbnail = false } = {}) {
  const path = `/api/media/${encodeURIComponent(mediaId)}` + (thumbnail ? "/thumbnail" : "");
  let resp;
  try {
    resp = await fetch(`${trimSlash(baseUrl)}${path}`, { headers: { Authorization: `Bearer ${token}` } });
  } catch (err) {
    throw new ApiError(0, "network", "the server cannot be reached");
  }
  if (!resp.ok) {
    let data = null;
    try { data = await resp.json(); } catch { /* not JSON */ }
    throw new ApiError(resp.status, data && data.error, data && data.message);
  }
  return URL.createObjectURL(await resp.blob());
}

/**
 * GET /api/search/messages: messages the user may see that contain q (CJK without spaces too),
 * newest first; resolves to {messages, has_more, next_before} (pass next_before as before).
 */
export function searchMessages(baseUrl, token, q, { conversationId, before, limit } = {}) {
  return apiRequest(baseUrl, "GET", "/api/search/messages",
                    { token, query: { q, conversation_id: conversationId, before, limit } });
}

export class NetherLinkClient extends EventTarget {
  /**
   * @param {object} options
   * @param {string} [options.baseUrl]  the gateway's http(s) origin; default: this page's origin
   * @param {string} options.token      JWT from login
   * @param {Storage|object|null} [options.storage]  getItem/setItem store for the sync cursor
   *        (default localStorage; null keeps it in memory only)
   * @param {function} [options.ticket]  async (token) => a one-time ticket of POST /api/ws-ticket:
   *        the socket opens with ?ticket= instead of the token in the URL (see wsTicket)
   * @param {function} [options.refresh]  async () => a new access token (POST /api/auth/refresh):
   *        asked once when the token expired or was refused, before giving up with "unauthorized"
   * Other options (ms unless said): ackTimeout, backoffBase, backoffMax, syncLimit,
   * maxFrameChars, storagePrefix, WebSocket (a constructor, for non-browser use).
   */
  constructor(options = {}) {
    super();
    const opts = { ...DEFAULTS, ...options };
    this.options = opts;
    this.baseUrl = trimSlash(opts.baseUrl || (typeof location !== "undefined" ? location.origin : ""));
    this.token = opts.token;
    this._ticket = opts.ticket || null;
    this._refresh = opts.refresh || null;
    this._opening = null;           // an open waiting for its ticket, or a refresh in progress
    this._refreshTried = false;     // since the last hello
    this.storage = opts.storage === undefined ? defaultStorage() : opts.storage;
    this._memoryStore = new Map();
    this._WebSocket = opts.WebSocket || globalThis.WebSocket;
    this.state = "closed";          // connecting | open | closed
    this.userId = null;             // from hello
    this.connId = null;
    this._ws = null;
    this._wanted = false;           // connect() called and not close()d
    this._attempt = 0;              // failed attempts since the last hello
    this._reconnectTimer = null;
    this._heartbeatTimer = null;
    this._heartbeatInterval = opts.heartbeatInterval;
    this._lastFrameAt = 0;
    this._cursor = null;
    this._syncing = false;
    this._syncAgain = false;
    this._pendingSends = new Map(); // client_msg_id -> {frame, resolve, reject, timer, attempts}
    this._pendingReads = new Map(); // conversation_id -> msg_id (highest asked, not yet read_ok'd)
    this._pendingRecalls = new Map(); // msg_id -> [{resolve, reject}]
    this._pendingEdits = new Map(); // "<msg_id>\n<content>" -> {msgId, content, waiters: [{resolve, reject}]}
    this._pendingReacts = new Map(); // "<msg_id>\n<emoji>\n<op>" -> {msgId, emoji, op, waiters}
    this._changeIds = new Map();    // client_msg_id of an edit or react frame -> {type, key} (its errors name it)
    this._typingIds = new Map();    // client_msg_id of a typing or received frame -> {type, conversationId} (its errors name it)
    this._toConfirm = new Map(); // conversation_id -> greatest msg_id to confirm with `received`
    this._confirmed = new Map(); // conversation_id -> greatest msg_id confirmed
    this._confirmTimer = null;
    this._requests = [];            // non-send requests in flight on this socket, oldest first
    this._seen = new Map();         // msg_id -> {status, held, editedAt, content, reactions, ops}: de-duplication,
                                    // recalls, edits and reactions seen early
    this._seenEvents = new Set();   // group_event event_ids already reported
    this._cmidPrefix = `web-${randomHex(6)}-${Date.now().toString(36)}`;
    this._cmidCounter = 0;
    this._listeners = new Map();    // type -> Map(fn -> listener), for on()/off()
  }

  // -- events ----------------------------------------------------------------

  /** Subscribe to an event; `fn` gets the event's detail. Returns a function that unsubscribes. */
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Map());
    const byFn = this._listeners.get(type);
    if (!byFn.has(fn)) {
      const listener = (event) => fn(event.detail);
      byFn.set(fn, listener);
      this.addEventListener(type, listener);
    }
    return () => this.off(type, fn);
  }

  off(type, fn) {
    const byFn = this._listeners.get(type);
    const listener = byFn && byFn.get(fn);
    if (listener) {
      this.removeEventListener(type, listener);
      byFn.delete(fn);
    }
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _setState(state, extra = {}) {
    this.state = state;
    this._emit("state", { state, ...extra });
  }

  // -- connection ------------------------------------------------------------

  /** Open the connection (and keep it open: reconnects until close() or a 4401). */
  connect() {
    this._wanted = true;
    if (!this._ws && !this._reconnectTimer && !this._opening) this._open();
    return this;
  }

  /** Close for good: no reconnect. Unacknowledged sends stay queued for a later connect(). */
  close() {
    this._wanted = false;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._opening = null;
    this._dropSocket(1000, "client closed");
    this._setState("closed", { code: 1000, reconnecting: false });
  }

  /** Use a new token (after logging in again); reconnects if the old one was refused. */
  setToken(token) {
    this.token = token;
    this._refreshTried = false;
    if (this._wanted && !this._ws && !this._reconnectTimer && !this._opening) this._open();
    else if (!this._wanted) this.connect();
  }

  _wsUrl(ticket) {
    const base = this.baseUrl.replace(/^http(s?):/i, (_, s) => `ws${s}:`);
    if (ticket !== undefined) return `${base}/ws?ticket=${encodeURIComponent(ticket)}`;
    return `${base}/ws?token=${encodeURIComponent(this.token || "")}`; // deprecated by the server: prefer tickets
  }

  _open() {
    this._reconnectTimer = null;
    if (!this._wanted) return;
    this._setState("connecting", { attempt: this._attempt });
    if (!this._ticket) {
      this._openUrl(this._wsUrl());
      return;
    }
    // The ticket first (a REST call with the token): the token stays out of the socket's URL.
    const opening = (this._opening = {});
    Promise.resolve()
      .then(() => this._ticket(this.token))
      .then((ticket) => {
        if (opening !== this._opening) return; // closed, or opened otherwise, meanwhile
        this._opening = null;
        if (this._wanted && !this._ws) this._openUrl(this._wsUrl(ticket));
      }, (err) => {
        if (opening !== this._opening) return;
        this._opening = null;
        if (err instanceof ApiError && err.status === 401) this._stopForAuth(err.message);
        else this._scheduleReconnect(null, false);
      });
  }

  _openUrl(url) {
    let ws;
    try {
      ws = new this._WebSocket(url);
    } catch (err) {
      this._scheduleReconnect(null, false);
      return;
    }
    this._ws = ws;
    ws.__helloSeen = false;
    ws.__token = this.token; // the token the socket was opened with (or its ticket asked with)
    ws.onmessage = (event) => { if (ws === this._ws) this._onFrame(ws, event.data); };
    ws.onclose = (event) => { if (ws === this._ws) this._onClose(ws, event.code, event.reason); };
    ws.onerror = () => { /* a close event follows */ };
  }

  _dropSocket(code, reason) {
    const ws = this._ws;
    this._ws = null;
    this._stopHeartbeat();
    this._requests = [];
    for (const pending of this._pendingSends.values()) clearTimeout(pending.timer);
    if (ws) {
      ws.onmessage = ws.onclose = ws.onerror = null;
      try { ws.close(code, reason); } catch { /* already closed */ }
    }
  }

  _onClose(ws, code, reason) {
    const wasOpen = ws.__helloSeen;
    this._dropSocket();
    this._syncing = false;
    if (code === CLOSE_UNAUTHORIZED) {
      if (wasOpen && ws.__token !== this.token && String(reason).startsWith("token expired")) {
        this._scheduleReconnect(code, true); // the socket's token expired, but ours was renewed meanwhile
        return;
      }
      this._stopForAuth(reason || "token expired: log in again");
      return;
    }
    if (!wasOpen) {
      // Refused before the upgrade (HTTP 401 shows as 1006 in a browser) or the network failed:
      // find out which before retrying.
      this._checkTokenThenReconnect(code);
      return;
    }
    this._scheduleReconnect(code, RECONNECT_AT_ONCE.has(code));
  }

  _stopForAuth(message) {
    if (this._refresh && this._wanted && !this._refreshTried) {
      // Expired (or refused): ask for a new token once, then reconnect with it.
      this._refreshTried = true;
      clearTimeout(this._reconnectTimer);
      this._reconnectTimer = null;
      const opening = (this._opening = {});
      Promise.resolve()
        .then(() => this._refresh())
        .then((token) => {
          if (opening !== this._opening) return;
          this._opening = null;
          if (!token) { this._giveUpForAuth(message); return; }
          this.token = token;
          if (this._wanted && !this._ws) this._open();
        }, (err) => {
          if (opening !== this._opening) return;
          this._opening = null;
          if (err instanceof ApiError && err.status > 0 && err.status < 500) this._giveUpForAuth(err.message || message);
          else { this._refreshTried = false; this._scheduleReconnect(null, false); } // network: try again later
        });
      return;
    }
    this._giveUpForAuth(message);
  }

  _giveUpForAuth(message) {
    this._wanted = false;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._setState("closed", { code: CLOSE_UNAUTHORIZED, reconnecting: false });
    this._emit("unauthorized", { message });
  }

  async _checkTokenThenReconnect(code) {
    const exp = tokenExpiry(this.token);
    if (!this.token || (exp !== null && exp * 1000 <= Date.now())) {
      this._stopForAuth(this.token ? "token expired: log in again" : "missing token");
      return;
    }
    if (this._attempt >= 1) {
      // A REST call tells a refused token (401) from a server that is down.
      try {
        await apiRequest(this.baseUrl, "GET", "/api/unread", { token: this.token });
      } catch (err) {
        if (err instanceof ApiError && err.status === 401) {
          this._stopForAuth(err.message);
          return;
        }
      }
      if (this._ws || this._reconnectTimer || this._opening) return; // connect()/setToken() opened one meanwhile
    }
    this._scheduleReconnect(code, false);
  }

  _scheduleReconnect(code, atOnce) {
    if (!this._wanted) {
      this._setState("closed", { code, reconnecting: false });
      return;
    }
    let delay;
    if (atOnce) {
      // At once, spread over a quarter second: a whole gateway's clients are closed together.
      delay = Math.random() * 250;
    } else {
      const ceiling = Math.min(this.options.backoffMax, this.options.backoffBase * 2 ** this._attempt);
      delay = ceiling / 2 + Math.random() * (ceiling / 2); // exponential, with jitter
    }
    this._attempt += 1;
    this._setState("closed", { code, reconnecting: true, retryIn: Math.round(delay) });
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => this._open(), delay);
  }

  _sendRaw(frame) {
    const ws = this._ws;
    if (!ws || !ws.__helloSeen || ws.readyState !== 1) return false;
    try {
      ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  // -- heartbeat ---------------------------------------------------------------

  _startHeartbeat() {
    this._stopHeartbeat();
    const every = Math.max(1, this._heartbeatInterval) * 1000;
    this._heartbeatTimer = setInterval(() => {
      if (Date.now() - this._lastFrameAt > 2 * every + 5000) {
        // Nothing came back (not even pongs): the connection is dead without a close.
        const ws = this._ws;
        if (ws) this._onClose(ws, 4000, "connection silent");
        return;
      }
      this._sendRaw({ type: "ping" });
    }, every);
  }

  _stopHeartbeat() {
    clearInterval(this._heartbeatTimer);
    this._heartbeatTimer = null;
  }

  // -- frames in -----------------------------------------------------------------

  _onFrame(ws, data) {
    this._lastFrameAt = Date.now();
    let frame;
    try { frame = JSON.parse(data); } catch { return; }
    if (!frame || typeof frame.type !== "string") return;
    switch (frame.type) {
      case "hello": return this._onHello(ws, frame);
      case "pong": return;
      case "ack": return this._onAck(frame);
      case "error": return this._onError(frame);
      case "message": return this._onMessage(frame, "live");
      case "sync_batch": return this._onSyncBatch(frame);
      case "read_ok": return this._onReadOk(frame);
      case "receipt": return this._emit("receipt", frame);
      case "recalled": return this._onRecalled(frame, "live");
      case "group_event": return this._onGroupEvent(frame, "live");
      case "edited": return this._onEdited(frame, "live");
      case "reaction": return this._onReaction(frame, "live");
      case "typing": return this._emit("typing", { ...frame, source: "live" });
      default: return;
    }
  }

  _onGroupEvent(frame, source) {
    // The same event comes live and in a sync page: report it once.
    if (this._seenEvents.has(frame.event_id)) return;
    this._seenEvents.add(frame.event_id);
    if (this._seenEvents.size > this.options.seenLimit) {
      this._seenEvents.delete(this._seenEvents.values().next().value); // oldest first
    }
    this._emit("group_event", { ...frame, source });
  }

  _onHello(ws, hello) {
    ws.__helloSeen = true;
    if (this.userId !== null && this.userId !== hello.user_id) {
      this._seen.clear(); // another account: nothing of the old one applies
      this._seenEvents.clear();
    }
    this.userId = hello.user_id;
    this.connId = hello.conn_id;
    this._attempt = 0;
    this._refreshTried = false;
    if (Number.isInteger(hello.heartbeat_interval) && hello.heartbeat_interval > 0) {
      this._heartbeatInterval = hello.heartbeat_interval;
    }
    this._startHeartbeat();
    this._cursor = this._load("cursor");
    this._setState("open", { gatewayId: hello.gateway_id, connId: hello.conn_id });
    this._emit("hello", hello);
    this.sync();
    for (const [clientMsgId] of this._pendingSends) this._transmit(clientMsgId);
    for (const [conversationId, msgId] of this._pendingReads) this._sendRead(conversationId, msgId);
    for (const msgId of this._pendingRecalls.keys()) this._sendRecall(msgId);
    for (const key of this._pendingEdits.keys()) this._sendEdit(key);   // the same edit again: the same answer
    for (const key of this._pendingReacts.keys()) this._sendReact(key); // idempotent
  }

  _onAck(ack) {
    const pending = this._pendingSends.get(ack.client_msg_id);
    const isNew = !this._seen.has(ack.msg_id);
    this._remember(ack.msg_id, 0, true);
    if (isNew) this._seen.get(ack.msg_id).reactions = {}; // just stored: no reaction yet
    if (!pending) return; // a second ack for a retried send
    this._settleSend(ack.client_msg_id, ack);
  }

  _settleSend(clientMsgId, ack) {
    const pending = this._pendingSends.get(clientMsgId);
    if (!pending) return;
    clearTimeout(pending.timer);
    this._pendingSends.delete(clientMsgId);
    pending.resolve(ack);
    this._emit("ack", ack);
  }

  _onError(error) {
    const cmid = error.client_msg_id;
    if (cmid && this._typingIds.has(cmid)) {
      // A refused typing or received frame (each carries a client_msg_id for this): no request of the queue.
      const request = this._typingIds.get(cmid);
      this._typingIds.delete(cmid);
      this._emit("error", { ...error, request });
      return;
    }
    if (cmid && this._changeIds.has(cmid)) {
      const { type, key } = this._changeIds.get(cmid);
      this._changeIds.delete(cmid);
      const pendings = type === "edit" ? this._pendingEdits : this._pendingReacts;
      const pending = pendings.get(key);
      pendings.delete(key);
      for (const w of pending ? pending.waiters : []) {
        const err = new Error(error.message || error.code);
        err.code = error.code;
        if (error.retry_after_ms !== undefined) err.retryAfterMs = error.retry_after_ms;
        w.reject(err);
      }
      this._emit("error", { ...error, request: { type, key } });
      return;
    }
    if (cmid && this._pendingSends.has(cmid)) {
      const pending = this._pendingSends.get(cmid);
      clearTimeout(pending.timer);
      if (RETRYABLE_SEND_ERRORS.has(error.code)) {
        // Not (provably) accepted: retry with the same client_msg_id after a pause.
        const delay = Math.min(this.options.backoffMax, this.options.backoffBase * 2 ** Math.min(pending.attempts, 6));
        pending.timer = setTimeout(() => this._transmit(cmid), delay);
        this._emit("error", { ...error, retrying: true });
        return;
      }
      this._pendingSends.delete(cmid);
      const err = new Error(error.message || error.code);
      err.code = error.code;
      err.clientMsgId = cmid;
      pending.reject(err);
      this._emit("error", { ...error, retrying: false });
      return;
    }
    // An error without client_msg_id answers the oldest request still in flight (replies come in order).
    const request = this._requests.shift();
    if (request && request.type === "recall") {
      const waiters = this._pendingRecalls.get(request.msgId) || [];
      this._pendingRecalls.delete(request.msgId);
      for (const w of waiters) {
        const err = new Error(error.message || error.code);
        err.code = error.code;
        w.reject(err);
      }
    } else if (request && request.type === "read") {
      if (this._pendingReads.get(request.conversationId) === request.msgId) this._pendingReads.delete(request.conversationId);
    } else if (request && request.type === "sync") {
      this._syncing = false;
    }
    this._emit("error", { ...error, request: request || null });
  }

  /** Tell the server this device holds the messages up to msgId (`received`): the sender sees
   * "delivered". One frame per conversation for whatever arrived within a second (each costs the server a write). */
  _confirmReceived(conversationId, msgId) {
    const known = this._toConfirm.get(conversationId);
    if (known && compareIds(msgId, known) <= 0) return;
    this._toConfirm.set(conversationId, msgId);
    if (this._confirmTimer) return;
    this._confirmTimer = setTimeout(() => {
      this._confirmTimer = null;
      for (const [cid, upTo] of this._toConfirm) {
        if (this._confirmed.get(cid) && compareIds(upTo, this._confirmed.get(cid)) <= 0) continue;
        // No reply on success; not queued as a request (it gets none to match). The client_msg_id makes a
        // refusal's `error` name this frame, as for typing (protocol.md §10).
        const cmid = this.newClientMsgId();
        if (this._sendRaw({ type: "received", conversation_id: cid, msg_id: upTo, client_msg_id: cmid })) {
          this._confirmed.set(cid, upTo);
          this._typingIds.set(cmid, { type: "received", conversationId: cid });
          if (this._typingIds.size > 100) this._typingIds.delete(this._typingIds.keys().next().value);
        }
      }
      this._toConfirm.clear();
    }, 1000);
  }

  _dropRequest(match) {
    const i = this._requests.findIndex(match);
    if (i >= 0) this._requests.splice(0, i + 1); // replies are in order: earlier ones were answered
  }

  _onMessage(frame, source) {
    const message = { ...frame };
    if (frame.from !== this.userId && frame.msg_id) this._confirmReceived(frame.conversation_id, frame.msg_id);
    // Our own message (from another device, or a send whose ack was lost) settles a pending send:
    // the ack event stands for it, so it is not reported as a new message as well.
    if (frame.from === this.userId && this._pendingSends.has(frame.client_msg_id)) {
      this._remember(frame.msg_id, 0, true);
      this._settleSend(frame.client_msg_id, {
        type: "ack", client_msg_id: frame.client_msg_id, msg_id: frame.msg_id,
        conversation_id: frame.conversation_id, timestamp: frame.timestamp,
      });
    }
    const known = this._seen.get(frame.msg_id);
    if (known && known.status === 2) {
      // A recall seen before (or an older copy of) this message: keep it recalled.
      message.status = 2; message.content = ""; message.extra = {};
    }
    if (known && known.held) {
      if (message.status !== 2 && message.edited_at && !(known.editedAt >= message.edited_at)) {
        // A copy with a later edit than we reported (its `edited` was missed): report the edit.
        known.editedAt = message.edited_at;
        known.content = message.content;
        this._emit("edited", { msg_id: frame.msg_id, conversation_id: frame.conversation_id, content: message.content,
                               edited_at: message.edited_at, source });
      }
      if ((message.status || 0) > known.status) {
        known.status = message.status;
        if (message.status === 2) this._emit("recalled", { msg_id: frame.msg_id, conversation_id: frame.conversation_id, source });
        else this._emit("status", { msg_id: frame.msg_id, conversation_id: frame.conversation_id, status: message.status, source });
      }
      return; // a duplicate (live and sync, history, or a re-dispatch)
    }
    if (known && known.editedAt && !(message.edited_at >= known.editedAt)) {
      // An edit seen before this (older) copy of its message: show the latest content.
      message.edited_at = known.editedAt;
      if (message.status !== 2) message.content = known.content;
    }
    let reactions = copyReactions(message.reactions);
    if (known && known.ops) for (const op of known.ops) applyReaction(reactions, op); // seen before the message
    if (message.status === 2) reactions = {};
    message.reactions = reactions;
    this._remember(frame.msg_id, message.status || 0, true);
    const entry = this._seen.get(frame.msg_id);
    if (entry) {
      entry.reactions = copyReactions(reactions);
      entry.ops = null;
      if (message.edited_at && !(entry.editedAt >= message.edited_at)) {
        entry.editedAt = message.edited_at;
        entry.content = message.content;
      }
    }
    this._emit("message", { ...message, source });
  }

  _onEdited(frame, source) {
    const key = `${frame.msg_id}\n${frame.content}`;
    const pending = this._pendingEdits.get(key);
    if (pending) {
      this._pendingEdits.delete(key);
      for (const w of pending.waiters) w.resolve(frame);
    }
    // Live frames and sync entries come in either order: the latest edited_at wins.
    const known = this._seen.get(frame.msg_id);
    if (known && known.editedAt >= frame.edited_at) return; // this edit or a later one applied already
    this._remember(frame.msg_id, 0, false);
    const entry = this._seen.get(frame.msg_id);
    if (entry) { entry.editedAt = frame.edited_at; entry.content = frame.content; }
    this._emit("edited", { ...frame, source });
  }

  _onReaction(frame, source) {
    if (frame.user_id === this.userId) {
      const key = `${frame.msg_id}\n${frame.emoji}\n${frame.op}`;
      const pending = this._pendingReacts.get(key);
      if (pending) {
        this._pendingReacts.delete(key);
        for (const w of pending.waiters) w.resolve(frame);
      }
    }
    const op = { user_id: frame.user_id, emoji: frame.emoji, op: frame.op };
    const known = this._seen.get(frame.msg_id);
    let reactions = null;
    if (known && known.held && known.reactions) {
      if (!applyReaction(known.reactions, op)) return; // a duplicate (live and sync): nothing changes
      reactions = copyReactions(known.reactions);
    } else {
      // Not reported by this module (shown from history, or not seen yet): remember the change for a
      // copy of the message that comes later, and report it.
      this._remember(frame.msg_id, 0, false);
      const entry = this._seen.get(frame.msg_id);
      if (entry && !entry.held) (entry.ops || (entry.ops = [])).push(op);
      if (entry && entry.ops && entry.ops.length > 200) entry.ops.shift();
    }
    this._emit("reaction", { ...frame, source, reactions });
  }

  _onRecalled(frame, source) {
    if (this._pendingRecalls.has(frame.msg_id)) {
      for (const w of this._pendingRecalls.get(frame.msg_id)) w.resolve(frame);
      this._pendingRecalls.delete(frame.msg_id);
      this._dropRequest((r) => r.type === "recall" && r.msgId === frame.msg_id);
    }
    const known = this._seen.get(frame.msg_id);
    if (known && known.status === 2) return; // applied already
    this._remember(frame.msg_id, 2, known ? known.held : false);
    this._seen.get(frame.msg_id).reactions = known && known.held ? {} : null; // a recalled message has none
    this._emit("recalled", { ...frame, source });
  }

  _onReadOk(frame) {
    if (this._pendingReads.has(frame.conversation_id)
        && compareIds(frame.msg_id, this._pendingReads.get(frame.conversation_id)) >= 0) {
      this._pendingReads.delete(frame.conversation_id);
    }
    this._dropRequest((r) => r.type === "read" && r.conversationId === frame.conversation_id && r.msgId === frame.msg_id);
    this._emit("read_ok", frame);
  }

  _remember(msgId, status, held) {
    const known = this._seen.get(msgId);
    if (known) {
      known.status = Math.max(known.status, status);
      known.held = known.held || held;
      return;
    }
    this._seen.set(msgId, { status, held });
    if (this._seen.size > this.options.seenLimit) {
      this._seen.delete(this._seen.keys().next().value); // oldest first (Map keeps insertion order)
    }
  }

  // -- sync ----------------------------------------------------------------------

  /** Catch up from the stored cursor (done by itself after every (re)connect). */
  sync() {
    if (this._syncing) { this._syncAgain = true; return; }
    this._syncing = true;
    this._syncAgain = false;
    this._requestSync();
  }

  _requestSync() {
    const frame = { type: "sync", cursor: this._cursor, limit: this.options.syncLimit };
    if (this._sendRaw(frame)) this._requests.push({ type: "sync" });
    else this._syncing = false;
  }

  _onSyncBatch(batch) {
    this._dropRequest((r) => r.type === "sync");
    for (const entry of batch.messages || []) {
      if (entry.type === "message") this._onMessage(entry, "sync");
      else if (entry.type === "recalled") this._onRecalled(entry, "sync");
      else if (entry.type === "receipt") this._emit("receipt", { ...entry, source: "sync" });
      else if (entry.type === "group_event") this._onGroupEvent(entry, "sync");
      else if (entry.type === "edited") this._onEdited(entry, "sync");
      else if (entry.type === "reaction") this._onReaction(entry, "sync");
    }
    // Stored only once the batch is handled: a crash in between repeats it, never skips it.
    this._cursor = batch.cursor;
    this._save("cursor", batch.cursor);
    if (batch.has_more) {
      this._requestSync();
      return;
    }
    this._syncing = false;
    this._emit("synced", { cursor: batch.cursor });
    if (this._syncAgain) this.sync();
  }

  /** The stored sync cursor of the connected user (a string, or null before the first sync). */
  get cursor() { return this._cursor; }

  // -- send, read, recall -------------------------------------------------------------

  /**
   * Send a message. Returns {clientMsgId, promise}: the promise resolves with the ack
   * (msg_id, conversation_id, timestamp) and rejects with an Error whose `code` is the
   * server's error code. Until the ack, the same frame (same client_msg_id) is re-sent
   * after `ackTimeout` and after every reconnect. `replyTo`: the msg_id this message answers;
   * `mentions`: user ids mentioned (groups only).
   */
  send({ to, groupId, content, messageType = "text", extra = {}, clientMsgId, replyTo, mentions } = {}) {
    if ((to == null) === (groupId == null)) throw new TypeError("send needs exactly one of 'to' or 'groupId'");
    if (typeof content !== "string" || content === "") throw new TypeError("'content' must be a non-empty string");
    const cmid = clientMsgId || this.newClientMsgId();
    const frame = { type: "send", client_msg_id: cmid, content, message_type: messageType, extra: extra || {} };
    if (to != null) frame.to = String(to); else frame.group_id = String(groupId);
    if (replyTo != null) frame.reply_to = String(replyTo);
    if (mentions && mentions.length) frame.mentions = mentions.map(String); // group sends only (protocol.md §21)
    if (JSON.stringify(frame).length > this.options.maxFrameChars) {
      throw new RangeError("message too large for one frame");
    }
    const existing = this._pendingSends.get(cmid);
    if (existing) return { clientMsgId: cmid, promise: existing.promise };
    const pending = { frame, attempts: 0, timer: null };
    pending.promise = new Promise((resolve, reject) => { pending.resolve = resolve; pending.reject = reject; });
    pending.promise.catch(() => {}); // callers may ignore failures; the 'error' event reports them
    this._pendingSends.set(cmid, pending);
    this._transmit(cmid);
    return { clientMsgId: cmid, promise: pending.promise };
  }

  /** client_msg_ids of the sends still waiting for their ack, oldest first. */
  get pendingSends() { return [...this._pendingSends.keys()]; }

  /** Stop retrying a send (its promise rejects with code "cancelled"). */
  cancel(clientMsgId) {
    const pending = this._pendingSends.get(clientMsgId);
    if (!pending) return false;
    clearTimeout(pending.timer);
    this._pendingSends.delete(clientMsgId);
    const err = new Error("cancelled");
    err.code = "cancelled";
    pending.reject(err);
    return true;
  }

  newClientMsgId() {
    this._cmidCounter += 1;
    return `${this._cmidPrefix}-${this._cmidCounter.toString(36)}`;
  }

  _transmit(cmid) {
    const pending = this._pendingSends.get(cmid);
    if (!pending) return;
    clearTimeout(pending.timer);
    if (!this._sendRaw(pending.frame)) return; // re-sent after the next hello
    pending.attempts += 1;
    pending.timer = setTimeout(() => this._transmit(cmid), this.options.ackTimeout);
  }

  /** Mark a conversation read up to msgId (the greatest id shown). Re-sent after a reconnect until read_ok. */
  read(conversationId, msgId) {
    msgId = String(msgId);
    const asked = this._pendingReads.get(conversationId);
    if (!asked || compareIds(msgId, asked) >= 0) this._pendingReads.set(conversationId, msgId);
    this._sendRead(conversationId, msgId);
  }

  _sendRead(conversationId, msgId) {
    if (this._sendRaw({ type: "read", conversation_id: conversationId, msg_id: msgId })) {
      this._requests.push({ type: "read", conversationId, msgId });
    }
  }

  /** Recall one of your messages (within 2 minutes). Resolves with the `recalled` frame; rejects with code. */
  recall(msgId) {
    msgId = String(msgId);
    return new Promise((resolve, reject) => {
      const waiters = this._pendingRecalls.get(msgId) || [];
      waiters.push({ resolve, reject });
      this._pendingRecalls.set(msgId, waiters);
      if (waiters.length === 1) this._sendRecall(msgId);
    });
  }

  _sendRecall(msgId) {
    if (this._sendRaw({ type: "recall", msg_id: msgId })) this._requests.push({ type: "recall", msgId });
  }

  /** Edit one of your messages (within MESSAGE_EDIT_WINDOW_SECONDS). Resolves with the `edited` frame;
   *  rejects with code (`edit_expired`, `forbidden`, `not_found`, `invalid_frame`, `too_large`, `rate_limited`). */
  edit(msgId, content) {
    msgId = String(msgId);
    if (typeof content !== "string" || content === "") throw new TypeError("'content' must be a non-empty string");
    return this._queueRequest(this._pendingEdits, `${msgId}\n${content}`, { msgId, content }, (key) => this._sendEdit(key));
  }

  // Edits and reactions are answered beside the other requests, not in their order (docs/protocol.md §1):
  // each carries a client_msg_id, which its error names.
  _sendEdit(key) {
    const pending = this._pendingEdits.get(key);
    const cmid = pending && this.newClientMsgId();
    if (pending && this._sendRaw({ type: "edit", msg_id: pending.msgId, content: pending.content, client_msg_id: cmid })) {
      this._rememberChange(cmid, "edit", key);
    }
  }

  /** Add (`op` "add") or remove ("remove") your reaction `emoji` on a message. Resolves with the `reaction`
   *  frame that answers it; rejects with code (`invalid_frame`, `forbidden`, `not_found`, `rate_limited`). */
  react(msgId, emoji, op = "add") {
    msgId = String(msgId);
    if (op !== "add" && op !== "remove") throw new TypeError("'op' must be \"add\" or \"remove\"");
    return this._queueRequest(this._pendingReacts, `${msgId}\n${emoji}\n${op}`, { msgId, emoji, op },
                              (key) => this._sendReact(key));
  }

  _rememberChange(cmid, type, key) {
    this._changeIds.set(cmid, { type, key });
    if (this._changeIds.size > 100) this._changeIds.delete(this._changeIds.keys().next().value); // answered long ago
  }

  _sendReact(key) {
    const pending = this._pendingReacts.get(key);
    const cmid = pending && this.newClientMsgId();
    if (pending && this._sendRaw({ type: "react", msg_id: pending.msgId, emoji: pending.emoji, op: pending.op,
                                   client_msg_id: cmid })) {
      this._rememberChange(cmid, "react", key);
    }
  }

  _queueRequest(pendings, key, fields, transmit) {
    return new Promise((resolve, reject) => {
      let pending = pendings.get(key);
      if (!pending) pendings.set(key, (pending = { ...fields, waiters: [] }));
      pending.waiters.push({ resolve, reject });
      if (pending.waiters.length === 1) transmit(key); // else: asked already, one answer settles all
    });
  }

  /** Tell the conversation's other parties that the user is typing (`"start"`, repeat at most every 5 s
   *  while typing) or stopped (`"stop"`). Fire and forget: returns false when offline. */
  typing(conversationId, state = "start") {
    if (state !== "start" && state !== "stop") throw new TypeError("'state' must be 'start' or 'stop'");
    // Success has no answer; the client_msg_id makes a refusal's `error` name this frame (protocol.md §10).
    const cmid = this.newClientMsgId();
    if (!this._sendRaw({ type: "typing", conversation_id: String(conversationId), state, client_msg_id: cmid })) return false;
    this._typingIds.set(cmid, { type: "typing", conversationId: String(conversationId) });
    if (this._typingIds.size > 100) this._typingIds.delete(this._typingIds.keys().next().value);
    return true;
  }

  // -- storage ---------------------------------------------------------------------

  _key(name) { return `${this.options.storagePrefix}${name}:${this.userId}`; }

  _load(name) {
    const key = this._key(name);
    try {
      if (this.storage) return this.storage.getItem(key);
    } catch { /* storage unavailable: memory */ }
    return this._memoryStore.has(key) ? this._memoryStore.get(key) : null;
  }

  _save(name, value) {
    const key = this._key(name);
    this._memoryStore.set(key, value);
    try {
      if (this.storage) this.storage.setItem(key, value);
    } catch { /* full or unavailable: memory only */ }
  }
}

/** A copy of a `reactions` object ({emoji: [user_id, …]}). */
function copyReactions(reactions) {
  const out = {};
  for (const [emoji, users] of Object.entries(reactions || {})) if (Array.isArray(users) && users.length) out[emoji] = [...users];
  return out;
}

/** Apply one {user_id, emoji, op} to a reactions object; true if it changed it. */
export function applyReaction(reactions, { user_id: userId, emoji, op }) {
  const users = reactions[emoji] || [];
  const at = users.indexOf(userId);
  if (op === "add") {
    if (at >= 0) return false;
    reactions[emoji] = [...users, userId];
    return true;
  }
  if (at < 0) return false;
  users.splice(at, 1);
  if (users.length) reactions[emoji] = users; else delete reactions[emoji];
  return true;
}

function trimSlash(url) { return String(url || "").replace(/\/+$/, ""); }

function defaultStorage() {
  try { return typeof localStorage !== "undefined" ? localStorage : null; } catch { return null; }
}

function randomHex(bytes) {
  const a = new Uint8Array(bytes);
  globalThis.crypto.getRandomValues(a);
  return [...a].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** The `exp` claim (seconds) of a JWT, or null if it cannot be read. */
export function tokenExpiry(token) {
  const claims = tokenClaims(token);
  return claims && Number.isInteger(claims.exp) ? claims.exp : null;
}

/** The claims of a JWT, unverified (for display and expiry only), or null. */
export function tokenClaims(token) {
  try {
    const part = String(token).split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
  } catch {
    return null;
  }
}
