"""The chat page at / in a real browser: two users in two browser contexts, against the real cluster."""
import re
import uuid

import requests
from playwright.sync_api import expect

from app.messaging import private_conversation_id
from tests.browser.conftest import bubbles, conv_item, log_in, send, start_chat
from tests.harness import wait_until


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
    expect(mine.locator(".msg-state")).to_have_text("Sent")
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
