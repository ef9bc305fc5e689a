"""A gateway restart under an open chat page: the page reconnects, syncs, and re-sends what was not
acked, without losing or duplicating a message."""
import signal

from playwright.sync_api import expect
from sqlalchemy import select

from app.chat.conversations import private_conversation_id
from models import Message
from tests.browser.conftest import PinnedGateway, bubbles, conv_item, log_in, send, start_chat
from tests.harness import free_port, wait_until

RECONNECT_TIMEOUT_MS = 45_000  # the page backs off (with jitter) while the gateway is away


def _stored_from(storage, user_id: str) -> list[str]:
    with storage.sessions() as session:
        return sorted(session.scalars(select(Message.content).where(Message.sender_id == int(user_id))).all())


def test_a_gateway_restart_loses_and_duplicates_nothing(services, cluster, make_user, connect, storage, log_dir,
                                                        open_page, shot):
    alice, bob = make_user(), make_user()
    port = free_port()
    env = dict(**cluster.fakes.env)
    gateway = PinnedGateway("gw-web", port, services, log_dir, **env)
    try:
        page = open_page(gateway.http)
        log_in(page, alice.username)
        start_chat(page, bob.username)
        b = connect(bob, cluster.gw1)
        assert b.send_message(alice.user_id, "before the restart")["type"] == "ack"
        expect(bubbles(page, "before the restart")).to_have_count(1)
        send(page, "from the page, before")
        expect(bubbles(page, "from the page, before").locator(".msg-state")).to_have_text("Sent")
        b.next_frame(lambda f: f["type"] == "message" and f["content"] == "from the page, before")

        # The gateway is stopped for a deploy: it closes the page's socket with 1012 and exits.
        gateway.signal(signal.SIGTERM)
        expect(page.locator("#conn-state")).not_to_have_attribute("data-state", "open")
        gateway.proc.wait(timeout=30)
        gateway.stop()

        # Meanwhile Bob writes (offline path for Alice) and Alice types a message with no connection.
        for i in range(3):
            assert b.send_message(alice.user_id, f"while down {i}")["type"] == "ack"
        send(page, "typed while offline")
        expect(bubbles(page, "typed while offline").locator(".msg-state")).to_have_text("Sending…")
        shot(page, "1-offline")

        gateway = PinnedGateway("gw-web", port, services, log_dir, **env)  # back, at the same address
        expect(page.locator("#conn-state")).to_have_attribute("data-state", "open", timeout=RECONNECT_TIMEOUT_MS)
        for i in range(3):
            expect(bubbles(page, f"while down {i}")).to_have_count(1)
        expect(bubbles(page, "typed while offline").locator(".msg-state")).to_have_text("Sent")
        b.next_frame(lambda f: f["type"] == "message" and f["content"] == "typed while offline")
        expect(page.locator("#message-list li.msg")).to_have_count(6)
        shot(page, "2-resumed")

        # Exactly one stored copy of each of Alice's messages (the re-send kept its client_msg_id).
        wait_until(lambda: len(_stored_from(storage, alice.user_id)) >= 2, timeout=15, what="Alice's 2 messages")
        assert _stored_from(storage, alice.user_id) == ["from the page, before", "typed while offline"]

        # A reload resumes from the stored cursor and shows the same six messages once each.
        cursor_key = f"netherlink:cursor:{alice.user_id}"
        cursor = page.evaluate("(key) => localStorage.getItem(key)", cursor_key)
        assert cursor and cursor.isdigit()
        page.reload()
        expect(page.locator("#conn-state")).to_have_attribute("data-state", "open")
        cid = private_conversation_id(int(alice.user_id), int(bob.user_id))
        conv_item(page, cid).click()
        expect(page.locator("#message-list li.msg")).to_have_count(6)
        for text in ["before the restart", "from the page, before", "typed while offline"] + [
                f"while down {i}" for i in range(3)]:
            expect(bubbles(page, text)).to_have_count(1)
        assert page.errors.errors == []
    finally:
        gateway.stop()
