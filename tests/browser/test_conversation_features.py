"""Edit, typing, reactions, replies and mentions on the chat page (issue 18 item 8): two or three users
in their own browser contexts, on two gateways of the real test cluster (protocol.md §20-§23)."""
import re
import time
import uuid

import pytest
import requests
from playwright.sync_api import expect

from app.chat.conversations import private_conversation_id
from tests.browser.conftest import bubbles, conv_item, log_in, send, start_chat
from tests.browser.test_client_module import run
from tests.harness import Gateway

TYPING_SHOWN_S = 6  # TYPING_SHOWN_MS in app/static/chat.js: "… is typing" after the last start


def _named(make_user, prefix):
    return make_user(f"{prefix}{uuid.uuid4().hex[:10]}")


def _pair(cluster, make_user, open_page):
    """Alice on gateway 1 and Bob on gateway 2, each with their private chat open."""
    alice, bob = _named(make_user, "alice"), _named(make_user, "bob")
    alice_page, bob_page = open_page(cluster.gw1.http), open_page(cluster.gw2.http)
    log_in(alice_page, alice.username)
    log_in(bob_page, bob.username)
    start_chat(alice_page, bob.username)
    start_chat(bob_page, alice.username)
    return alice, bob, alice_page, bob_page


def _history(gateway, user, conversation_id):
    r = requests.get(f"{gateway.http}/api/conversations/{conversation_id}/messages",
                     headers={"Authorization": f"Bearer {user.token}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["messages"]


def _no_page_errors(*pages):
    for page in pages:
        assert page.errors.errors == [] and page.errors.dialogs == []


def test_an_edit_shows_on_the_other_side_and_after_a_reload(cluster, make_user, open_page, shot):
    alice, bob, alice_page, bob_page = _pair(cluster, make_user, open_page)
    send(alice_page, "See you at 7")
    expect(bubbles(bob_page, "See you at 7")).to_have_count(1)
    expect(bubbles(bob_page, "See you at 7").locator(".edit")).to_have_count(0)  # not his to edit

    mine = bubbles(alice_page, "See you at 7")
    expect(mine.locator(".msg-state")).to_have_text("Read")
    mine.locator(".edit").click()
    editor = alice_page.locator("#message-list .edit-input")
    expect(editor).to_have_value("See you at 7")
    editor.fill("See you at 8 <b>sharp</b>")
    editor.press("Enter")
    for page in (alice_page, bob_page):
        edited = bubbles(page, "See you at 8 <b>sharp</b>")
        expect(edited).to_have_count(1)
        expect(edited.locator(".edited")).to_have_text("edited")
        expect(bubbles(page, "See you at 7")).to_have_count(0)
    expect(alice_page.locator("#message-list .edit-input")).to_have_count(0)
    shot(bob_page, "edited")

    # Cancelling an edit changes nothing.
    bubbles(alice_page, "See you at 8 <b>sharp</b>").locator(".edit").click()
    alice_page.locator("#message-list .edit-input").fill("never sent")
    alice_page.locator("#message-list .cancel-edit").click()
    expect(bubbles(alice_page, "See you at 8 <b>sharp</b>")).to_have_count(1)

    # A reload shows the edited text and the label: from history and sync.
    cid = private_conversation_id(int(alice.user_id), int(bob.user_id))
    [stored] = _history(cluster.gw1, alice, cid)
    assert stored["content"] == "See you at 8 <b>sharp</b>" and stored["edited_at"]
    for page in (alice_page, bob_page):
        page.reload()
        expect(page.locator("#conn-state")).to_have_attribute("data-state", "open")
        conv_item(page, cid).click()
        edited = bubbles(page, "See you at 8 <b>sharp</b>")
        expect(edited).to_have_count(1)
        expect(edited.locator(".edited")).to_have_text("edited")
    assert bob_page.locator("#message-list b").count() == 0
    _no_page_errors(alice_page, bob_page)


def test_the_typing_indicator_comes_and_goes(cluster, make_user, open_page, shot):
    alice, bob, alice_page, bob_page = _pair(cluster, make_user, open_page)
    indicator = bob_page.locator("#typing")
    composer = alice_page.locator("#composer textarea")
    expect(indicator).to_be_hidden()

    # Typing shows it; with no more keystrokes it goes away by itself, TYPING_SHOWN_S after the start.
    composer.fill("Hel")
    expect(indicator).to_have_text(f"{alice.username} is typing…")
    shown_at = time.monotonic()
    shot(bob_page, "typing")
    expect(indicator).to_be_hidden(timeout=(TYPING_SHOWN_S + 6) * 1000)
    assert time.monotonic() - shown_at > TYPING_SHOWN_S - 2, "the indicator must last about 6 s"
    expect(alice_page.locator("#typing")).to_be_hidden()  # the typist's own page shows nothing

    # Typing again shows it; clearing the composer takes it away at once (a `stop`).
    composer.fill("Hello")
    expect(indicator).to_have_text(f"{alice.username} is typing…")
    composer.fill("")
    expect(indicator).to_be_hidden(timeout=(TYPING_SHOWN_S - 2) * 1000)

    # The server relays one `start` a second per user and conversation (protocol.md §20): let it pass.
    time.sleep(1.2)
    composer.fill("Hello Bob")
    expect(indicator).to_have_text(f"{alice.username} is typing…")
    composer.press("Enter")  # sending ends it
    expect(bubbles(bob_page, "Hello Bob")).to_have_count(1)
    expect(indicator).to_be_hidden(timeout=(TYPING_SHOWN_S - 2) * 1000)
    _no_page_errors(alice_page, bob_page)


def test_reactions_count_on_both_sides_and_toggle_off(cluster, make_user, open_page, shot):
    alice, bob, alice_page, bob_page = _pair(cluster, make_user, open_page)
    send(alice_page, "Launch is go")
    expect(bubbles(bob_page, "Launch is go")).to_have_count(1)

    def chip(page, emoji):
        return bubbles(page, "Launch is go").locator(f'.reaction-chip[data-emoji="{emoji}"]')

    # Bob picks 👍 from the picker: a count of 1 on both pages, marked as his on his.
    theirs = bubbles(bob_page, "Launch is go")
    theirs.locator(".react-btn").click()
    expect(bob_page.locator(".picker .pick")).to_have_count(6)
    bob_page.locator('.picker .pick[data-emoji="👍"]').click()
    expect(bob_page.locator(".picker")).to_have_count(0)
    for page in (alice_page, bob_page):
        expect(chip(page, "👍").locator(".count")).to_have_text("1")
    expect(chip(bob_page, "👍")).to_have_class("reaction-chip mine")
    expect(chip(alice_page, "👍")).to_have_class("reaction-chip")

    # Alice adds hers by clicking the count, and a ❤️ from the picker.
    chip(alice_page, "👍").click()
    for page in (alice_page, bob_page):
        expect(chip(page, "👍").locator(".count")).to_have_text("2")
    bubbles(alice_page, "Launch is go").locator(".react-btn").click()
    alice_page.locator('.picker .pick[data-emoji="❤️"]').click()
    for page in (alice_page, bob_page):
        expect(chip(page, "❤️").locator(".count")).to_have_text("1")
    shot(bob_page, "reactions")

    # Clicking your own again takes it back, on both sides.
    chip(bob_page, "👍").click()
    for page in (alice_page, bob_page):
        expect(chip(page, "👍").locator(".count")).to_have_text("1")
    expect(chip(bob_page, "👍")).to_have_class("reaction-chip")
    chip(alice_page, "👍").click()
    for page in (alice_page, bob_page):
        expect(chip(page, "👍")).to_have_count(0)
        expect(chip(page, "❤️").locator(".count")).to_have_text("1")

    # The server agrees, and a reload shows the same.
    cid = private_conversation_id(int(alice.user_id), int(bob.user_id))
    [stored] = _history(cluster.gw2, bob, cid)
    assert stored["reactions"] == {"❤️": [alice.user_id]}
    bob_page.reload()
    expect(bob_page.locator("#conn-state")).to_have_attribute("data-state", "open")
    conv_item(bob_page, cid).click()
    expect(chip(bob_page, "❤️").locator(".count")).to_have_text("1")
    expect(chip(bob_page, "👍")).to_have_count(0)
    _no_page_errors(alice_page, bob_page)


def test_a_reply_shows_its_quote_on_both_sides(cluster, make_user, open_page, shot):
    alice, bob, alice_page, bob_page = _pair(cluster, make_user, open_page)
    send(alice_page, "Lunch at noon?")
    send(alice_page, "Or later?")
    expect(bubbles(bob_page, "Or later?")).to_have_count(1)

    bubbles(bob_page, "Lunch at noon?").locator(".reply").click()
    expect(bob_page.locator("#reply-bar")).to_be_visible()
    expect(bob_page.locator("#reply-label")).to_have_text(f"Replying to {alice.username}")
    expect(bob_page.locator("#reply-preview")).to_have_text("Lunch at noon?")
    send(bob_page, "Noon works")
    expect(bob_page.locator("#reply-bar")).to_be_hidden()

    for page, author in ((bob_page, alice.username), (alice_page, "You")):
        quote = bubbles(page, "Noon works").locator(".quote")
        expect(quote.locator(".quote-author")).to_have_text(author)
        expect(quote.locator(".quote-text")).to_have_text("Lunch at noon?")
    expect(bubbles(alice_page, "Or later?").locator(".quote")).to_have_count(0)
    shot(alice_page, "reply")

    # A reply can be dropped before sending: the next message quotes nothing.
    bubbles(bob_page, "Or later?").locator(".reply").click()
    bob_page.locator("#reply-cancel").click()
    send(bob_page, "No quote here")
    expect(bubbles(alice_page, "No quote here")).to_have_count(1)
    expect(bubbles(alice_page, "No quote here").locator(".quote")).to_have_count(0)

    cid = private_conversation_id(int(alice.user_id), int(bob.user_id))
    by_text = {m["content"]: m for m in _history(cluster.gw1, alice, cid)}
    assert by_text["Noon works"]["reply_to"] == by_text["Lunch at noon?"]["msg_id"]
    assert by_text["No quote here"]["reply_to"] is None
    _no_page_errors(alice_page, bob_page)


def test_a_reply_to_a_message_not_loaded_says_so(cluster, make_user, connect, open_page):
    alice, bob = _named(make_user, "alice"), _named(make_user, "bob")
    a = connect(alice, cluster.gw1)
    first = a.send_message(bob.user_id, "the very first")
    assert first["type"] == "ack"
    for i in range(30):  # one history page (30) without the first
        assert a.send_message(bob.user_id, f"filler {i}")["type"] == "ack"
    page = open_page(cluster.gw2.http)
    page.evaluate("([key]) => localStorage.setItem(key, 'latest')", [f"netherlink:cursor:{bob.user_id}"])
    log_in(page, bob.username)
    cid = private_conversation_id(int(alice.user_id), int(bob.user_id))
    conv_item(page, cid).click()
    expect(bubbles(page, "filler 29")).to_have_count(1)
    assert a.send_message(bob.user_id, "about that first one", reply_to=first["msg_id"])["type"] == "ack"
    expect(bubbles(page, "about that first one").locator(".quote")).to_have_text("original message not loaded")
    page.locator("#load-older").click()  # the original arrives: the quote finds it
    expect(bubbles(page, "about that first one").locator(".quote-text")).to_have_text("the very first")


def test_a_mention_is_offered_inserted_and_highlighted_for_the_member(cluster, make_user, open_page, shot):
    alice, bob, carol = _named(make_user, "alice"), _named(make_user, "bob"), _named(make_user, "carol")
    r = requests.post(f"{cluster.gw1.http}/api/groups", json={"name": "Launch team", "members": [bob.user_id, carol.user_id]},
                      headers={"Authorization": f"Bearer {alice.token}"}, timeout=10)
    assert r.status_code == 201, r.text
    cid = r.json()["conversation_id"]
    pages = {}
    for user, gateway in ((alice, cluster.gw1), (bob, cluster.gw2), (carol, cluster.gw1)):
        pages[user.username] = page = open_page(gateway.http)
        log_in(page, user.username)
        conv_item(page, cid).click()
        expect(page.locator("#conv-title")).to_have_text("Launch team")
    alice_page, bob_page, carol_page = pages[alice.username], pages[bob.username], pages[carol.username]

    composer = alice_page.locator("#composer textarea")
    composer.press_sequentially("Ready? @bo")
    options = alice_page.locator("#mention-list .mention-option")
    expect(options).to_have_count(1)
    expect(options.locator(".mention-name")).to_have_text(bob.username)
    composer.press("Enter")  # picks the highlighted member; does not send
    expect(composer).to_have_value(f"Ready? @{bob.username} ")
    expect(alice_page.locator("#mention-list")).to_be_hidden()
    composer.press_sequentially("check the list, and @c")
    expect(options.locator(".mention-name")).to_have_text(carol.username)
    composer.press("Escape")  # closes the offer: what was typed stays
    expect(alice_page.locator("#mention-list")).to_be_hidden()
    composer.press_sequentially("arl")  # a plain "@carl" is no member's name
    text = f"Ready? @{bob.username} check the list, and @carl"
    expect(composer).to_have_value(text)
    composer.press("Enter")

    mentioned = bubbles(bob_page, text)
    expect(mentioned).to_have_class(re.compile(r"\bmentions-me\b"))
    expect(mentioned.locator(".mention.you")).to_have_text(f"@{bob.username}")
    other = bubbles(carol_page, text)
    expect(other).to_have_count(1)
    expect(other).not_to_have_class(re.compile(r"\bmentions-me\b"))
    expect(other.locator(".mention")).to_have_text(f"@{bob.username}")
    expect(bubbles(alice_page, text)).not_to_have_class(re.compile(r"\bmentions-me\b"))  # her own
    shot(bob_page, "mentioned")
    [stored] = [m for m in _history(cluster.gw1, alice, cid) if m["content"] == text]
    assert stored["mentions"] == [bob.user_id]

    # A message that does not name him is not highlighted on his page.
    send(carol_page, "no names here")
    expect(bubbles(bob_page, "no names here")).not_to_have_class(re.compile(r"\bmentions-me\b"))
    _no_page_errors(alice_page, bob_page, carol_page)


# -- the module alone, against the scripted socket of test_client_module.py ---------------------------

@pytest.fixture(scope="module")
def module_page(cluster, browser):
    context = browser.new_context()
    page = context.new_page()
    page.goto(cluster.gw1.http + "/healthz")
    yield page
    context.close()


def test_the_module_applies_edits_and_reactions_once_in_either_order(cluster, module_page):
    result = run(module_page, cluster.gw1.http, """
      const { make, sockets, until } = env;
      const { client, events } = make();
      for (const t of ["edited", "reaction", "typing"]) client.on(t, (d) => events.push([t, d]));
      client.connect();
      await until(() => sockets.length === 1, "a socket");
      const ws = sockets[0];
      ws.hello();
      const msg = (id, fields = {}) => ({ type: "message", msg_id: id, client_msg_id: "c" + id, conversation_id: "p_7_42",
        from: "7", to: "42", group_id: null, message_type: "text", content: "v1", extra: {}, timestamp: 1, status: 0,
        reply_to: null, mentions: [], edited_at: null, reactions: {}, ...fields });
      const edited = (id, content, at) => ({ type: "edited", msg_id: id, conversation_id: "p_7_42", content, edited_at: at });
      const reaction = (id, user, emoji, op) => ({ type: "reaction", msg_id: id, conversation_id: "p_7_42", user_id: user, emoji, op });
      ws.serverSend(msg("100"));
      // A later edit live, then the sync page with the earlier and the later edit: one event each, newest wins.
      ws.serverSend(edited("100", "v3", 30));
      ws.serverSend({ type: "sync_batch", cursor: "9", has_more: false, messages: [
        { ...msg("100"), content: "v3", edited_at: 30 }, edited("100", "v2", 20), edited("100", "v3", 30),
        reaction("100", "7", "👍", "add") ] });
      ws.serverSend(reaction("100", "7", "👍", "add"));     // the same reaction live: a duplicate
      ws.serverSend(reaction("100", "42", "👍", "add"));
      ws.serverSend(reaction("100", "7", "👍", "remove"));
      // An edit and a reaction seen before their message: its (older) copy shows both.
      ws.serverSend(edited("200", "new text", 50));
      ws.serverSend(reaction("200", "7", "🎉", "add"));
      ws.serverSend(msg("200", { content: "old text" }));
      ws.serverSend({ type: "typing", conversation_id: "p_7_42", user_id: "7", state: "start" });
      const of = (t) => events.filter(([type]) => type === t).map(([, d]) => d);
      return { edited: of("edited"), reactions: of("reaction"), messages: of("message"), typing: of("typing") };
    """)
    assert [(e["msg_id"], e["content"], e["source"]) for e in result["edited"]] == [
        ("100", "v3", "live"), ("200", "new text", "live")]
    assert [(r["user_id"], r["op"], r["source"]) for r in result["reactions"] if r["msg_id"] == "100"] == [
        ("7", "add", "sync"), ("42", "add", "live"), ("7", "remove", "live")]
    assert result["reactions"][2]["reactions"] == {"👍": ["42"]}
    late = next(m for m in result["messages"] if m["msg_id"] == "200")
    assert late["content"] == "new text" and late["edited_at"] == 50 and late["reactions"] == {"🎉": ["7"]}
    assert result["typing"] == [{"type": "typing", "conversation_id": "p_7_42", "user_id": "7", "state": "start",
                                 "source": "live"}]


def test_the_module_matches_edit_and_react_answers_and_errors_by_client_msg_id(cluster, module_page):
    result = run(module_page, cluster.gw1.http, """
      const { make, sockets, until } = env;
      const { client, events } = make();
      client.connect();
      await until(() => sockets.length === 1, "a socket");
      const ws = sockets[0];
      ws.hello();
      const sent = client.send({ groupId: "5", content: "@bob look", replyTo: "90", mentions: ["2"] });
      const typed = client.typing("g_5", "start");
      client.read("p_7_42", "100");
      const edit = client.edit("100", "fixed").then((f) => ["ok", f.content], (e) => ["err", e.code]);
      const like = client.react("100", "👍", "add").then((f) => ["ok", f.op], (e) => ["err", e.code]);
      const late = client.edit("101", "too late").then((f) => ["ok", f], (e) => ["err", e.code]);
      const typingFrame = ws.frames("typing")[0];
      // The typing frame is refused (its error names its client_msg_id): no request loses its answer.
      ws.serverSend({ type: "error", code: "forbidden", message: "you are not a member of conversation 'g_5'",
                      client_msg_id: typingFrame.client_msg_id });
      ws.serverSend({ type: "read_ok", conversation_id: "p_7_42", msg_id: "100" });
      ws.serverSend({ type: "edited", msg_id: "100", conversation_id: "p_7_42", content: "fixed", edited_at: 9 });
      ws.serverSend({ type: "reaction", msg_id: "100", conversation_id: "p_7_42", user_id: "42", emoji: "👍", op: "add" });
      // Edits and reactions are answered beside the other requests: an error names the frame's client_msg_id.
      const lateFrame = ws.frames("edit")[1];
      ws.serverSend({ type: "error", code: "edit_expired", message: "messages can be edited for 900 s after sending",
                      client_msg_id: lateFrame.client_msg_id });
      const errors = events.filter(([t]) => t === "error").map(([, d]) => [d.code, d.request && d.request.type]);
      return { send: ws.frames("send")[0], typingFrame, lateFrame, typed, edit: await edit, like: await like, late: await late,
               frames: ws.sent.map((f) => f.type), errors };
    """)
    assert result["send"]["reply_to"] == "90" and result["send"]["mentions"] == ["2"]
    assert result["typed"] is True and result["typingFrame"]["state"] == "start"
    assert result["typingFrame"]["conversation_id"] == "g_5" and result["typingFrame"]["client_msg_id"]
    assert result["edit"] == ["ok", "fixed"] and result["like"] == ["ok", "add"]
    assert result["late"] == ["err", "edit_expired"]
    assert result["errors"] == [["forbidden", "typing"], ["edit_expired", "edit"]]
    assert result["frames"][-3:] == ["edit", "react", "edit"]
    assert result["lateFrame"]["client_msg_id"] and result["lateFrame"]["msg_id"] == "101"


def test_edit_is_offered_only_within_the_servers_edit_window(services, log_dir, cluster, make_user, open_page):
    gateway = Gateway("gw-page-edit-window", services, log_dir, MESSAGE_EDIT_WINDOW_SECONDS="4")
    try:
        alice, bob = _named(make_user, "alice"), _named(make_user, "bob")
        page = open_page(gateway.http)
        assert page.locator("body").get_attribute("data-edit-window") == "4"
        log_in(page, alice.username)
        start_chat(page, bob.username)
        send(page, "quick one")
        mine = bubbles(page, "quick one")
        expect(mine.locator(".msg-state")).to_have_text("Sent")
        expect(mine.locator(".edit")).to_have_count(1)
        # The window passes: the button goes (the page looks every 5 s), Recall (2 minutes) stays.
        expect(mine.locator(".edit")).to_have_count(0, timeout=15_000)
        expect(mine.locator(".recall")).to_have_count(1)
        assert page.errors.errors == []
    finally:
        gateway.stop()
