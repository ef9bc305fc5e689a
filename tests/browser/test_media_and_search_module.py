"""netherlink.js's media and search functions in Chromium against the real gateways: a real image
drawn in the page is uploaded with progress, shown from its thumbnail, and a Chinese word is found."""
import uuid

from tests.harness import wait_until

SCRIPT = """
async ({ base, token, peerToken, chinese }) => {
  const nl = await import(base + "/static/netherlink.js");
  const canvas = document.createElement("canvas");
  canvas.width = 800; canvas.height = 600;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#c03030"; ctx.fillRect(0, 0, 800, 600);
  ctx.fillStyle = "#ffffff"; ctx.fillRect(100, 100, 200, 150);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.9));
  const progress = [];
  const media = await nl.uploadMedia(base, token, new File([blob], "sunset.jpg", { type: "image/jpeg" }),
                                     { onProgress: (sent, total) => progress.push([sent, total]) });
  const thumbUrl = await nl.mediaObjectUrl(base, token, media.media_id, { thumbnail: true });
  const img = new Image();
  await new Promise((resolve, reject) => { img.onload = resolve; img.onerror = reject; img.src = thumbUrl; });
  URL.revokeObjectURL(thumbUrl);
  let refused = null;
  try { await nl.mediaObjectUrl(base, peerToken, media.media_id); } catch (err) { refused = [err.status, err.code]; }
  let wrongType = null;
  try { await nl.uploadMedia(base, token, new Blob(["not a png"], { type: "image/png" })); }
  catch (err) { wrongType = [err.status, err.code]; }
  const found = await nl.searchMessages(base, token, chinese);
  let tooShort = null;
  try { await nl.searchMessages(base, token, "北"); } catch (err) { tooShort = [err.status, err.code, err.message]; }
  return { media, progress, thumb: [img.naturalWidth, img.naturalHeight], refused, wrongType,
           found: found.messages.map((m) => m.content), tooShort };
}
"""


def test_the_module_uploads_a_real_image_with_progress_shows_its_thumbnail_and_finds_chinese(
        cluster, make_user, connect, browser):
    alice, bob = make_user(), make_user()
    word = "北京" + uuid.uuid4().hex[:4]
    ack = connect(bob).send_message(alice.user_id, f"我们明天去{word}开会")
    assert ack["type"] == "ack", ack
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(cluster.gw1.http + "/healthz")
        wait_until(lambda: page.evaluate(
            "async ({base, token, q}) => (await (await fetch(base + '/api/search/messages?q=' + encodeURIComponent(q),"
            " {headers: {Authorization: 'Bearer ' + token}})).json()).messages.length",
            {"base": cluster.gw1.http, "token": alice.token, "q": word}) == 1, what="the message stored")
        result = page.evaluate(SCRIPT, {"base": cluster.gw1.http, "token": alice.token, "peerToken": bob.token,
                                        "chinese": word})
    finally:
        context.close()
    media = result["media"]
    assert media["content_type"] == "image/jpeg" and (media["width"], media["height"]) == (800, 600)
    assert media["filename"] == "sunset.jpg" and media["thumbnail_url"].endswith("/thumbnail")
    assert result["progress"] and result["progress"][-1][0] == result["progress"][-1][1] > 0
    assert result["thumb"] == [320, 240]
    assert result["refused"] == [403, "forbidden"]  # Bob has no message naming it
    assert result["wrongType"] == [415, "unsupported_media_type"]
    assert result["found"] == [f"我们明天去{word}开会"]
    assert result["tooShort"][:2] == [400, "invalid_request"] and "at least 2" in result["tooShort"][2]
