"""app/static/netherlink.js on its own, in Chromium: against a scripted fake socket (exact frames,
close codes, timing) and against the real gateways."""
import pytest

# The harness each case runs in: the module, a scripted WebSocket and small helpers.
HARNESS = """
async ({ base, script }) => {
  const nl = await import(base + "/static/netherlink.js");
  const sockets = [];
  class FakeSocket {
    constructor(url) {
      this.url = url; this.sent = []; this.readyState = 0; sockets.push(this);
      setTimeout(() => { this.readyState = 1; }, 0);
    }
    send(data) { this.sent.push(JSON.parse(data)); }
    close(code) { this.readyState = 3; this.closedByClient = code || true; }
    serverSend(frame) { this.onmessage && this.onmessage({ data: JSON.stringify(frame) }); }
    hello(user = "42") {
      this.readyState = 1;
      this.serverSend({ type: "hello", user_id: user, conn_id: "gw-x", gateway_id: "gw", heartbeat_interval: 30 });
    }
    serverClose(code, reason = "") { this.readyState = 3; this.onclose && this.onclose({ code, reason }); }
    frames(type) { return this.sent.filter((f) => f.type === type); }
  }
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  async function until(cond, what, ms = 5000) {
    const end = Date.now() + ms;
    while (!cond()) { if (Date.now() > end) throw new Error("timed out waiting for " + what); await sleep(5); }
  }
  const memory = new Map();
  const storage = { getItem: (k) => memory.has(k) ? memory.get(k) : null, setItem: (k, v) => memory.set(k, String(v)) };
  const token = (exp) => "x." + btoa(JSON.stringify({ sub: "42", exp })).replace(/=+$/, "") + ".y";
  const make = (opts = {}) => {
    const client = new nl.NetherLinkClient({ baseUrl: base, token: token(Math.floor(Date.now() / 1000) + 3600),
                                             storage, WebSocket: FakeSocket, ...opts });
    const events = [];
    for (const t of ["message", "ack", "error", "receipt", "recalled", "read_ok", "state", "unauthorized", "synced", "status"]) {
      client.on(t, (d) => events.push([t, d]));
    }
    return { client, events };
  };
  const env = { nl, sockets, sleep, until, storage, memory, make, token, base };
  return await (new Function("env", "return (async () => {" + script + "})()"))(env);
}
"""


@pytest.fixture(scope="module")
def module_page(cluster, browser):
    context = browser.new_context()
    page = context.new_page()
    page.goto(cluster.gw1.http + "/healthz")  # any page of the origin; the module is imported from /static
    yield page
    context.close()


def run(page, base, script):
    return page.evaluate(HARNESS, {"base": base, "script": script})


def test_connects_with_the_token_in_the_query_and_keeps_ids_as_strings(cluster, module_page):
    result = run(module_page, cluster.gw1.http, """
      const { make, sockets, until } = env;
      const { client, events } = make();
      client.connect();
      await until(() => sockets.length === 1, "a socket");
      const ws = sockets[0];
      ws.hello();
      await until(() => ws.frames("sync").length === 1, "the first sync");
      const { clientMsgId, promise } = client.send({ to: "9007199254740993", content: "hi" });
      const frame = ws.frames("send")[0];
      ws.serverSend({ type: "ack", client_msg_id: clientMsgId, msg_id: "384652797095489537", conversation_id: "p_42_9007199254740993", timestamp: 1 });
      const ack = await promise;
      ws.serverSend({ type: "message", msg_id: "9223372036854775807", client_msg_id: "c", conversation_id: "p_42_9007199254740993",
                      from: "9007199254740993", to: "42", group_id: null, message_type: "text", content: "yo", extra: {}, timestamp: 2, status: 0 });
      const message = events.find(([t]) => t === "message")[1];
      return { url: ws.url, sync: ws.frames("sync")[0], frame, ack, message, state: client.state,
               cmidOk: /^[\\x21-\\x7e]{1,64}$/.test(clientMsgId) };
    """)
    assert result["url"].startswith("ws://127.0.0.1:") and "/ws?token=x." in result["url"]
    assert result["sync"] == {"type": "sync", "cursor": None, "limit": 100}
    assert result["frame"]["to"] == "9007199254740993" and result["frame"]["message_type"] == "text"
    assert result["ack"]["msg_id"] == "384652797095489537"
    assert result["message"]["msg_id"] == "9223372036854775807" and result["message"]["from"] == "9007199254740993"
    assert result["message"]["source"] == "live"
    assert result["state"] == "open" and result["cmidOk"]


