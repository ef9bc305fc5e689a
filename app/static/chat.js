// The NetherLink chat page (served at /). Every piece of user data goes into the
// page through textContent (the el() helper below), never through innerHTML.
import {
  ApiError, NetherLinkClient, apiRequest, applyReaction, compareIds, login, logoutSession, mediaObjectUrl, privateConversationId,
  refreshTokens, register, searchMessages, tokenExpiry, uploadMedia, wsTicket,
} from "./netherlink.js";

const BASE = location.origin;
const SESSION_KEY = "netherlink:session"; // per tab (sessionStorage): two tabs may be two users
const HISTORY_PAGE = 30;
const RECALL_WINDOW_MS = 2 * 60 * 1000;
const PRESENCE_EVERY_MS = 30000;
// No frame announces a group change (added, removed): the list is fetched again this often, on
// reconnect, when a message names a conversation we do not know, and when a group send is refused.
const LIST_EVERY_MS = 30000;
const READERS_SHOWN = 3;      // "Read by a, b, c and 2 more"
// MESSAGE_EDIT_WINDOW_SECONDS of the server (the page's <body data-edit-window>); 0: no editing.
const EDIT_WINDOW_MS = (Number.isFinite(Number.parseInt(document.body.dataset.editWindow, 10))
  ? Number.parseInt(document.body.dataset.editWindow, 10) : 900) * 1000;
const TYPING_EVERY_MS = 3000; // a `start` at most this often while the composer has input (the server wants ≤ 5 s)
const TYPING_SHOWN_MS = 6000; // "… is typing" after the last `start` (protocol.md §20)
const REACTIONS = ["👍", "❤️", "😂", "😮", "😢", "🎉"];
const MENTIONS_SHOWN = 8;

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------- state

let session = null;   // {token, refreshToken, userId, username}
let refreshing = null; // the refresh in flight (one at a time: each refresh token works once)
let refreshTimer = null;
let client = null;
const convs = new Map();      // conversation_id -> conversation (see convFrom)
const views = new Map();      // conversation_id -> {messages: Map(key -> msg), loaded, loading, hasMore, nextBefore, readSent, needsRead}
const usernames = new Map();  // user_id -> username
const groups = new Map();     // group_id -> {name, role, member_count, conversation_id}: groups we are in
let groupsAvailable = true;
let openId = null;
let listRefresh = null;       // the next refresh of the conversation list (periodic, or sooner)
let listWantsGroups = false;  // ... and of GET /api/groups with it
let listSeq = 0;              // answers to older list requests are dropped
let recallTimer = null;
let authMode = "login";
let listLoaded = false;       // the conversation list has been fetched once
let editing = null;           // {conversationId, msgId, draft, error, saving}: the inline editor
let replyingTo = null;        // {conversationId, msgId}: the quote over the composer
let pickerFor = null;         // msg_id whose reaction picker is open
let myTyping = { conversationId: null, lastStart: 0, active: false }; // what we told the others
const typers = new Map();     // conversation_id -> Map(user_id -> expiry ms): who is typing there
let typingTimer = null;
let mention = null;           // {start, end, items: [{user_id, username}], index}: the open autocomplete

// ---------------------------------------------------------------- DOM helpers

/** Build an element. Strings among `children` become text nodes (never parsed as HTML). */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function showError(node, message) {
  node.textContent = message || "";
  node.hidden = !message;
}

function errorText(err) {
  if (err instanceof ApiError) {
    if (err.status === 0) return "The server cannot be reached. Try again.";
    return err.message || `Request failed (${err.status}).`;
  }
  return (err && err.message) || String(err);
}

/** A 404/405 for the path itself (a server without that API), not a 404 about a thing it names. */
function missingApi(err) {
  return err instanceof ApiError && (err.status === 405
    || (err.status === 404 && /requested URL was not found/i.test(err.message || "")));
}

function hue(text) {
  let h = 0;
  for (const ch of String(text)) h = (h * 31 + ch.codePointAt(0)) % 360;
  return h;
}

function avatar(name, { group = false, presence } = {}) {
  const node = el("span", { class: group ? "avatar group" : "avatar", "aria-hidden": "true" },
                  (String(name || "?").match(/[\p{L}\p{N}]/u) || ["?"])[0]);
  node.style.background = `hsl(${hue(name || "?")} 55% 52%)`;
  if (presence !== undefined) {
    node.append(el("span", { class: presence ? "presence online" : "presence", title: presence ? "online" : "offline" }));
  }
  return node;
}

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const dayFmt = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric" });
const fullDayFmt = new Intl.DateTimeFormat(undefined, { weekday: "long", month: "long", day: "numeric", year: "numeric" });

function shortTime(ms) {
  if (!ms) return "";
  const d = new Date(ms);
  return d.toDateString() === new Date().toDateString() ? timeFmt.format(d) : dayFmt.format(d);
}

function lastSeenText(presence) {
  if (!presence) return "";
  if (presence.online) return "online";
  if (!presence.last_seen) return "offline";
  return `last seen ${shortTime(presence.last_seen)}`;
}

// ---------------------------------------------------------------- session and auth screen

function loadSession() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(SESSION_KEY) || "null");
    if (saved && saved.token && saved.userId) {
      const exp = tokenExpiry(saved.token);
      if (saved.refreshToken || exp === null || exp * 1000 > Date.now() + 5000) return saved; // expired: refreshed
    }
  } catch { /* unreadable: log in again */ }
  return null;
}

function saveSession(value) {
  session = value;
  if (value) sessionStorage.setItem(SESSION_KEY, JSON.stringify(value));
  else sessionStorage.removeItem(SESSION_KEY);
  clearTimeout(refreshTimer);
  const exp = value && value.refreshToken ? tokenExpiry(value.token) : null;
  if (exp !== null) { // a minute before the access token expires (15 minutes by default): a new one
    refreshTimer = setTimeout(() => refreshSession().catch(() => {}), Math.max(0, exp * 1000 - Date.now() - 60000));
  }
}

/** New tokens for this session (POST /api/auth/refresh); resolves to the new access token. */
function refreshSession() {
  if (!session || !session.refreshToken) return Promise.reject(new ApiError(401, "unauthorized", "log in again"));
  if (!refreshing) {
    const current = session;
    refreshing = refreshTokens(BASE, current.refreshToken).then((answer) => {
      if (session !== current) throw new ApiError(401, "unauthorized", "logged out meanwhile");
      saveSession({ ...current, token: answer.access_token, refreshToken: answer.refresh_token });
      if (client) client.token = answer.access_token;
      return answer.access_token;
    }).finally(() => { refreshing = null; });
  }
  return refreshing;
}

function setAuthMode(mode) {
  authMode = mode;
  $("tab-login").setAttribute("aria-selected", String(mode === "login"));
  $("tab-register").setAttribute("aria-selected", String(mode === "register"));
  $("auth-submit").textContent = mode === "login" ? "Log in" : "Create account";
  $("auth-hint").hidden = mode === "login";
  $("auth-form").elements.password.autocomplete = mode === "login" ? "current-password" : "new-password";
  showError($("auth-error"), "");
}

function showAuth(message) {
  $("app").hidden = true;
  $("auth").hidden = false;
  showError($("auth-error"), message || "");
  document.title = "NetherLink";
  $("auth-form").elements.username.focus();
}

async function onAuthSubmit(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const username = form.elements.username.value.trim();
  const password = form.elements.password.value;
  const submit = $("auth-submit");
  submit.disabled = true;
  showError($("auth-error"), "");
  try {
    if (authMode === "register") await register(BASE, username, password);
    const answer = await login(BASE, username, password);
    form.reset();
    saveSession({ token: answer.access_token, refreshToken: answer.refresh_token, userId: answer.user_id, username });
    startApp();
  } catch (err) {
    showError($("auth-error"), err instanceof ApiError && err.status === 409
      ? `The username “${username}” is taken.` : errorText(err));
  } finally {
    submit.disabled = false;
  }
}

function logout(message) {
  if (session && message === undefined) { // the user's own logout: end the session on the server too
    const token = session.token;
    Promise.resolve(forgetSubscription(token)).then(() => logoutSession(BASE, token)).catch(() => {});
  } else if (session) {
    forgetSubscription(session.token);
  }
  if (client) client.close();
  client = null;
  clearInterval(recallTimer);
  clearTimeout(listRefresh);
  listSeq += 1;
  convs.clear(); views.clear(); groups.clear(); usernames.clear(); typers.clear();
  editing = replyingTo = pickerFor = mention = null;
  myTyping = { conversationId: null, lastStart: 0, active: false };
  openId = null;
  listLoaded = false;
  saveSession(null);
  $("conversations").replaceChildren();
  closeConversationView();
  showAuth(message);
}

// ---------------------------------------------------------------- app start

