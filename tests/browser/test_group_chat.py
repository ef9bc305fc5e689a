"""Group chat on the chat page, end to end: three users in three browser contexts against the real
gateways and workers of the test cluster and the real groups REST API (no scripted answers).

A page learns of a group it was added to, or removed from, by refreshing GET /api/conversations,
which chat.js does on every `group_event` frame (protocol.md §19), every LIST_REFRESH_MS, on
reconnect, when a message names a conversation it does not know, and after a group send is refused. Bob's page runs on Playwright's fake clock (it still flows at the normal
rate) so that the test can bring its periodic refresh forward instead of waiting for it.
"""
import re
from urllib.parse import urlparse

import requests
from playwright.sync_api import expect

from tests.browser.conftest import bubbles, conv_item, log_in, send
from tests.harness import wait_until

LIST_REFRESH_MS = 30_000  # LIST_EVERY_MS in app/static/chat.js


def _get(gateway, user, path):
    r = requests.get(f"{gateway.http}{path}", headers={"Authorization": f"Bearer {user.token}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _list_item(gateway, user, conversation_id):
    return next((c for c in _get(gateway, user, "/api/conversations")["conversations"]
                 if c["conversation_id"] == conversation_id), None)


def _periodic_refresh(page):
    """Bring the page's periodic conversation-list refresh forward and wait for its answer.

    The refresh re-arms its timer, so the next one is LIST_REFRESH_MS away: only something
    the page sees or does refreshes the list before then."""
    with page.expect_response(lambda r: urlparse(r.url).path == "/api/conversations"
                              and r.request.method == "GET" and r.ok):
        page.clock.fast_forward(LIST_REFRESH_MS)


def test_a_group_end_to_end_create_add_chat_read_remove_and_leave(cluster, make_user, open_page, shot):
    alice, bob, carol = make_user(), make_user(), make_user()
    alice_page = open_page(cluster.gw1.http)
    bob_page = open_page(cluster.gw2.http, before=lambda page: page.clock.install())
    carol_page = open_page(cluster.gw1.http)
    for page, user in ((alice_page, alice), (bob_page, bob), (carol_page, carol)):
        log_in(page, user.username)

    # Alice creates the group with Bob in it, by username, as the dialog offers.
    name = "Launch <b>team</b> & co"
    alice_page.locator("#new-group").click()
    alice_page.locator("#group-form input[name=name]").fill(name)
    alice_page.locator("#group-form input[name=members]").fill(bob.username)
    alice_page.get_by_role("button", name="Create group").click()
    expect(alice_page.locator("#conv-title")).to_have_text(name)
    expect(alice_page.locator("#conv-sub")).to_have_text("2 members")
    cid = alice_page.locator("li.conv[aria-current=true]").get_attribute("data-conversation-id")
    assert re.fullmatch(r"g_\d+", cid), cid
    group_id = cid[2:]
    expect(conv_item(alice_page, cid).locator(".conv-name")).to_have_text(name)
    assert _list_item(cluster.gw2, bob, cid)["group"] == {"name": name, "member": True}

    # Bob's page hears nothing about it over the socket: its next list refresh shows it.
    _periodic_refresh(bob_page)
    bob_item = conv_item(bob_page, cid)
    expect(bob_item.locator(".conv-name")).to_have_text(name)
    expect(bob_item.locator(".conv-preview")).to_have_text("New group")
    expect(bob_item.locator(".badge")).to_have_count(0)
    shot(bob_page, "1-bob-sees-the-new-group")

    # Alice writes; Bob, with no conversation open, gets it live as an unread message.
    send(alice_page, "Hello team")
    expect(bubbles(alice_page, "Hello team").locator(".msg-state")).to_have_text("Sent")
    expect(bob_item.locator(".badge")).to_have_text("1")
    expect(bob_item.locator(".conv-preview")).to_have_text(f"{alice.username}: Hello team")
    expect(bob_page).to_have_title("(1) NetherLink")
    shot(bob_page, "2-bob-unread-badge")

    # Bob opens the group: the message with Alice's name over it; the badge clears here and on the
    # server; Alice's message shows who read it.
    bob_item.click()
    expect(bob_page.locator("#conv-title")).to_have_text(name)
    expect(bob_page.locator("#conv-sub")).to_have_text("2 members")
    hello = bubbles(bob_page, "Hello team")
    expect(hello).to_have_count(1)
    expect(hello.locator(".sender")).to_have_text(alice.username)
    expect(bob_item.locator(".badge")).to_have_count(0)
    expect(bob_page).to_have_title("NetherLink")
    wait_until(lambda: _get(cluster.gw2, bob, "/api/unread")["total"] == 0, timeout=10,
               what="Bob's unread count cleared on the server")
    expect(bubbles(alice_page, "Hello team").locator(".msg-state")).to_have_text(f"Read by {bob.username}")

    # Both have it open: Bob's reply reaches Alice live with his name, and she reads it at once.
    send(bob_page, "Hi Alice!")
    reply = bubbles(alice_page, "Hi Alice!")
    expect(reply.locator(".sender")).to_have_text(bob.username)
    expect(bubbles(bob_page, "Hi Alice!").locator(".msg-state")).to_have_text(f"Read by {alice.username}")
    expect(conv_item(alice_page, cid).locator(".badge")).to_have_count(0)

    # Markup is text, in the bubble and in the list preview.
    markup = '<img src=x onerror=alert(1)> <b>bold?</b> <script>alert(2)</script>'
    send(alice_page, markup)
    shown = bubbles(bob_page, markup)
    expect(shown).to_have_count(1)
    expect(shown.locator(".sender")).to_have_text(alice.username)
    expect(bob_item.locator(".conv-preview")).to_have_text(f"{alice.username}: {markup}")
    shot(bob_page, "3-bob-in-the-group")
    shot(alice_page, "3-alice-in-the-group")

    # Alice adds Carol from the Members dialog. Carol's page learns of the group from the next
    # message, which names a conversation it does not know; she sees nothing from before she joined.
    alice_page.locator("#members").click()
    dialog = alice_page.locator("#members-dialog")
    expect(dialog.locator("#member-list li")).to_have_count(2)
    dialog.locator("#add-member input[name=username]").fill(carol.username)
    dialog.get_by_role("button", name="Add", exact=True).click()
    expect(dialog.locator("#member-list li")).to_have_count(3)
    dialog.get_by_role("button", name="Close").click()
    expect(alice_page.locator("#conv-sub")).to_have_text("3 members")
    send(alice_page, "Welcome Carol")
    carol_item = conv_item(carol_page, cid)
    expect(carol_item.locator(".conv-name")).to_have_text(name)
    expect(carol_item.locator(".conv-preview")).to_have_text(f"{alice.username}: Welcome Carol")
    expect(carol_item.locator(".badge")).to_have_text("1")
    carol_item.click()
    expect(bubbles(carol_page, "Welcome Carol").locator(".sender")).to_have_text(alice.username)
    expect(carol_page.locator("#message-list li.msg")).to_have_count(1)
    expect(carol_page.locator("#conv-sub")).to_have_text("3 members")
    readers = ", ".join(sorted([bob.username, carol.username]))
    expect(bubbles(alice_page, "Welcome Carol").locator(".msg-state")).to_have_text(f"Read by {readers}")
    # Carol's read covers every earlier id too, but she never saw what was written before she joined.
    expect(bubbles(alice_page, "Hello team").locator(".msg-state")).to_have_text(f"Read by {bob.username}")

    # Alice removes Bob. His page learns it at once from the `group_event` frame: its last periodic
    # list refresh was just now, and he sends nothing.
    _periodic_refresh(bob_page)
    alice_page.locator("#members").click()
    dialog.locator("#member-list li").filter(has_text=bob.username).get_by_role("button", name="Remove").click()
    expect(dialog.locator("#member-list li")).to_have_count(2)
    dialog.get_by_role("button", name="Close").click()
    expect(alice_page.locator("#conv-sub")).to_have_text("2 members")
    expect(bob_page.locator("#left-notice")).to_have_text("You are no longer a member of this group.")
    expect(bob_page.locator("#composer")).to_be_hidden()
    expect(bob_page.locator("#members")).to_be_hidden()
    expect(bob_page.locator("#conv-sub")).to_have_text("not a member")
    expect(bob_item.locator(".conv-name")).to_have_text(f"{name} left")
    expect(bob_item.locator(".tag")).to_have_text("left")
    expect(hello).to_have_count(1)  # what he received stays his
    assert _list_item(cluster.gw2, bob, cid)["group"] == {"name": name, "member": False}
    shot(bob_page, "4-bob-removed")

    # Carol leaves on her own: the group stays in her list, shown as left.
    send(alice_page, "Carol, still there?")
    expect(bubbles(carol_page, "Carol, still there?")).to_have_count(1)
    carol_page.locator("#members").click()
    carol_page.locator("#leave-group").click()
    expect(carol_page.locator("#members-dialog")).to_be_hidden()
    expect(carol_page.locator("#left-notice")).to_be_visible()
    expect(carol_page.locator("#composer")).to_be_hidden()
    expect(carol_item.locator(".tag")).to_have_text("left")
    expect(bubbles(carol_page, "Carol, still there?")).to_have_count(1)
    assert _list_item(cluster.gw1, carol, cid)["group"] == {"name": name, "member": False}
    alice_page.locator("#members").click()
    expect(dialog.locator("#member-list li")).to_have_count(1)
    dialog.get_by_role("button", name="Close").click()
    expect(alice_page.locator("#conv-sub")).to_have_text("1 member")
    shot(carol_page, "5-carol-left")
    shot(alice_page, "5-alice-alone")

    for page in (alice_page, bob_page, carol_page):
        assert page.locator("#app b, #app img, #app script").count() == 0
        assert page.errors.errors == [] and page.errors.dialogs == []