def test_an_unacknowledged_send_is_resent_with_the_same_client_msg_id(cluster, module_page):
    result = run(module_page, cluster.gw1.http, """
      const { make, sockets, until } = env;
      const { client, events } = make({ ackTimeout: 100, backoffBase: 10 });
      client.connect();
      await until(() => sockets.length === 1, "a socket");
      sockets[0].hello();
      const sent = client.send({ to: "7", content: "are you there?" });
      await until(() => sockets[0].frames("send").length >= 2, "a re-send after the ack timeout");
      // The socket drops before the ack: the next connection sends it again, same id.
      sockets[0].serverClose(1006);
      await until(() => sockets.length === 2, "a reconnect");
      const before = sockets[1].frames("send").length;
      sockets[1].hello();
      await until(() => sockets[1].frames("send").length === 1, "the re-send after hello");
      // A retryable error is retried; the ack settles it once, a late second ack changes nothing.
      sockets[1].serverSend({ type: "error", code: "internal", message: "retry", client_msg_id: sent.clientMsgId });
      await until(() => sockets[1].frames("send").length === 2, "a re-send after 'internal'");
      const ack = { type: "ack", client_msg_id: sent.clientMsgId, msg_id: "100", conversation_id: "p_7_42", timestamp: 5 };
      sockets[1].serverSend(ack);
      sockets[1].serverSend(ack);
      await sent.promise;
      const bad = client.send({ to: "7", content: "x" });
      sockets[1].serverSend({ type: "error", code: "not_found", message: "user 7 does not exist", client_msg_id: bad.clientMsgId });
      const refused = await bad.promise.then(() => null, (e) => e.code);
      const ids = sockets.flatMap((s) => s.frames("send")).filter((f) => f.content === "are you there?").map((f) => f.client_msg_id);
      return { before, ids, cmid: sent.clientMsgId, acks: events.filter(([t]) => t === "ack").length, refused,
               pending: client.pendingSends };
    """)
    assert result["before"] == 0  # nothing is sent before hello
    assert len(result["ids"]) >= 4 and set(result["ids"]) == {result["cmid"]}
    assert result["acks"] == 1 and result["refused"] == "not_found" and result["pending"] == []


def test_close_codes_decide_how_to_reconnect(cluster, make_user, module_page):
    real_token = make_user().token  # a failed connect is checked against REST: this one is valid there
    result = run(module_page, cluster.gw1.http, """
      const { make, sockets, until, sleep } = env;
      // 1012 and 4503: at once, although the backoff would be seconds.
      const { client } = make({ backoffBase: 10000 });
      client.connect();
      await until(() => sockets.length === 1, "a socket");
      sockets[0].hello();
      let t0 = Date.now();
      sockets[0].serverClose(1012, "gateway restarting: reconnect");
      await until(() => sockets.length === 2, "a reconnect after 1012", 1000);
      const after1012 = Date.now() - t0;
      sockets[1].hello();
      t0 = Date.now();
      sockets[1].serverClose(4503);
      await until(() => sockets.length === 3, "a reconnect after 4503", 1000);
      const after4503 = Date.now() - t0;
      sockets[2].hello();
      await until(() => sockets[2].frames("sync").length === 1, "a sync after the reconnect");
      client.close();

      // 4401: an 'unauthorized' event and no reconnect.
      const second = make({ backoffBase: 5 });
      second.client.connect();
      await until(() => sockets.length === 4, "a socket");
      sockets[3].hello();
      sockets[3].serverClose(4401, "token expired: log in again and reconnect");
      await sleep(200);
      const unauthorized = second.events.filter(([t]) => t === "unauthorized").length;

      // An expired token refused before the upgrade (a browser sees 1006): also 'unauthorized'.
      const third = make({ backoffBase: 5, token: env.token(Math.floor(Date.now() / 1000) - 10) });
      third.client.connect();
      await until(() => sockets.length === 5, "a socket");
      sockets[4].serverClose(1006);
      await until(() => third.events.some(([t]) => t === "unauthorized"), "unauthorized for an expired token");

      // Any other drop: exponential backoff with jitter.
      const fourth = make({ backoffBase: 200, backoffMax: 1000, token: "REAL_TOKEN" });
      const states = fourth.events;
      fourth.client.connect();
      await until(() => sockets.length === 6, "a socket");
      sockets[5].hello();
      sockets[5].serverClose(1006);
      await until(() => sockets.length === 7, "reconnect 1");
      sockets[6].serverClose(1006);  // never got hello
      await until(() => sockets.length === 8, "reconnect 2");
      fourth.client.close();

      // A token the server refuses before the upgrade, though not expired: after a second failed
      // attempt a REST call gets 401 for it, and the client stops with 'unauthorized'.
      const fifth = make({ backoffBase: 5 });
      fifth.client.connect();
      await until(() => sockets.length === 9, "a socket");
      sockets[8].serverClose(1006);
      await until(() => sockets.length === 10, "a second attempt");
      sockets[9].serverClose(1006);
      await until(() => fifth.events.some(([t]) => t === "unauthorized"), "unauthorized after the REST check");
      const delays = states.filter(([t, d]) => t === "state" && d.retryIn !== undefined && d.reconnecting).map(([, d]) => d.retryIn);
      return { after1012, after4503, unauthorized, socketsAfter4401: sockets.length, delays,
               secondState: second.client.state };
    """.replace("REAL_TOKEN", real_token))
    assert result["after1012"] < 700 and result["after4503"] < 700
    assert result["unauthorized"] == 1 and result["secondState"] == "closed"
    first, second = result["delays"][:2]
    assert 100 <= first <= 200 and 200 <= second <= 400, result["delays"]  # base·2^n, halved by jitter at most