function startApp() {
  $("auth").hidden = true;
  $("app").hidden = false;
  usernames.set(session.userId, session.username);
  $("me-name").textContent = session.username;
  $("me-avatar").replaceWith(Object.assign(avatar(session.username), { id: "me-avatar" }));
  closeConversationView();

  client = new NetherLinkClient({ baseUrl: BASE, token: session.token, refresh: refreshSession,
                                  ticket: (token) => wsTicket(BASE, token) }); // no token in the socket URL
  client.on("state", onState);
  client.on("message", onMessage);
  client.on("ack", onAck);
  client.on("error", onClientError);
  client.on("receipt", onReceipt);
  client.on("recalled", onRecalled);
  client.on("status", onStatus);
  client.on("read_ok", onReadOk);
  client.on("edited", onEdited);
  client.on("reaction", onReaction);
  client.on("typing", onTyping);
  client.on("group_event", () => scheduleListRefresh(0, { withGroups: true })); // membership, name, deletion
  client.on("synced", () => scheduleListRefresh(0, { withGroups: true })); // after every (re)connect
  client.on("unauthorized", () => logout("Your session has ended: log in again."));
  client.connect();

  refreshList({ withGroups: true }); // re-arms itself every LIST_EVERY_MS; refreshes presence too
  recallTimer = setInterval(hideExpiredRecalls, 5000);
  registerServiceWorker();
}

// ---------------------------------------------------------------- web push (docs/push.md §2, §8.2)

let pushRegistration = null; // the service worker's registration (/sw.js), once registered

function pushSupported() {
  return "serviceWorker" in navigator && "PushManager" in window && "Notification" in window;
}

/** Register the service worker; offer "Enable notifications" unless the user refused them, and keep a
 *  subscription this browser already has registered with the server (it may have been pruned). */
async function registerServiceWorker() {
  if (!pushSupported()) return;
  try {
    pushRegistration = await navigator.serviceWorker.register("/sw.js");
  } catch (err) {
    console.warn("NetherLink: no service worker, so no notifications with the tab closed", err);
    return;
  }
  const existing = await pushRegistration.pushManager.getSubscription().catch(() => null);
  const granted = Notification.permission === "granted";
  $("enable-push").hidden = Notification.permission === "denied" || Boolean(existing && granted);
  if (existing && granted) sendSubscription(existing).catch(() => { $("enable-push").hidden = false; });
}

/** On a click (browsers ask for permission only on a user action): permission, subscribe with the
 *  server's VAPID key, and send the subscription to the server. */
async function enablePush() {
  const button = $("enable-push");
  button.disabled = true;
  showError($("sidebar-error"), "");
  try {
    if (await Notification.requestPermission() !== "granted") {
      button.hidden = true;
      showError($("sidebar-error"), "Notifications are blocked for this site in the browser's settings.");
      return;
    }
    const { public_key: key } = await api("GET", "/api/push/vapid-public-key");
    const registration = pushRegistration || await navigator.serviceWorker.ready;
    const subscription = await registration.pushManager.subscribe({
      userVisibleOnly: true, applicationServerKey: base64UrlBytes(key),
    });
    await sendSubscription(subscription);
    button.hidden = true;
  } catch (err) {
    showError($("sidebar-error"), `Notifications could not be enabled: ${errorText(err)}`);
  } finally {
    button.disabled = false;
  }
}

/** At logout: this browser is no longer pushed for the user (the device removed, the subscription
 *  dropped: a push service answers 410 for it from now on, which prunes it if the removal failed). */
function forgetSubscription(token) {
  if (!pushRegistration) return Promise.resolve();
  return pushRegistration.pushManager.getSubscription().then(async (subscription) => {
    if (!subscription) return;
    try {
      const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(subscription.endpoint));
      const hex = [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
      await apiRequest(BASE, "DELETE", `/api/devices/webpush:${hex}`, { token });
    } finally {
      await subscription.unsubscribe();
    }
  }).catch(() => {});
}

function sendSubscription(subscription) {
  return api("POST", "/api/devices", { body: { platform: "webpush", subscription: subscription.toJSON() } });
}

function base64UrlBytes(text) {
  const b64 = text.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - (text.length % 4)) % 4);
  return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
}

function api(method, path, options = {}) {
  const ended = (err) => {
    if (err instanceof ApiError && err.status === 401) logout("Your session has ended: log in again.");
    throw err;
  };
  return apiRequest(BASE, method, path, { token: session.token, ...options }).catch((err) => {
    if (!(err instanceof ApiError && err.status === 401 && session && session.refreshToken)) return ended(err);
    // The access token expired (or the session ended): one refresh, then the request once more.
    return refreshSession().then((token) => apiRequest(BASE, method, path, { token, ...options }), (refreshErr) => {
      throw refreshErr instanceof ApiError && refreshErr.status > 0 && refreshErr.status < 500 ? err : refreshErr;
    }).catch(ended);
  });
}

function onState({ state, retryIn, code }) {
  const node = $("conn-state");
  node.dataset.state = state;
  if (state === "open") node.textContent = "Connected";
  else if (state === "connecting") node.textContent = "Connecting…";
  else if (retryIn !== undefined) node.textContent = `Offline: reconnecting${retryIn >= 1500 ? ` in ${Math.round(retryIn / 1000)} s` : "…"}`;
  else node.textContent = "Offline";
  document.body.classList.toggle("offline", state !== "open");
}

// ---------------------------------------------------------------- conversation list

function preview(msg) {
  if (msg.status === 2) return "[message recalled]";
  if (msg.message_type === "image") return "📷 Photo";
  if (msg.message_type === "file") return `📎 ${msg.content}`;
  if (msg.message_type && msg.message_type !== "text") return `[${msg.message_type}]`;
  return String(msg.content || "").slice(0, 200);
}

/** The list's preview: in a group the author's name first, as GET /api/conversations has it. */
function convPreview(conv) {
  if (!conv.lastMessage) return conv.isGroup ? "New group" : "";
  if (!conv.isGroup || !conv.lastFrom) return conv.lastMessage;
  return `${usernames.get(conv.lastFrom) || `User ${conv.lastFrom}`}: ${conv.lastMessage}`;
}

/** A group we left or were removed from (`group.member` false in the list). */
function hasLeft(conv) {
  return Boolean(conv && conv.isGroup && conv.member === false);
}

function convTitle(conv) {
  if (conv.isGroup) {
    const group = groups.get(conv.groupId);
    return (group && group.name) || conv.name || `Group ${conv.groupId}`;
  }
  return (conv.peer && conv.peer.username) || usernames.get(conv.peer && conv.peer.user_id) || `User ${conv.peer && conv.peer.user_id}`;
}

function ensureConv(conversationId, fields = {}) {
  let conv = convs.get(conversationId);
  if (!conv) {
    conv = { id: conversationId, isGroup: conversationId.startsWith("g_"), peer: null, groupId: null, name: null,
             member: undefined, lastMessage: "", lastFrom: null, lastTime: 0, lastMsgId: null, unread: 0,
             liveUnread: new Set(), readAt: 0, presence: undefined, presenceAt: 0, namesAt: 0,
             joinedAt: new Map() }; // group: user_id -> joined_at (ms) of the members we have listed
    if (conv.isGroup) conv.groupId = conversationId.slice(2);
    convs.set(conversationId, conv);
  }
  Object.assign(conv, fields);
  return conv;
}

function peerOf(msg) {
  return msg.from === session.userId ? msg.to : msg.from;
}

async function refreshList({ withGroups = false } = {}) {
  if (!session) return;
  clearTimeout(listRefresh);
  listRefresh = setTimeout(refreshList, LIST_EVERY_MS);
  withGroups = withGroups || listWantsGroups;
  listWantsGroups = false;
  const seq = ++listSeq;
  const started = Date.now();
  let answer;
  try {
    answer = await api("GET", "/api/conversations");
  } catch (err) {
    if (withGroups) listWantsGroups = true;
    return; // shown as offline by the socket state; the next refresh tries again
  }
  if (seq !== listSeq || !session) { // a newer request is on its way
    if (withGroups && session && groupsAvailable) loadGroups();
    return;
  }
  for (const item of answer.conversations) {
    const conv = ensureConv(item.conversation_id, {
      isGroup: Boolean(item.is_group), peer: item.peer || null, groupId: item.group_id || null,
    });
    // The list may predate a message shown live (it is refreshed just as one arrives): keep the newer.
    if (!conv.lastMsgId || !item.last_msg_id || compareIds(item.last_msg_id, conv.lastMsgId) >= 0) {
      Object.assign(conv, { lastMessage: item.last_message || "", lastFrom: null,
                            lastTime: item.last_message_time || 0, lastMsgId: item.last_msg_id || null });
    }
    if (item.group) {
      conv.name = item.group.name;
      conv.member = item.group.member !== false;
      if (!conv.member) groups.delete(conv.groupId);
      else if (!groups.has(conv.groupId)) withGroups = true; // a group we were added to: its role and size
    }
    if (item.peer) usernames.set(item.peer.user_id, item.peer.username);
    if (item.peer_delivered_msg_id) { // the peer's positions, also when their receipts came while we were away
      onReceipt({ conversation_id: conv.id, reader: item.peer.user_id, msg_id: item.peer_delivered_msg_id, kind: "delivered" });
    }
    if (item.peer_read_msg_id) {
      onReceipt({ conversation_id: conv.id, reader: item.peer.user_id, msg_id: item.peer_read_msg_id, kind: "read" });
    }
    if (isOpenAndVisible(conv.id)) conv.unread = 0;
    else if (conv.readAt <= started) conv.unread = Math.max(item.unread || 0, conv.liveUnread.size);
  }
  listLoaded = true;
  renderList();
  if (openId) renderHeader(); // a group we were removed from: its notice instead of the composer
  if (withGroups && groupsAvailable) loadGroups();
  refreshPresence();
}

