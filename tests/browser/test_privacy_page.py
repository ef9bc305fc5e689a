"""The chat page respects a peer's presence privacy: no dot, no "last seen", not even after a live message."""
import requests
from playwright.sync_api import expect

from app.chat.conversations import private_conversation_id
from tests.browser.conftest import bubbles, conv_item, log_in


def test_a_peer_who_hides_presence_shows_no_presence_even_while_writing(cluster, make_user, connect, open_page):
    alice, hidden, open_peer = make_user(), make_user(), make_user()
    r = requests.put(f"{cluster.gw1.http}/api/privacy", json={"presence": "nobody"},
                     headers={"Authorization": f"Bearer {hidden.token}"}, timeout=10)
    assert r.status_code == 200, r.text
    writer, other = connect(hidden), connect(open_peer)  # both online
    assert writer.send_message(alice.user_id, "you cannot see me")["type"] == "ack"
    assert other.send_message(alice.user_id, "I am here")["type"] == "ack"

    page = open_page(cluster.gw1.http)
    log_in(page, alice.username)
    hidden_item = conv_item(page, private_conversation_id(int(alice.user_id), int(hidden.user_id)))
    open_item = conv_item(page, private_conversation_id(int(alice.user_id), int(open_peer.user_id)))
    expect(open_item.locator(".presence.online")).to_have_count(1)  # the control: presence is shown
    expect(hidden_item.locator(".presence")).to_have_count(0)  # 403: no dot at all, not even "offline"

    hidden_item.click()
    expect(bubbles(page, "you cannot see me")).to_have_count(1)
    expect(page.locator("#conv-sub")).to_have_text("")
    ack = writer.send_message(alice.user_id, "still invisible")
    assert ack["type"] == "ack"
    expect(bubbles(page, "still invisible")).to_have_count(1)
    expect(page.locator("#conv-sub")).to_have_text("")
    expect(page.locator("#conv-avatar .presence")).to_have_count(0)
    expect(hidden_item.locator(".presence")).to_have_count(0)
    assert page.errors.errors == [] and page.errors.dialogs == []