def test_sync_pages_until_done_stores_the_cursor_per_user_and_dedupes(cluster, module_page):
    result = run(module_page, cluster.gw1.http, """
      const { make, sockets, until, memory } = env;
      const { client, events } = make();
      const m = (id, status = 0, content = "c" + id) => ({ type: "message", msg_id: id, client_msg_id: "k" + id,
        conversation_id: "p_7_42", from: "7", to: "42", group_id: null, message_type: "text", content, extra: {}, timestamp: 1, status });
      client.connect();
      await until(() => sockets.length === 1, "a socket");
      const ws = sockets[0];
      ws.hello();
      await until(() => ws.frames("sync").length === 1, "sync 1");
      ws.serverSend(m("11"));                        // live first
      ws.serverSend({ type: "recalled", msg_id: "15", conversation_id: "p_7_42" });  // a recall before its message
      ws.serverSend({ type: "sync_batch", messages: [m("10"), m("11")], cursor: "2", has_more: true });
      await until(() => ws.frames("sync").length === 2, "sync 2");
      const storedAfterPage1 = memory.get("netherlink:cursor:42");
      ws.serverSend({ type: "sync_batch", messages: [m("12", 1), m("11", 2), m("15", 0, "secret")], cursor: "5", has_more: false });
      await until(() => events.some(([t]) => t === "synced"), "synced");
      // A reconnect syncs from the stored cursor.
      ws.serverClose(1012);
      await until(() => sockets.length === 2, "a reconnect");
      sockets[1].hello();
      await until(() => sockets[1].frames("sync").length === 1, "the resumed sync");
      return {
        syncs: ws.frames("sync").map((f) => f.cursor), resumed: sockets[1].frames("sync")[0].cursor, storedAfterPage1,
        stored: memory.get("netherlink:cursor:42"),
        messages: events.filter(([t]) => t === "message").map(([, d]) => [d.msg_id, d.source, d.status, d.content]),
        recalled: events.filter(([t]) => t === "recalled").map(([, d]) => d.msg_id),
      };
    """)
    assert result["syncs"] == [None, "2"] and result["resumed"] == "5"
    assert result["storedAfterPage1"] == "2" and result["stored"] == "5"
    assert result["messages"] == [["11", "live", 0, "c11"], ["10", "sync", 0, "c10"], ["12", "sync", 1, "c12"],
                                  ["15", "sync", 2, ""]]  # each once; a recalled one never shows its content
    assert result["recalled"] == ["15", "11"]


def test_read_and_recall_frames_and_their_answers(cluster, module_page):
    result = run(module_page, cluster.gw1.http, """
      const { make, sockets, until } = env;
      const { client, events } = make();
      client.connect();
      await until(() => sockets.length === 1, "a socket");
      const ws = sockets[0];
      ws.hello();
      client.read("p_7_42", "384652797095489536");
      const ok = client.recall("384652797095489599");
      const late = client.recall("384652797095489000");
      await until(() => ws.frames("recall").length === 2, "two recalls");
      ws.serverSend({ type: "read_ok", conversation_id: "p_7_42", msg_id: "384652797095489536" });
      ws.serverSend({ type: "recalled", msg_id: "384652797095489599", conversation_id: "p_7_42" });
      ws.serverSend({ type: "error", code: "recall_expired", message: "messages can be recalled for 2 minutes after sending" });
      ws.serverSend({ type: "receipt", conversation_id: "p_7_42", reader: "7", msg_id: "384652797095489536" });
      const recalled = await ok;
      const expired = await late.then(() => null, (e) => e.code);
      return { read: ws.frames("read")[0], recall: ws.frames("recall")[0], recalled, expired,
               types: events.map(([t]) => t).filter((t) => t !== "state") };
    """)
    assert result["read"] == {"type": "read", "conversation_id": "p_7_42", "msg_id": "384652797095489536"}
    assert result["recall"] == {"type": "recall", "msg_id": "384652797095489599"}
    assert result["recalled"]["msg_id"] == "384652797095489599" and result["expired"] == "recall_expired"
    assert result["types"] == ["read_ok", "recalled", "error", "receipt"]