/** Refresh the list soon (several calls in a row make one request). */
function scheduleListRefresh(delay = 800, { withGroups = false } = {}) {
  if (!session) return;
  if (withGroups) listWantsGroups = true;
  clearTimeout(listRefresh);
  listRefresh = setTimeout(refreshList, delay);
}

async function loadGroups() {
  try {
    const answer = await api("GET", "/api/groups");
    groupsAvailable = true;
    groups.clear(); // the groups we are in now: one we were removed from is no longer here
    for (const g of answer.groups || []) {
      groups.set(g.group_id, g);
      const conv = ensureConv(g.conversation_id || `g_${g.group_id}`, { isGroup: true, groupId: g.group_id, name: g.name });
      conv.role = g.role;
    }
    renderList();
    if (openId && convs.get(openId) && convs.get(openId).isGroup) renderHeader();
  } catch (err) {
    if (missingApi(err)) groupsAvailable = false;
  }
}

/** As the server orders them: conversations without a message yet (a group we were just added to) first. */
function sortedConvs() {
  return [...convs.values()].sort((a, b) => (b.lastTime ? 0 : 1) - (a.lastTime ? 0 : 1)
    || (b.lastTime || 0) - (a.lastTime || 0) || compareIds(b.lastMsgId || "0", a.lastMsgId || "0"));
}

function renderList() {
  const list = $("conversations");
  const items = sortedConvs();
  list.replaceChildren(...items.map((conv) => {
    const title = convTitle(conv);
    const unread = isOpenAndVisible(conv.id) ? 0 : conv.unread;
    const left = hasLeft(conv);
    return el("li", {
      class: ["conv", unread ? "unread" : "", left ? "left" : ""].filter(Boolean).join(" "),
      dataset: { conversationId: conv.id }, tabindex: "0",
      "aria-current": conv.id === openId ? "true" : "false",
      onclick: () => openConversation(conv.id),
      onkeydown: (e) => { if (e.key === "Enter") openConversation(conv.id); },
    },
    avatar(title, { group: conv.isGroup, presence: conv.isGroup || conv.presenceHidden ? undefined : Boolean(conv.presence && conv.presence.online) }),
    el("span", { class: "conv-name" }, el("span", { class: "name-text" }, title),
       left ? [" ", el("span", { class: "tag", title: "You are no longer a member of this group" }, "left")] : null),
    el("span", { class: "conv-time" }, shortTime(conv.lastTime)),
    el("span", { class: "conv-preview" }, convPreview(conv)),
    unread ? el("span", { class: "badge", "aria-label": `${unread} unread` }, String(unread > 99 ? "99+" : unread)) : el("span"));
  }));
  $("no-conversations").hidden = items.length > 0;
  const total = items.reduce((n, c) => n + (isOpenAndVisible(c.id) ? 0 : c.unread), 0);
  document.title = total ? `(${total}) NetherLink` : "NetherLink";
}

async function refreshPresence(only) {
  const now = Date.now();
  const targets = only ? [only] : sortedConvs().filter((c) => !c.isGroup && c.peer).slice(0, 40);
  await Promise.all(targets.map(async (conv) => {
    if (!only && now - conv.presenceAt < PRESENCE_EVERY_MS - 1000) return;
    conv.presenceAt = now;
    try {
      conv.presence = await api("GET", `/api/users/${encodeURIComponent(conv.peer.user_id)}/presence`);
      conv.presenceHidden = false;
    } catch (err) {
      // 403: the peer's privacy setting (or a block) hides it; 404: the account is gone. Show none.
      if (err instanceof ApiError && (err.status === 403 || err.status === 404)) {
        conv.presence = undefined;
        conv.presenceHidden = true;
      } /* otherwise keep the last known */
    }
  }));
  renderList();
  if (openId) renderHeader();
}

// ---------------------------------------------------------------- opening a conversation

function isOpenAndVisible(conversationId) {
  return conversationId === openId && document.visibilityState === "visible";
}

function view(conversationId) {
  let v = views.get(conversationId);
  if (!v) {
    v = { messages: new Map(), loaded: false, loading: false, hasMore: false, nextBefore: null,
          readSent: null, needsRead: false, receiptUpTo: null, deliveredUpTo: null, readers: new Map() }; // readers: group receipts
    views.set(conversationId, v);
  }
  return v;
}

function closeConversationView() {
  $("placeholder").hidden = false;
  $("conv-head").hidden = true;
  $("messages").hidden = true;
  $("composer").hidden = true;
  $("left-notice").hidden = true;
  $("typing").hidden = true;
  $("reply-bar").hidden = true;
  $("app").classList.remove("show-conversation");
}

async function openConversation(conversationId) {
  const conv = ensureConv(conversationId);
  if (openId !== conversationId) {
    stopTyping();
    pickerFor = null;
    closeMentions();
  }
  openId = conversationId;
  conv.unread = 0;
  $("placeholder").hidden = true;
  $("conv-head").hidden = false;
  $("messages").hidden = false;
  $("app").classList.add("show-conversation");
  renderHeader(); // also shows the composer, or the notice of a group we left
  renderList();
  renderMessages();
  renderTyping();
  renderReplyBar();
  $("composer").elements.content.focus();
  if (!conv.isGroup && conv.peer) refreshPresence(conv);
  if (conv.isGroup) loadMemberNames(conv);
  const v = view(conversationId);
  if (!v.loaded) await loadHistory(conversationId);
  v.needsRead = v.needsRead || [...v.messages.values()].some((m) => m.from !== session.userId && m.status === 0);
  maybeSendRead();
}

function renderHeader() {
  const conv = convs.get(openId);
  if (!conv) return;
  const title = convTitle(conv);
  $("conv-title").textContent = title;
  const left = hasLeft(conv);
  const group = conv.isGroup && groups.get(conv.groupId);
  const sub = !conv.isGroup ? lastSeenText(conv.presence)
    : left ? "not a member"
      : group ? `${group.member_count} member${group.member_count === 1 ? "" : "s"}` : "group";
  $("conv-sub").textContent = sub;
  $("conv-avatar").replaceWith(Object.assign(
    avatar(title, { group: conv.isGroup, presence: conv.isGroup || conv.presenceHidden ? undefined : Boolean(conv.presence && conv.presence.online) }),
    { id: "conv-avatar" }));
  $("members").hidden = !conv.isGroup || left;
  $("composer").hidden = left;
  $("left-notice").hidden = !left;
  renderReplyBar();
}

async function loadHistory(conversationId, older = false) {
  const v = view(conversationId);
  if (v.loading) return;
  v.loading = true;
  const box = $("messages");
  const fromBottom = box.scrollHeight - box.scrollTop;
  try {
    const answer = await api("GET", `/api/conversations/${encodeURIComponent(conversationId)}/messages`,
                             { query: { limit: HISTORY_PAGE, before: older ? v.nextBefore : undefined } });
    for (const msg of answer.messages) addMessage(conversationId, msg);
    v.hasMore = answer.has_more;
    v.nextBefore = answer.next_before;
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 404)) { // 404: no message yet
      v.loading = false;
      showError($("sidebar-error"), `Could not load messages: ${errorText(err)}`);
      return;
    }
  }
  v.loaded = true;
  v.loading = false;
  if (openId !== conversationId) return;
  renderMessages();
  if (older) box.scrollTop = box.scrollHeight - fromBottom;
}

// ---------------------------------------------------------------- messages

/** Add or update a message in its conversation's view; dedupes by msg_id and by our own client_msg_id. */
function addMessage(conversationId, msg) {
  const v = view(conversationId);
  if (msg.from === session.userId && msg.client_msg_id && v.messages.has(`c:${msg.client_msg_id}`)) {
    v.messages.delete(`c:${msg.client_msg_id}`); // our pending copy: the stored one replaces it
  }
  const key = `m:${msg.msg_id}`;
  const existing = v.messages.get(key);
  if (existing) {
    if ((msg.status || 0) > (existing.status || 0)) Object.assign(existing, { status: msg.status, content: msg.status === 2 ? "" : existing.content });
    if (msg.edited_at && existing.status !== 2 && !(existing.edited_at >= msg.edited_at)) {
      Object.assign(existing, { content: msg.content, edited_at: msg.edited_at }); // a later edit wins
    }
    if (!existing.reactions && msg.reactions) existing.reactions = { ...msg.reactions };
    return existing;
  }
  const stored = { ...msg, state: msg.from === session.userId ? "sent" : undefined };
  if (stored.from === session.userId && v.receiptUpTo && compareIds(stored.msg_id, v.receiptUpTo) <= 0 && stored.status === 0) stored.status = 1;
  if (msg.from && msg.from !== session.userId && msg.status === 0) v.needsRead = true;
  v.messages.set(key, stored);
  return stored;
}

