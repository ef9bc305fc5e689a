"""The chat page at / in a real browser: two users in two browser contexts, against the real cluster."""
import re
import uuid

import requests
from playwright.sync_api import expect

from app.chat.conversations import private_conversation_id
from tests.browser.conftest import bubbles, conv_item, log_in, send, start_chat
from tests.harness import wait_until
from tests.test_sync import sync_all


def _unread_total(gateway, user) -> int:
    r = requests.get(f"{gateway.http}/api/unread", headers={"Authorization": f"Bearer {user.token}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["total"]


def test_two_users_chat_live_with_unread_badges_presence_and_read_receipts(cluster, make_user, open_page, shot):
    bob = make_user()
    bob_page = open_page(cluster.gw2.http)
    log_in(bob_page, bob.username)

    # Alice makes her account on the page itself.
    alice_name = f"alice{uuid.uuid4().hex[:8]}"
    alice_page = open_page(cluster.gw1.http)
    alice_page.locator("#tab-register").click()
    alice_page.locator("#auth-form input[name=username]").fill(alice_name)
    alice_page.locator("#auth-form input[name=password]").fill("correct-horse")
    alice_page.locator("#auth-submit").click()
    expect(alice_page.locator("#me-name")).to_have_text(alice_name)
    expect(alice_page.locator("#conn-state")).to_have_attribute("data-state", "open")
    shot(alice_page, "1-alice-logged-in")

    start_chat(alice_page, bob.username)
    expect(alice_page.locator("#conv-sub")).to_have_text("online")  # Bob's page is connected
    send(alice_page, "Hello Bob 👋")
    mine = bubbles(alice_page, "Hello Bob 👋")
    expect(mine).to_have_count(1)
    # Bob's page is connected: it confirms holding the message (`received`), and Alice sees it.
    expect(mine.locator(".msg-state")).to_have_text("Delivered")
    alice_id = alice_page.evaluate("JSON.parse(sessionStorage.getItem('netherlink:session')).userId")
    assert isinstance(alice_id, str) and alice_id.isdigit()
    cid = private_conversation_id(int(alice_id), int(bob.user_id))
    expect(conv_item(alice_page, cid).locator(".presence.online")).to_have_count(1)

    # Bob has no conversation open: the new one shows up with an unread badge, live.
    item = conv_item(bob_page, cid)
    expect(item.locator(".conv-name")).to_have_text(alice_name)
    expect(item.locator(".badge")).to_have_text("1")
    expect(item.locator(".conv-preview")).to_have_text("Hello Bob 👋")
    send(alice_page, "Are you there?")
    expect(item.locator(".badge")).to_have_text("2")
    expect(bob_page).to_have_title("(2) NetherLink")
    shot(bob_page, "2-bob-unread-badge")

    # Opening it shows the messages, clears the badge (here and on the server) and tells Alice.
    item.click()
    expect(bubbles(bob_page, "Hello Bob 👋")).to_have_count(1)
    expect(bubbles(bob_page, "Are you there?")).to_have_count(1)
    expect(item.locator(".badge")).to_have_count(0)
    expect(bob_page).to_have_title("NetherLink")
    wait_until(lambda: _unread_total(cluster.gw1, bob) == 0, timeout=10, what="Bob's unread count cleared")
    expect(bubbles(alice_page, "Are you there?").locator(".msg-state")).to_have_text("Read")
    expect(bubbles(alice_page, "Hello Bob 👋").locator(".msg-state")).to_have_text("Read")

    # Both have the conversation open: messages arrive live both ways and are read at once.
    send(bob_page, "Hi Alice! Yes, here.")
    expect(bubbles(alice_page, "Hi Alice! Yes, here.")).to_have_count(1)
    expect(bubbles(bob_page, "Hi Alice! Yes, here.").locator(".msg-state")).to_have_text("Read")
    send(alice_page, "Great.\nTwo lines.")
    expect(bubbles(bob_page, "Great.\nTwo lines.")).to_have_count(1)
    expect(conv_item(bob_page, cid).locator(".badge")).to_have_count(0)
    expect(conv_item(alice_page, cid).locator(".badge")).to_have_count(0)
    shot(alice_page, "3-alice-conversation")
    shot(bob_page, "3-bob-conversation")
    for page in (alice_page, bob_page):
        assert page.errors.errors == [] and page.errors.dialogs == []


def test_a_message_with_markup_is_shown_as_text_and_never_run(cluster, make_user, connect, open_page, shot):
    alice, bob = make_user(), make_user()
    payloads = ["<img src=x onerror=alert(1)>", "<script>alert(2)</script>", '"><svg onload=alert(3)>',
                "<b>not bold</b> &amp; <a href=javascript:alert(4)>link</a>"]
    bob_page = open_page(cluster.gw1.http)
    log_in(bob_page, bob.username)
    a = connect(alice, cluster.gw2)
    for text in payloads[:2]:  # before Bob opens the chat: list preview and history
        assert a.send_message(bob.user_id, text)["type"] == "ack"
    cid = private_conversation_id(int(alice.user_id), int(bob.user_id))
    expect(conv_item(bob_page, cid).locator(".conv-preview")).to_have_text(payloads[1])
    conv_item(bob_page, cid).click()
    for text in payloads[2:]:  # live, into the open conversation
        assert a.send_message(bob.user_id, text)["type"] == "ack"
    for text in payloads:
        expect(bubbles(bob_page, text)).to_have_count(1)
        expect(bob_page.locator("#message-list").get_by_text(text, exact=True)).to_be_visible()
    send(bob_page, payloads[0])  # his own copy, rendered by the sender's page
    expect(bob_page.locator("#message-list li.msg.mine").filter(has_text=payloads[0])).to_have_count(1)
    a.next_frame(lambda f: f["type"] == "message" and f["content"] == payloads[0] and f["from"] == bob.user_id)
    shot(bob_page, "markup-as-text")
    assert bob_page.locator("img, svg, script:not([src]), b, a[href^=javascript]").count() == 0
    assert bob_page.errors.dialogs == [] and bob_page.errors.errors == []


def test_history_pages_back_and_own_messages_can_be_recalled(cluster, make_user, connect, open_page, shot):
    alice, bob = make_user(), make_user()
    a = connect(alice, cluster.gw1)
    for i in range(35):
        assert a.send_message(bob.user_id, f"old message {i}")["type"] == "ack"
    cid = private_conversation_id(int(alice.user_id), int(bob.user_id))
    # This browser synced those 35 before (its stored cursor is past them): what the open
    # conversation shows comes from history alone, a page at a time.
    b = connect(bob, cluster.gw2)
    cursor = wait_until(lambda: (lambda e, c, _: len(e) == 35 and c)(*sync_all(b)), timeout=15,
                        what="the 35 messages in Bob's stream")
    bob_page = open_page(cluster.gw2.http)
    bob_page.evaluate("([key, value]) => localStorage.setItem(key, value)", [f"netherlink:cursor:{bob.user_id}", cursor])
    log_in(bob_page, bob.username)
    expect(conv_item(bob_page, cid).locator(".badge")).to_have_text("35")
    conv_item(bob_page, cid).click()
    expect(bubbles(bob_page, "old message 34")).to_have_count(1)
    expect(bubbles(bob_page, "old message 5")).to_have_count(1)
    expect(bubbles(bob_page, "old message 4")).to_have_count(0)  # one page of 30
    bob_page.locator("#load-older").click()
    expect(bubbles(bob_page, "old message 0")).to_have_count(1)
    expect(bob_page.locator("#message-list li.msg")).to_have_count(35)
    expect(bob_page.locator("#load-older")).to_be_hidden()
    expect(bob_page.locator("#message-list li.msg.theirs .recall")).to_have_count(0)  # not his to recall

    send(bob_page, "oops, wrong chat")
    mine = bubbles(bob_page, "oops, wrong chat")
    expect(mine.locator(".msg-state")).to_have_text("Sent")
    mine.locator(".recall").click()
    expect(bob_page.locator("#message-list li.msg.mine.recalled")).to_have_text(re.compile("You recalled a message"))
    expect(bubbles(bob_page, "oops, wrong chat")).to_have_count(0)
    expect(conv_item(bob_page, cid).locator(".conv-preview")).to_have_text("[message recalled]")
    recalled = a.next_frame(lambda f: f["type"] == "recalled")
    original = a.next_frame(lambda f: f["type"] == "message" and f["from"] == bob.user_id)
    # (The live frame may be built after the recall was stored: then it carries status 2 already.)
    assert recalled["msg_id"] == original["msg_id"] and original["content"] in ("oops, wrong chat", "")
    shot(bob_page, "history-and-recall")
    assert bob_page.errors.errors == []


def test_a_narrow_window_shows_one_pane_at_a_time(cluster, make_user, connect, open_page, shot):
    alice, bob = make_user(), make_user()
    assert connect(alice, cluster.gw1).send_message(bob.user_id, "on the phone")["type"] == "ack"
    page = open_page(cluster.gw1.http, width=390, height=760)
    log_in(page, bob.username)
    cid = private_conversation_id(int(alice.user_id), int(bob.user_id))
    expect(page.locator("#conversation")).to_be_hidden()
    conv_item(page, cid).click()
    expect(bubbles(page, "on the phone")).to_be_visible()
    expect(page.locator(".sidebar")).to_be_hidden()
    shot(page, "narrow-conversation")
    page.locator("#back").click()
    expect(page.locator(".sidebar")).to_be_visible()
    expect(conv_item(page, cid).locator(".badge")).to_have_count(0)


def test_the_page_opens_its_socket_with_a_ticket_and_logging_out_ends_the_session(cluster, make_user, open_page):
    user = make_user()
    urls = []
    page = open_page(cluster.gw1.http, before=lambda p: p.on("websocket", lambda ws: urls.append(ws.url)))
    log_in(page, user.username)
    assert urls and all("/ws?ticket=" in url and "token=" not in url for url in urls), urls
    saved = page.evaluate("JSON.parse(sessionStorage.getItem('netherlink:session'))")
    assert saved and saved["refreshToken"] and saved["token"]
    page.locator("#logout").click()
    expect(page.locator("#auth")).to_be_visible()
    wait_until(lambda: requests.get(f"{cluster.gw1.http}/api/unread", timeout=10,
                                    headers={"Authorization": f"Bearer {saved['token']}"}).status_code == 401,
               what="the page's session to be ended on the server")
    r = requests.post(f"{cluster.gw1.http}/api/auth/refresh", json={"refresh_token": saved["refreshToken"]}, timeout=10)
    assert r.status_code == 401