def test_against_the_real_gateways_two_clients_talk(cluster, make_user, module_page):
    alice, bob = make_user(), make_user()
    result = run(module_page, cluster.gw1.http, f"""
      const {{ nl, until }} = env;
      const alice = new nl.NetherLinkClient({{ baseUrl: "{cluster.gw1.http}", token: "{alice.token}", storage: null }});
      const bob = new nl.NetherLinkClient({{ baseUrl: "{cluster.gw2.http}", token: "{bob.token}", storage: null }});
      const got = [], receipts = [];
      bob.on("message", (m) => got.push(m));
      alice.on("receipt", (r) => receipts.push(r));
      alice.connect(); bob.connect();
      await until(() => alice.state === "open" && bob.state === "open", "both open", 15000);
      const sent = alice.send({{ to: "{bob.user_id}", content: "über 👋 <b>x</b>" }});
      const ack = await sent.promise;
      await until(() => got.length === 1, "Bob's message", 15000);
      bob.read(got[0].conversation_id, got[0].msg_id);
      await until(() => receipts.length === 1, "Alice's receipt", 15000);
      const recalled = await alice.recall(ack.msg_id);
      alice.close(); bob.close();
      return {{ ack, got: got[0], receipt: receipts[0], recalled }};
    """)
    ack, got = result["ack"], result["got"]
    assert got["msg_id"] == ack["msg_id"] and got["content"] == "über 👋 <b>x</b>" and got["from"] == alice.user_id
    assert isinstance(ack["msg_id"], str) and ack["conversation_id"] == got["conversation_id"]
    assert result["receipt"]["reader"] == bob.user_id and result["receipt"]["msg_id"] == ack["msg_id"]
    assert result["recalled"]["msg_id"] == ack["msg_id"]


def test_with_tickets_the_token_stays_out_of_the_url_and_an_expired_token_is_refreshed_once(cluster, module_page):
    result = run(module_page, cluster.gw1.http, """
      const { make, sockets, until, token, nl } = env;
      const asked = [];
      let refreshes = 0, refuse = false;
      const fresh = token(Math.floor(Date.now() / 1000) + 7200);
      const { client, events } = make({
        ticket: async (t) => { asked.push(t); return "T" + asked.length; },
        refresh: async () => {
          refreshes += 1;
          if (refuse) throw new nl.ApiError(401, "unauthorized", "this session was ended: log in again");
          return fresh;
        },
      });
      client.connect();
      await until(() => sockets.length === 1, "a socket");
      sockets[0].hello();
      sockets[0].serverClose(4401, "token expired: log in again and reconnect");
      await until(() => sockets.length === 2, "a reconnect with a new ticket");
      sockets[1].hello();
      const afterRefresh = { state: client.state, token: client.token === fresh, refreshes };
      // The page renewed the token on its own meanwhile: the old socket's expiry just reconnects.
      client.token = token(Math.floor(Date.now() / 1000) + 7300);
      sockets[1].serverClose(4401, "token expired: log in again and reconnect");
      await until(() => sockets.length === 3, "a reconnect without a refresh");
      sockets[2].hello();
      const refreshesAfterRenewal = refreshes;
      refuse = true;
      sockets[2].serverClose(4401, "session ended: log in again");
      await until(() => events.some(([t]) => t === "unauthorized"), "unauthorized");
      return { urls: sockets.map((s) => s.url), asked: asked.length, secondTicketWithNewToken: asked[1] === fresh,
               afterRefresh, refreshesAfterRenewal, refreshes, sockets: sockets.length, state: client.state,
               message: events.find(([t]) => t === "unauthorized")[1].message };
    """)
    assert [u.split("/ws")[1] for u in result["urls"]] == ["?ticket=T1", "?ticket=T2", "?ticket=T3"]  # never ?token=
    assert result["secondTicketWithNewToken"] and result["afterRefresh"] == {"state": "open", "token": True,
                                                                            "refreshes": 1}
    assert result["refreshesAfterRenewal"] == 1
    assert result["refreshes"] == 2 and result["sockets"] == 3 and result["state"] == "closed"
    assert "session was ended" in result["message"]