function sortedMessages(v) {
  const acked = [], pending = [];
  for (const m of v.messages.values()) (m.msg_id ? acked : pending).push(m);
  acked.sort((a, b) => compareIds(a.msg_id, b.msg_id));
  pending.sort((a, b) => a.localSeq - b.localSeq);
  return acked.concat(pending);
}

function messageState(conv, v, msg) {
  if (msg.from !== session.userId) return null;
  if (msg.state === "failed") return ["failed", `Not sent: ${msg.error || "error"}`];
  if (!msg.msg_id) return ["sending", "Sending…"];
  if (conv.isGroup) {
    // Group messages stay at status 0: who has read them is known only from the receipts seen live.
    // A receipt covers every id up to its own, but a member who joined later never saw the older ones.
    const readers = [...v.readers].filter(([reader, upTo]) => compareIds(msg.msg_id, upTo) <= 0
        && !(conv.joinedAt.get(reader) > msg.timestamp))
      .map(([reader]) => usernames.get(reader) || `User ${reader}`).sort();
    if (!readers.length) return ["sent", "Sent"];
    const more = readers.length - READERS_SHOWN;
    return ["read", `Read by ${readers.slice(0, READERS_SHOWN).join(", ")}${more > 0 ? ` and ${more} more` : ""}`];
  }
  if (msg.status === 1) return ["read", "Read"];
  if (v.deliveredUpTo && compareIds(msg.msg_id, v.deliveredUpTo) <= 0) return ["delivered", "Delivered"];
  return ["sent", "Sent"];
}

function renderMessages({ keepScroll = false } = {}) {
  const conv = convs.get(openId);
  if (!conv) return;
  const v = view(openId);
  const box = $("messages");
  const nearBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  const previousTop = box.scrollTop;
  const nodes = [];
  let lastDay = null, lastSender = null;
  for (const msg of sortedMessages(v)) {
    const day = new Date(msg.timestamp || Date.now()).toDateString();
    if (day !== lastDay) {
      nodes.push(el("li", { class: "day" }, fullDayFmt.format(new Date(msg.timestamp || Date.now()))));
      lastDay = day; lastSender = null;
    }
    nodes.push(renderMessage(conv, v, msg, msg.from === lastSender));
    lastSender = msg.from;
  }
  const active = document.activeElement;
  const editorFocus = active && active.classList.contains("edit-input")
    ? [active.selectionStart, active.selectionEnd] : null;
  $("message-list").replaceChildren(...nodes);
  if (editorFocus) { // a re-render (a message arriving) must not take the editor away from the user
    const input = $("message-list").querySelector(".edit-input");
    if (input) { input.focus(); input.setSelectionRange(...editorFocus); }
  }
  $("load-older").hidden = !v.hasMore;
  if (!keepScroll || nearBottom) box.scrollTop = box.scrollHeight;
  else box.scrollTop = previousTop;
}

function renderMessage(conv, v, msg, sameSender) {
  const mine = msg.from === session.userId;
  const recalled = msg.status === 2;
  const classes = ["msg", mine ? "mine" : "theirs"];
  if (recalled) classes.push("recalled");
  if (sameSender) classes.push("same-sender");
  if (!mine && !recalled && (msg.mentions || []).includes(session.userId)) classes.push("mentions-me");
  const state = messageState(conv, v, msg);
  const meta = el("div", { class: "meta" },
    el("time", { datetime: new Date(msg.timestamp || Date.now()).toISOString() }, timeFmt.format(new Date(msg.timestamp || Date.now()))),
    msg.edited_at && !recalled
      ? el("span", { class: "edited", title: `edited ${shortTime(msg.edited_at)} ${timeFmt.format(new Date(msg.edited_at))}` }, "edited")
      : null,
    state && !recalled ? el("span", { class: "msg-state", dataset: { state: state[0] } }, state[1]) : null);
  const canAct = msg.msg_id && !recalled && !hasLeft(conv);
  if (canAct) {
    meta.append(el("button", { type: "button", class: "action reply", title: "Reply", onclick: () => startReply(msg) }, "Reply"));
    meta.append(el("button", { type: "button", class: "action react-btn", title: "React", "aria-label": "React",
                               "aria-expanded": String(pickerFor === msg.msg_id),
                               onclick: () => togglePicker(msg) }, "☺+"));
  }
  if (mine && canAct && canEdit(msg)) {
    meta.append(el("button", { type: "button", class: "action edit", onclick: () => startEdit(msg) }, "Edit"));
  }
  if (mine && msg.msg_id && !recalled && Date.now() - msg.timestamp < RECALL_WINDOW_MS) {
    meta.append(el("button", { type: "button", class: "recall", onclick: () => recallMessage(msg) }, "Recall"));
  }
  if (msg.recallError) meta.append(el("span", { class: "msg-error" }, msg.recallError));
  if (msg.actionError) meta.append(el("span", { class: "msg-error" }, msg.actionError));
  const isEditing = editing && editing.msgId === msg.msg_id && editing.conversationId === conv.id && !recalled;
  const body = recalled
    ? el("div", { class: "text" }, mine ? "You recalled a message" : "Message recalled")
    : isEditing
      ? editorNode(msg)
      : (msg.message_type === "image" || msg.message_type === "file") && msg.extra && msg.extra.media_id
        ? mediaBody(msg)
        : msg.message_type && msg.message_type !== "text"
          ? el("div", { class: "text" }, `[${msg.message_type}] `, msg.content)
          : el("div", { class: "text" }, textWithMentions(msg));
  return el("li", { class: classes.join(" "), dataset: { msgId: msg.msg_id || "", clientMsgId: msg.client_msg_id || "" } },
    conv.isGroup && !mine && !sameSender ? el("div", { class: "sender" }, usernames.get(msg.from) || `User ${msg.from}`) : null,
    el("div", { class: "bubble" }, msg.reply_to && !recalled ? quoteNode(v, msg.reply_to) : null, body),
    !recalled ? reactionsNode(msg) : null,
    pickerFor === msg.msg_id && canAct ? pickerNode(msg) : null,
    meta);
}

/** The message's text, with the "@name" of each member it mentions marked (as text nodes, never HTML). */
function textWithMentions(msg) {
  const content = String(msg.content || "");
  const names = (msg.mentions || []).map((id) => usernames.get(id)).filter(Boolean);
  if (!names.length) return content;
  const pattern = new RegExp(`@(?:${names.map(escapeRegExp).sort((a, b) => b.length - a.length).join("|")})(?![\\p{L}\\p{N}_-])`, "gu");
  const parts = [];
  let at = 0;
  for (const match of content.matchAll(pattern)) {
    if (match.index > at) parts.push(content.slice(at, match.index));
    const name = match[0].slice(1);
    const isMe = name === session.username;
    parts.push(el("span", { class: isMe ? "mention you" : "mention" }, match[0]));
    at = match.index + match[0].length;
  }
  parts.push(content.slice(at));
  return parts;
}

function escapeRegExp(text) {
  return String(text).replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

// ---------------------------------------------------------------- replies

function authorName(msg) {
  return msg.from === session.userId ? "You" : usernames.get(msg.from) || `User ${msg.from}`;
}

/** The quoted message over a reply, looked up among the messages loaded in the view. */
function quoteNode(v, replyToId) {
  const original = v.messages.get(`m:${replyToId}`);
  if (!original) return el("div", { class: "quote missing", dataset: { replyTo: replyToId } }, "original message not loaded");
  const text = original.status === 2 ? "message recalled" : preview(original);
  return el("div", {
    class: original.status === 2 ? "quote recalled" : "quote", dataset: { replyTo: replyToId }, title: "Show the original",
    onclick: () => {
      const row = document.querySelector(`#message-list li.msg[data-msg-id="${replyToId}"]`);
      if (!row) return;
      row.scrollIntoView({ block: "center" });
      row.classList.add("found");
      setTimeout(() => row.classList.remove("found"), 2000);
    },
  }, el("span", { class: "quote-author" }, authorName(original)), el("span", { class: "quote-text" }, text));
}

function startReply(msg) {
  replyingTo = { conversationId: openId, msgId: msg.msg_id };
  renderReplyBar();
  $("composer").elements.content.focus();
}

function renderReplyBar() {
  const bar = $("reply-bar");
  const conv = convs.get(openId);
  if (!replyingTo || replyingTo.conversationId !== openId || !conv || hasLeft(conv)) {
    bar.hidden = true;
    return;
  }
  const v = view(openId);
  const original = v.messages.get(`m:${replyingTo.msgId}`);
  $("reply-label").textContent = original ? `Replying to ${authorName(original)}` : "Replying";
  $("reply-preview").textContent = !original ? "original message not loaded"
    : original.status === 2 ? "message recalled" : preview(original);
  bar.hidden = false;
}

function cancelReply() {
  replyingTo = null;
  renderReplyBar();
}

// ---------------------------------------------------------------- edits

function canEdit(msg) {
  return EDIT_WINDOW_MS > 0 && !msg.editExpired && (!msg.message_type || msg.message_type === "text")
    && Date.now() - msg.timestamp < EDIT_WINDOW_MS;
}

function startEdit(msg) {
  editing = { conversationId: openId, msgId: msg.msg_id, draft: msg.content, error: null, saving: false };
  pickerFor = null;
  renderMessages({ keepScroll: true });
  const input = $("message-list").querySelector(".edit-input");
  if (input) { input.focus(); input.setSelectionRange(input.value.length, input.value.length); }
}

function editorNode(msg) {
  const input = el("textarea", { class: "edit-input", rows: "2", "aria-label": "Edit the message" });
  input.value = editing.draft;
  input.addEventListener("input", () => { editing.draft = input.value; });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); saveEdit(msg); }
    else if (e.key === "Escape") { e.preventDefault(); cancelEdit(); }
  });
  return el("div", { class: "editor" }, input,
    el("div", { class: "editor-actions" },
      editing.error ? el("span", { class: "msg-error" }, editing.error) : null,
      el("button", { type: "button", class: "ghost cancel-edit", onclick: cancelEdit }, "Cancel"),
      el("button", { type: "button", class: "primary save-edit", disabled: editing.saving, onclick: () => saveEdit(msg) }, "Save")));
}

