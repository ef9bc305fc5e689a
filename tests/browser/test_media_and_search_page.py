"""The chat page with pictures and search: Alice attaches a real image, Bob sees its thumbnail and
opens it full size; Bob searches a Chinese word and the hit opens the conversation at the message."""
import io
import re
import uuid

from PIL import Image
from playwright.sync_api import expect

from tests.browser.conftest import log_in, send, start_chat


def _photo_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (640, 480), (30, 90, 200)).save(out, format="PNG")
    return out.getvalue()


def test_a_picture_goes_through_the_page_and_a_chinese_word_is_found(cluster, make_user, open_page, shot):
    alice, bob = make_user(), make_user()
    alice_page, bob_page = open_page(cluster.gw1.http), open_page(cluster.gw2.http)
    log_in(alice_page, alice.username)
    log_in(bob_page, bob.username)
    start_chat(alice_page, bob.username)
    word = "北京" + uuid.uuid4().hex[:4]
    send(alice_page, f"我们明天去{word}开会")
    for i in range(3):
        send(alice_page, f"later message {i}")

    alice_page.locator("#attach-input").set_input_files(
        {"name": "lake.png", "mimeType": "image/png", "buffer": _photo_bytes()})
    mine = alice_page.locator("#message-list li.msg img.media-thumb")
    expect(mine).to_have_count(1)
    expect(alice_page.locator("#upload-state")).to_be_hidden()
    expect(alice_page.locator("#message-list li.msg").filter(has=alice_page.locator("img.media-thumb")).locator(".msg-state")).to_have_text(
        re.compile(r"^(Sent|Delivered)$"))  # Delivered once Bob's connected page confirms it

    start_chat(bob_page, alice.username)
    theirs = bob_page.locator("#message-list li.msg img.media-thumb")
    expect(theirs).to_have_count(1)
    bob_page.wait_for_function("() => { const i = document.querySelector('img.media-thumb');"
                               " return i && i.complete && i.naturalWidth === 320; }")
    shot(bob_page, "media-1-thumbnail")
    theirs.click()
    expect(bob_page.locator("#image-dialog")).to_be_visible()
    bob_page.wait_for_function("() => (document.querySelector('#image-full img') || {}).naturalWidth === 640")
    bob_page.locator("#image-dialog button").click()

    bob_page.locator("#search input[name=q]").fill(word)
    bob_page.locator("#search button[type=submit]").click()
    hit = bob_page.locator("#search-results li.search-hit")
    expect(hit).to_have_count(1)
    expect(hit.locator(".conv-preview")).to_have_text(f"我们明天去{word}开会")
    hit.click()
    found = bob_page.locator("#message-list li.msg.found")
    expect(found).to_have_count(1)
    expect(found.locator(".text")).to_have_text(f"我们明天去{word}开会")
    shot(bob_page, "media-2-search-hit")

    bob_page.locator("#search input[name=q]").fill("北")
    bob_page.locator("#search button[type=submit]").click()
    expect(bob_page.locator("#search-status")).to_contain_text("at least 2 characters")