function cancelEdit() {
  editing = null;
  renderMessages({ keepScroll: true });
}

async function saveEdit(msg) {
  if (!editing || editing.saving) return;
  const current = editing;
  const content = current.draft;
  if (!content.trim()) { current.error = "A message cannot be empty (recall it instead)."; renderMessages({ keepScroll: true }); return; }
  if (content === msg.content) { cancelEdit(); return; }
  current.saving = true;
  current.error = null;
  try {
    const frame = await client.edit(msg.msg_id, content);
    onEdited(frame); // also reported as an event (once): applying it twice is harmless
    if (editing === current) editing = null;
  } catch (err) {
    current.saving = false;
    if (err.code === "edit_expired") {
      msg.editExpired = true;
      if (editing === current) editing = null;
      msg.actionError = "Too late to edit.";
    } else {
      current.error = `Not saved: ${err.message}`;
    }
  }
  if (msg.conversation_id === openId || current.conversationId === openId) renderMessages({ keepScroll: true });
}

function onEdited({ msg_id: msgId, conversation_id: conversationId, content, edited_at: editedAt }) {
  const v = views.get(conversationId);
  const msg = v && v.messages.get(`m:${msgId}`);
  if (msg && msg.status !== 2 && !(msg.edited_at >= editedAt)) {
    Object.assign(msg, { content, edited_at: editedAt });
    if (conversationId === openId) renderMessages({ keepScroll: true });
    if (replyingTo && replyingTo.msgId === msgId) renderReplyBar();
  }
  const conv = convs.get(conversationId);
  if (conv && conv.lastMsgId === msgId && content) {
    conv.lastMessage = msg ? preview(msg) : String(content).slice(0, 200);
    renderList();
  }
}

// ---------------------------------------------------------------- reactions

function togglePicker(msg) {
  pickerFor = pickerFor === msg.msg_id ? null : msg.msg_id;
  renderMessages({ keepScroll: true });
}

function pickerNode(msg) {
  return el("div", { class: "picker", role: "menu", "aria-label": "Reactions" },
    REACTIONS.map((emoji) => el("button", {
      type: "button", class: "pick", role: "menuitem", dataset: { emoji }, title: emoji,
      onclick: () => { pickerFor = null; toggleReaction(msg, emoji); },
    }, emoji)));
}

function reactionsNode(msg) {
  const entries = Object.entries(msg.reactions || {}).filter(([, users]) => users && users.length);
  if (!entries.length) return null;
  return el("div", { class: "reactions" }, entries.map(([emoji, users]) => {
    const mineToo = users.includes(session.userId);
    const names = users.map((id) => (id === session.userId ? "you" : usernames.get(id) || `User ${id}`));
    return el("button", {
      type: "button", class: mineToo ? "reaction-chip mine" : "reaction-chip", dataset: { emoji },
      title: names.join(", "), "aria-pressed": String(mineToo),
      onclick: () => toggleReaction(msg, emoji),
    }, el("span", { class: "emoji" }, emoji), el("span", { class: "count" }, String(users.length)));
  }));
}

/** Add our reaction, or take it back if we have it: the answer (a `reaction` frame) updates the view. */
async function toggleReaction(msg, emoji) {
  const have = ((msg.reactions || {})[emoji] || []).includes(session.userId);
  msg.actionError = null;
  renderMessages({ keepScroll: true });
  try {
    onReaction(await client.react(msg.msg_id, emoji, have ? "remove" : "add"));
  } catch (err) {
    msg.actionError = `Reaction failed: ${err.message}`;
    if (msg.conversation_id === openId) renderMessages({ keepScroll: true });
  }
}

function onReaction({ msg_id: msgId, conversation_id: conversationId, user_id: userId, emoji, op }) {
  const v = views.get(conversationId);
  const msg = v && v.messages.get(`m:${msgId}`);
  if (!msg || msg.status === 2) return;
  msg.reactions = { ...(msg.reactions || {}) };
  for (const key of Object.keys(msg.reactions)) msg.reactions[key] = [...msg.reactions[key]];
  if (!applyReaction(msg.reactions, { user_id: userId, emoji, op })) return; // a repeat: nothing changes
  const conv = convs.get(conversationId);
  if (conv && conv.isGroup && !usernames.has(userId)) loadMemberNames(conv, { throttle: true });
  if (conversationId === openId) renderMessages({ keepScroll: true });
}

// ---------------------------------------------------------------- typing

/** Our composer changed: `start` at most every TYPING_EVERY_MS while it has text, `stop` once it is empty. */
function noteComposerInput() {
  const conv = openId && convs.get(openId);
  if (!client || !conv || hasLeft(conv)) return;
  const hasText = $("composer").elements.content.value.trim() !== "";
  if (!hasText) { stopTyping(); return; }
  const now = Date.now();
  if (myTyping.active && myTyping.conversationId === openId && now - myTyping.lastStart < TYPING_EVERY_MS) return;
  if (myTyping.conversationId !== openId) stopTyping();
  if (client.typing(openId, "start")) myTyping = { conversationId: openId, lastStart: now, active: true };
}

function stopTyping() {
  if (myTyping.active && client) client.typing(myTyping.conversationId, "stop");
  myTyping = { conversationId: null, lastStart: 0, active: false };
}

function onTyping({ conversation_id: conversationId, user_id: userId, state }) {
  if (userId === session.userId) return;
  let inConv = typers.get(conversationId);
  if (state === "start") {
    if (!inConv) typers.set(conversationId, (inConv = new Map()));
    inConv.set(userId, Date.now() + TYPING_SHOWN_MS);
    const conv = convs.get(conversationId);
    if (conv && conv.isGroup && !usernames.has(userId)) loadMemberNames(conv, { throttle: true });
  } else if (inConv) {
    inConv.delete(userId);
  }
  renderTyping();
}

function typingEnded(conversationId, userId) {
  const inConv = typers.get(conversationId);
  if (inConv && inConv.delete(userId)) renderTyping();
}

function renderTyping() {
  clearTimeout(typingTimer);
  typingTimer = null;
  const now = Date.now();
  let next = Infinity;
  for (const [cid, inConv] of typers) {
    for (const [uid, until] of inConv) {
      if (until <= now) inConv.delete(uid); else next = Math.min(next, until);
    }
    if (!inConv.size) typers.delete(cid);
  }
  if (next !== Infinity) typingTimer = setTimeout(renderTyping, next - now + 20);
  const node = $("typing");
  const conv = openId && convs.get(openId);
  const inOpen = openId && typers.get(openId);
  if (!conv || !inOpen || !inOpen.size || hasLeft(conv)) {
    node.hidden = true;
    node.textContent = "";
    return;
  }
  const names = [...inOpen.keys()].map((uid) => usernames.get(uid)
    || (conv.peer && conv.peer.user_id === uid && conv.peer.username) || `User ${uid}`).sort();
  node.textContent = names.length === 1 ? `${names[0]} is typing…`
    : names.length === 2 ? `${names[0]} and ${names[1]} are typing…`
      : `${names.length} people are typing…`;
  node.hidden = false;
}

// ---------------------------------------------------------------- mentions

/** The "@part" just before the caret in a group's composer: offer the members whose name starts so. */
function updateMentions() {
  const textarea = $("composer").elements.content;
  const conv = openId && convs.get(openId);
  if (!conv || !conv.isGroup || !conv.members || textarea.selectionStart !== textarea.selectionEnd) { closeMentions(); return; }
  const caret = textarea.selectionStart;
  const match = /(^|\s)@([\p{L}\p{N}_.-]*)$/u.exec(textarea.value.slice(0, caret));
  if (!match) { closeMentions(); return; }
  const part = match[2].toLowerCase();
  const items = conv.members.filter((m) => m.user_id !== session.userId && m.username.toLowerCase().startsWith(part))
    .sort((a, b) => a.username.localeCompare(b.username)).slice(0, MENTIONS_SHOWN);
  if (!items.length) { closeMentions(); return; }
  const previous = mention && mention.items[mention.index];
  const index = Math.max(0, previous ? items.findIndex((m) => m.user_id === previous.user_id) : 0);
  mention = { start: caret - match[2].length - 1, end: caret, items, index };
  renderMentions();
}

function renderMentions() {
  const list = $("mention-list");
  if (!mention) { list.hidden = true; list.replaceChildren(); return; }
  list.replaceChildren(...mention.items.map((m, i) => el("li", {
    class: i === mention.index ? "mention-option active" : "mention-option", role: "option",
    "aria-selected": String(i === mention.index), dataset: { userId: m.user_id },
    onmousedown: (e) => { e.preventDefault(); chooseMention(i); }, // keep the composer's focus
  }, avatar(m.username), el("span", { class: "mention-name" }, m.username))));
  list.hidden = false;
}

function closeMentions() {
  mention = null;
  renderMentions();
}

function chooseMention(i) {
  if (!mention) return;
  const member = mention.items[i];
  const textarea = $("composer").elements.content;
  const text = textarea.value;
  const insert = `@${member.username} `;
  textarea.value = text.slice(0, mention.start) + insert + text.slice(mention.end).replace(/^ /, "");
  const caret = mention.start + insert.length;
  textarea.setSelectionRange(caret, caret);
  closeMentions();
  autosize(textarea);
  textarea.focus();
}

/** The ids of the group's members named "@username" in the text. */
function mentionsIn(conv, content) {
  if (!conv.isGroup || !conv.members) return [];
  const ids = [];
  for (const m of conv.members) {
    const pattern = new RegExp(`(^|[^\\p{L}\\p{N}_.-])@${escapeRegExp(m.username)}(?![\\p{L}\\p{N}_-]|\\.[\\p{L}\\p{N}_-])`, "u");
    if (pattern.test(content) && !ids.includes(m.user_id)) ids.push(m.user_id);
  }
  return ids;
}

// ---------------------------------------------------------------- pictures and files

const mediaUrls = new Map(); // "<media_id>" or "<media_id>/t" -> object URL (the token cannot go into <img src>)

function mediaUrl(mediaId, thumbnail) {
  const key = thumbnail ? `${mediaId}/t` : String(mediaId);
  if (!mediaUrls.has(key)) {
    const url = mediaObjectUrl(BASE, session.token, mediaId, { thumbnail });
    url.catch(() => mediaUrls.delete(key)); // try again next time
    mediaUrls.set(key, url);
  }
  return mediaUrls.get(key);
}

function mediaBody(msg) {
  const mediaId = msg.extra.media_id;
  if (msg.message_type === "image") {
    const img = el("img", { class: "media-thumb", alt: msg.content || "Photo", dataset: { mediaId } });
    mediaUrl(mediaId, true).then((url) => { img.src = url; }, () => { img.alt = "Photo (not available)"; });
    img.addEventListener("click", async () => {
      try {
        $("image-full").replaceChildren(el("img", { src: await mediaUrl(mediaId, false), alt: msg.content || "Photo" }));
        $("image-dialog").showModal();
      } catch (err) {
        showError($("sidebar-error"), `Could not open the picture: ${errorText(err)}`);
      }
    });
    return el("div", { class: "text media" }, img);
  }
  const link = el("a", { class: "file-link", href: "#", dataset: { mediaId } }, `📎 ${msg.content}`);
  link.addEventListener("click", async (event) => {
    event.preventDefault();
    try {
      const a = el("a", { href: await mediaUrl(mediaId, false), download: msg.content || "download" });
      document.body.append(a);
      a.click();
      a.remove();
    } catch (err) {
      showError($("sidebar-error"), `Could not download the file: ${errorText(err)}`);
    }
  });
  return el("div", { class: "text media" }, link);
}

async function sendFile(file) {
  if (!openId || !file) return;
  const conversationId = openId;
  const conv = convs.get(conversationId);
  const image = /^image\/(jpeg|png|webp|gif)$/.test(file.type);
  $("upload-state").hidden = false;
  $("upload-name").textContent = file.name;
  $("upload-error").textContent = "";
  $("upload-progress").value = 0;
  let media;
  try {
    media = await uploadMedia(BASE, session.token, file, {
      contentType: file.type || "application/octet-stream",
      onProgress: (sent, total) => { $("upload-progress").value = total ? sent / total : 0; },
    });
  } catch (err) {
    $("upload-error").textContent = `Upload failed: ${errorText(err)}`;
    return;
  }
  $("upload-state").hidden = true;
  const content = media.filename || (image ? "Photo" : "File");
  const target = conv.isGroup ? { groupId: conv.groupId } : { to: conv.peer.user_id };
  const messageType = image ? "image" : "file";
  let sent;
  try {
    sent = client.send({ ...target, content, messageType, extra: { media_id: media.media_id } });
  } catch (err) {
    showError($("sidebar-error"), err.message);
    return;
  }
  queueLocal(conversationId, conv, sent, { message_type: messageType, content, extra: { media_id: media.media_id } });
}

// ---------------------------------------------------------------- search

async function onSearch(event) {
  event.preventDefault();
  const q = $("search").elements.q.value.trim();
  if (!q) return;
  const list = $("search-results");
  $("search-panel").hidden = false;
  $("search-status").textContent = "Searching…";
  list.replaceChildren();
  let answer;
  try {
    answer = await searchMessages(BASE, session.token, q, { limit: 50 });
  } catch (err) {
    $("search-status").textContent = errorText(err);
    return;
  }
  $("search-status").textContent = answer.messages.length
    ? `${answer.messages.length}${answer.has_more ? "+" : ""} result${answer.messages.length === 1 ? "" : "s"}`
    : "Nothing found";
  for (const msg of answer.messages) {
    const conv = ensureConv(msg.conversation_id);
    const item = el("li", { class: "search-hit", dataset: { conversationId: msg.conversation_id, msgId: msg.msg_id } },
      el("div", { class: "conv-text" },
        el("div", { class: "conv-name" }, convTitle(conv)),
        el("div", { class: "conv-preview" }, preview(msg)),
        el("div", { class: "muted small" }, shortTime(msg.timestamp))));
    item.addEventListener("click", () => openAtMessage(msg));
    list.append(item);
  }
}

async function openAtMessage(msg) {
  await openConversation(msg.conversation_id);
  const v = view(msg.conversation_id);
  for (let page = 0; page < 20 && !v.messages.has(`m:${msg.msg_id}`) && v.hasMore; page++) {
    await loadHistory(msg.conversation_id, true); // older pages until the hit is loaded
  }
  const row = document.querySelector(`#message-list li.msg[data-msg-id="${msg.msg_id}"]`);
  if (!row) return;
  row.scrollIntoView({ block: "center" });
  row.classList.add("found");
  setTimeout(() => row.classList.remove("found"), 4000);
}

let localSeq = 0;

function onSend(event) {
  event.preventDefault();
  const textarea = $("composer").elements.content;
  const content = textarea.value;
  if (!content.trim() || !openId) return;
  const conv = convs.get(openId);
  const target = conv.isGroup ? { groupId: conv.groupId } : { to: conv.peer.user_id };
  const replyTo = replyingTo && replyingTo.conversationId === openId ? replyingTo.msgId : null;
  const mentions = mentionsIn(conv, content);
  let sent;
  try {
    sent = client.send({ ...target, content, replyTo, mentions });
  } catch (err) {
    showError($("sidebar-error"), err.message);
    return;
  }
  textarea.value = "";
  autosize(textarea);
  stopTyping();
  closeMentions();
  cancelReply();
  queueLocal(openId, conv, sent, { message_type: "text", content, extra: {}, reply_to: replyTo, mentions });
}

/** Our own message, shown as "sending" until its ack. */
function queueLocal(conversationId, conv, sent, fields) {
  const v = view(conversationId);
  const msg = { client_msg_id: sent.clientMsgId, conversation_id: conversationId, from: session.userId,
                to: conv.isGroup ? null : conv.peer.user_id, group_id: conv.isGroup ? conv.groupId : null,
                reply_to: null, mentions: [], edited_at: null, reactions: {},
                ...fields, timestamp: Date.now(), status: 0, state: "sending", localSeq: ++localSeq };
  v.messages.set(`c:${sent.clientMsgId}`, msg);
  Object.assign(conv, { lastMessage: preview(msg), lastFrom: conv.isGroup ? session.userId : null, lastTime: msg.timestamp });
  if (conversationId === openId) renderMessages();
  renderList();
}

function findPending(clientMsgId) {
  for (const [conversationId, v] of views) {
    const msg = v.messages.get(`c:${clientMsgId}`);
    if (msg) return { conversationId, v, msg };
  }
  return null;
}

function onAck(ack) {
  const found = findPending(ack.client_msg_id);
  if (!found) return;
  const { v, msg, conversationId } = found;
  v.messages.delete(`c:${ack.client_msg_id}`);
  Object.assign(msg, { msg_id: ack.msg_id, timestamp: ack.timestamp, state: "sent" });
  if (!v.messages.has(`m:${ack.msg_id}`)) v.messages.set(`m:${ack.msg_id}`, msg);
  const conv = ensureConv(ack.conversation_id || conversationId);
  if (!conv.lastMsgId || compareIds(ack.msg_id, conv.lastMsgId) > 0) Object.assign(conv, { lastMsgId: ack.msg_id, lastTime: ack.timestamp });
  if (conversationId === openId) renderMessages({ keepScroll: true });
  renderList();
}

function onClientError(error) {
  if (error.client_msg_id && !error.retrying) {
    const found = findPending(error.client_msg_id);
    if (found) {
      Object.assign(found.msg, { state: "failed", error: error.message || error.code });
      if (found.conversationId === openId) renderMessages({ keepScroll: true });
      // Refused in a group: most likely we were removed (no frame says so). The list knows.
      if (found.conversationId.startsWith("g_") && (error.code === "forbidden" || error.code === "not_found")) {
        scheduleListRefresh(0, { withGroups: true });
      }
    }
  }
}

function onMessage(msg) {
  const known = convs.has(msg.conversation_id);
  const conv = ensureConv(msg.conversation_id);
  if (!conv.isGroup && !conv.peer) {
    const peer = peerOf(msg);
    conv.peer = { user_id: peer, username: usernames.get(peer) || null };
    if (!conv.peer.username) scheduleListRefresh(0);
  }
  // A conversation we did not know (a group we were added to), or a live message in a group we
  // had left (added again): the list has its name and our membership.
  if (!known || (hasLeft(conv) && msg.source === "live")) scheduleListRefresh(0, { withGroups: true });
  // The author's name for the preview and the label (the list's own previews name the author already).
  if (conv.isGroup && !usernames.has(msg.from) && (msg.source === "live" || conv.id === openId)) {
    loadMemberNames(conv, { throttle: true });
  }
  if (!conv.isGroup && msg.source === "live" && msg.from !== session.userId && !conv.presenceHidden) {
    conv.presence = { user_id: msg.from, online: true, last_seen: Date.now() }; // they just wrote
    if (conv.id === openId) renderHeader();
  }
  if (msg.from !== session.userId) typingEnded(conv.id, msg.from); // their message ends "… is typing"
  const previousLast = conv.lastMsgId;
  if (!conv.lastMsgId || compareIds(msg.msg_id, conv.lastMsgId) >= 0) {
    Object.assign(conv, { lastMsgId: msg.msg_id, lastTime: msg.timestamp, lastMessage: preview(msg),
                          lastFrom: conv.isGroup && msg.status !== 2 ? msg.from : null });
  }
  const incoming = msg.from !== session.userId && msg.status === 0;
  // Live, or caught up by sync and newer than what the conversation list showed: unread here.
  // (Older sync entries are already in the list's counts; a new device syncs its whole history.)
  const fresh = msg.source === "live" || (listLoaded && previousLast && compareIds(msg.msg_id, previousLast) > 0);
  if (incoming && fresh && !isOpenAndVisible(conv.id)) {
    if (!conv.liveUnread.has(msg.msg_id)) {
      conv.liveUnread.add(msg.msg_id);
      conv.unread += 1;
    }
  }
  const v = views.get(conv.id);
  if (v || conv.id === openId) {
    addMessage(conv.id, msg);
    if (conv.id === openId) {
      renderMessages({ keepScroll: false });
      maybeSendRead();
    }
  }
  renderList();
}

function onStatus({ msg_id: msgId, conversation_id: conversationId, status }) {
  const v = views.get(conversationId);
  const msg = v && v.messages.get(`m:${msgId}`);
  if (msg && status > (msg.status || 0)) {
    msg.status = status;
    if (conversationId === openId) renderMessages({ keepScroll: true });
  }
}

function onRecalled({ msg_id: msgId, conversation_id: conversationId }) {
  const conv = convs.get(conversationId);
  if (conv) {
    if (conv.liveUnread.delete(msgId) && conv.unread > 0) conv.unread -= 1;
    if (conv.lastMsgId === msgId) Object.assign(conv, { lastMessage: "[message recalled]", lastFrom: null });
  }
  const v = views.get(conversationId);
  const msg = v && v.messages.get(`m:${msgId}`);
  if (msg) Object.assign(msg, { status: 2, content: "", extra: {} });
  if (conversationId === openId) renderMessages({ keepScroll: true });
  renderList();
}

function onReceipt({ conversation_id: conversationId, reader, msg_id: upTo, kind }) {
  if (reader === session.userId) return;
  const v = view(conversationId);
  if (kind === "delivered") { // reached one of the reader's devices (a read implies it as well)
    if (conversationId.startsWith("g_")) return; // per member: GET …/messages/{msg_id}/receipts
    if (!v.deliveredUpTo || compareIds(upTo, v.deliveredUpTo) > 0) v.deliveredUpTo = upTo;
    if (conversationId === openId) renderMessages({ keepScroll: true });
    return;
  }
  if (conversationId.startsWith("g_")) { // one member has read our messages up to upTo
    const before = v.readers.get(reader);
    if (!before || compareIds(upTo, before) > 0) v.readers.set(reader, upTo);
    const conv = convs.get(conversationId);
    if (conv && !usernames.has(reader)) loadMemberNames(conv, { throttle: true });
    if (conversationId === openId) renderMessages({ keepScroll: true });
    return;
  }
  if (!v.receiptUpTo || compareIds(upTo, v.receiptUpTo) > 0) v.receiptUpTo = upTo;
  for (const msg of v.messages.values()) {
    if (msg.from === session.userId && msg.msg_id && msg.status === 0 && compareIds(msg.msg_id, upTo) <= 0) msg.status = 1;
  }
  if (conversationId === openId) renderMessages({ keepScroll: true });
}

function onReadOk({ conversation_id: conversationId, msg_id: upTo }) {
  const conv = convs.get(conversationId);
  if (!conv) return;
  for (const id of [...conv.liveUnread]) if (compareIds(id, upTo) <= 0) conv.liveUnread.delete(id);
  if (conv.id !== openId) {
    conv.unread = conv.liveUnread.size;
    conv.readAt = Date.now();
    scheduleListRefresh(); // read on another device: the server has the exact count
  }
  renderList();
}

/** Tell the server what the user has seen: the open conversation, while the page is visible. */
function maybeSendRead() {
  if (!openId || document.visibilityState !== "visible" || !client) return;
  const v = views.get(openId);
  const conv = convs.get(openId);
  if (!v || !conv) return;
  let newest = null;
  for (const msg of v.messages.values()) {
    if (msg.msg_id && (!newest || compareIds(msg.msg_id, newest) > 0)) newest = msg.msg_id;
  }
  if (!newest) return;
  if (!v.needsRead) return; // nothing new from the other side since the last read
  v.needsRead = false;
  v.readSent = newest;
  for (const msg of v.messages.values()) if (msg.from !== session.userId && msg.status === 0) msg.status = 1;
  conv.unread = 0;
  conv.liveUnread.clear();
  conv.readAt = Date.now();
  client.read(openId, newest);
  renderList();
}

async function recallMessage(msg) {
  msg.recallError = null;
  try {
    await client.recall(msg.msg_id);
  } catch (err) {
    msg.recallError = err.code === "recall_expired" ? "Too late to recall (2 minutes)." : `Recall failed: ${err.message}`;
    if (msg.conversation_id === openId) renderMessages({ keepScroll: true });
  }
}

/** Re-render the open conversation when one of its Recall or Edit buttons has just run out. */
function hideExpiredRecalls() {
  const v = openId && views.get(openId);
  if (!v) return;
  const now = Date.now();
  for (const msg of v.messages.values()) {
    const age = now - msg.timestamp;
    const ranOut = (windowMs) => windowMs > 0 && age >= windowMs && age < windowMs + 6000;
    if (msg.from === session.userId && msg.msg_id && msg.status !== 2 && (ranOut(RECALL_WINDOW_MS) || ranOut(EDIT_WINDOW_MS))) {
      renderMessages({ keepScroll: true });
      return;
    }
  }
}

function autosize(textarea) {
  textarea.style.height = "auto";
  textarea.style.height = `${Math.min(textarea.scrollHeight + 2, 160)}px`;
}

// ---------------------------------------------------------------- new chats and groups

async function lookupUser(username) {
  return api("GET", "/api/users", { query: { username } });
}

async function onNewChat(event) {
  event.preventDefault();
  const input = event.currentTarget.elements.username;
  const username = input.value.trim();
  showError($("sidebar-error"), "");
  if (!username) return;
  try {
    const user = await lookupUser(username);
    if (user.user_id === session.userId) {
      showError($("sidebar-error"), "That is you: pick someone else.");
      return;
    }
    usernames.set(user.user_id, user.username);
    const conversationId = privateConversationId(session.userId, user.user_id);
    const conv = ensureConv(conversationId, { isGroup: false, peer: { user_id: user.user_id, username: user.username } });
    if (!conv.lastTime) conv.lastTime = Date.now();
    input.value = "";
    openConversation(conversationId);
  } catch (err) {
    showError($("sidebar-error"), err instanceof ApiError && err.status === 404 ? `No user named “${username}”.` : errorText(err));
  }
}

function openGroupDialog() {
  const dialog = $("group-dialog");
  $("group-form").reset();
  showError($("group-error"), groupsAvailable ? "" : "Groups are not available on this server yet.");
  dialog.showModal();
}

async function onCreateGroup(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const name = form.elements.name.value.trim();
  const names = form.elements.members.value.split(",").map((s) => s.trim()).filter(Boolean);
  showError($("group-error"), "");
  if (!name) { showError($("group-error"), "Give the group a name."); return; }
  try {
    const members = [];
    for (const username of names) {
      try {
        const user = await lookupUser(username);
        usernames.set(user.user_id, user.username);
        if (user.user_id !== session.userId) members.push(user.user_id);
      } catch (err) {
        if (err instanceof ApiError && err.status === 404) throw new Error(`No user named “${username}”.`);
        throw err;
      }
    }
    const created = await api("POST", "/api/groups", { body: { name, members } });
    groups.set(created.group_id, { group_id: created.group_id, conversation_id: created.conversation_id, name,
                                   role: "owner", member_count: members.length + 1 });
    ensureConv(created.conversation_id, { isGroup: true, groupId: created.group_id, name, member: true, lastTime: Date.now() });
    $("group-dialog").close();
    openConversation(created.conversation_id);
  } catch (err) {
    if (missingApi(err)) groupsAvailable = false;
    showError($("group-error"), missingApi(err) ? "Groups are not available on this server yet." : errorText(err));
  }
}

async function openMembers() {
  const conv = convs.get(openId);
  if (!conv || !conv.isGroup) return;
  showError($("members-error"), "");
  $("members-title").textContent = `Members of ${convTitle(conv)}`;
  $("members-dialog").showModal();
  await renderMembers(conv);
}

/** Names (for labels, previews, readers) and join times (for receipts) of a group's current members. */
function noteMembers(conv, members) {
  conv.members = members.map((m) => ({ user_id: m.user_id, username: m.username })); // for @-mentions
  for (const m of members) {
    usernames.set(m.user_id, m.username);
    if (m.joined_at) conv.joinedAt.set(m.user_id, m.joined_at); // kept after they leave: still true
  }
}

/** Member names for a group's sender labels, previews and readers (`throttle`: not again within 10 s). */
async function loadMemberNames(conv, { throttle = false } = {}) {
  if (hasLeft(conv)) return; // only current members may list them
  if (throttle && Date.now() - conv.namesAt < 10000) return;
  conv.namesAt = Date.now();
  try {
    const answer = await api("GET", `/api/groups/${encodeURIComponent(conv.groupId)}/members`);
    noteMembers(conv, answer.members || []);
    const group = groups.get(conv.groupId);
    if (group) group.member_count = (answer.members || []).length;
    renderList();
    if (openId === conv.id) {
      renderHeader();
      renderMessages({ keepScroll: true });
      renderTyping();
      if (document.activeElement === $("composer").elements.content) updateMentions(); // an "@" typed meanwhile
    }
  } catch (err) {
    // names fall back to "User <id>"; a 403 means we are no longer a member: the list says so
    if (err instanceof ApiError && err.status === 403) scheduleListRefresh(0, { withGroups: true });
  }
}

async function renderMembers(conv) {
  const list = $("member-list");
  let members = [];
  try {
    members = (await api("GET", `/api/groups/${encodeURIComponent(conv.groupId)}/members`)).members || [];
  } catch (err) {
    showError($("members-error"), errorText(err));
    if (err instanceof ApiError && err.status === 403) scheduleListRefresh(0, { withGroups: true });
  }
  const me = members.find((m) => m.user_id === session.userId);
  const canManage = me && (me.role === "owner" || me.role === "admin");
  $("add-member").hidden = !canManage;
  noteMembers(conv, members);
  const group = groups.get(conv.groupId);
  if (group) group.member_count = members.length;
  list.replaceChildren(...members.map((m) => el("li", {},
    avatar(m.username),
    el("span", { class: "grow" }, m.username, m.user_id === session.userId ? " (you)" : ""),
    el("span", { class: "role" }, m.role || "member"),
    // The owner removes anyone; an admin only plain members (the server's rule).
    canManage && m.user_id !== session.userId && (me.role === "owner" || m.role === "member")
      ? el("button", { type: "button", class: "ghost danger", onclick: () => removeMember(conv, m.user_id) }, "Remove")
      : null)));
  renderHeader();
}

async function onAddMember(event) {
  event.preventDefault();
  const conv = convs.get(openId);
  const input = event.currentTarget.elements.username;
  const username = input.value.trim();
  if (!conv || !username) return;
  showError($("members-error"), "");
  try {
    const user = await lookupUser(username);
    await api("POST", `/api/groups/${encodeURIComponent(conv.groupId)}/members`, { body: { user_ids: [user.user_id] } });
    input.value = "";
    await renderMembers(conv);
  } catch (err) {
    showError($("members-error"), err instanceof ApiError && err.status === 404 && err.message.startsWith("no user")
      ? `No user named “${username}”.` : errorText(err));
  }
}

async function removeMember(conv, userId) {
  try {
    await api("DELETE", `/api/groups/${encodeURIComponent(conv.groupId)}/members/${encodeURIComponent(userId)}`);
    await renderMembers(conv);
  } catch (err) {
    showError($("members-error"), errorText(err));
  }
}

async function leaveGroup() {
  const conv = convs.get(openId);
  if (!conv || !conv.isGroup) return;
  try {
    await api("DELETE", `/api/groups/${encodeURIComponent(conv.groupId)}/members/${encodeURIComponent(session.userId)}`);
    $("members-dialog").close();
    // The group stays in the list (and its history readable), shown as left.
    groups.delete(conv.groupId);
    conv.member = false;
    renderHeader();
    renderList();
    scheduleListRefresh(0);
  } catch (err) {
    showError($("members-error"), errorText(err));
  }
}

// ---------------------------------------------------------------- wiring

function init() {
  $("tab-login").addEventListener("click", () => setAuthMode("login"));
  $("tab-register").addEventListener("click", () => setAuthMode("register"));
  $("auth-form").addEventListener("submit", onAuthSubmit);
  $("logout").addEventListener("click", () => logout());
  $("new-chat").addEventListener("submit", onNewChat);
  $("new-group").addEventListener("click", openGroupDialog);
  $("enable-push").addEventListener("click", enablePush);
  $("group-form").addEventListener("submit", onCreateGroup);
  $("members").addEventListener("click", openMembers);
  $("add-member").addEventListener("submit", onAddMember);
  $("leave-group").addEventListener("click", leaveGroup);
  for (const button of document.querySelectorAll("dialog [data-close]")) {
    button.addEventListener("click", () => button.closest("dialog").close());
  }
  $("composer").addEventListener("submit", onSend);
  $("attach").addEventListener("click", () => $("attach-input").click());
  $("attach-input").addEventListener("change", () => {
    const input = $("attach-input");
    if (input.files[0]) sendFile(input.files[0]);
    input.value = "";
  });
  const pane = $("conversation");
  pane.addEventListener("dragover", (e) => { if (openId) { e.preventDefault(); pane.classList.add("dropping"); } });
  pane.addEventListener("dragleave", () => pane.classList.remove("dropping"));
  pane.addEventListener("drop", (e) => {
    pane.classList.remove("dropping");
    if (!openId || !e.dataTransfer.files.length) return;
    e.preventDefault();
    sendFile(e.dataTransfer.files[0]);
  });
  $("search").addEventListener("submit", onSearch);
  $("search-close").addEventListener("click", () => { $("search-panel").hidden = true; });
  const textarea = $("composer").elements.content;
  textarea.addEventListener("input", () => { autosize(textarea); noteComposerInput(); updateMentions(); });
  textarea.addEventListener("click", updateMentions);
  textarea.addEventListener("blur", () => setTimeout(() => { if (document.activeElement !== textarea) closeMentions(); }, 100));
  $("reply-cancel").addEventListener("click", cancelReply);
  document.addEventListener("click", (e) => { // a click elsewhere closes the reaction picker
    if (pickerFor && !e.target.closest(".picker, .react-btn")) { pickerFor = null; renderMessages({ keepScroll: true }); }
  });
  textarea.addEventListener("keydown", (e) => {
    if (mention && !e.isComposing) { // the autocomplete has the keys it needs
      if (e.key === "ArrowDown" || e.key === "ArrowUp") {
        e.preventDefault();
        mention.index = (mention.index + (e.key === "ArrowDown" ? 1 : mention.items.length - 1)) % mention.items.length;
        renderMentions();
        return;
      }
      if (e.key === "Enter" || e.key === "Tab") { e.preventDefault(); chooseMention(mention.index); return; }
      if (e.key === "Escape") { e.preventDefault(); closeMentions(); return; }
    }
    if (e.key === "Escape" && replyingTo) { cancelReply(); return; }
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("load-older").addEventListener("click", () => openId && loadHistory(openId, true));
  $("back").addEventListener("click", () => {
    stopTyping();
    openId = null;
    closeConversationView();
    renderList();
  });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") maybeSendRead();
  });
  session = loadSession();
  setAuthMode("login");
  if (session) startApp();
  else showAuth();
}

init();
