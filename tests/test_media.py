"""Media end to end: uploads over REST to a real gateway, image cleaning, access through messages,
the send check, pushes, and the beat job that removes unreferenced uploads; hostile inputs included."""
import io
import socket
import struct
import time
import uuid
import zlib
from urllib.parse import urlparse

import pytest
import requests
from PIL import Image

from tests.harness import wait_until
from tests.test_groups import make_group
from tests.test_push import add_device, apns_for, statuses

MIB = 1024 * 1024


def _png(size=(64, 48), color=(200, 30, 30), text=None) -> bytes:
    out = io.BytesIO()
    image = Image.new("RGB", size, color)
    if text:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("Comment", text)
        image.save(out, format="PNG", pnginfo=info)
    else:
        image.save(out, format="PNG")
    return out.getvalue()


def _jpeg_with_gps() -> bytes:
    image = Image.new("RGB", (80, 60), (10, 120, 200))
    exif = Image.Exif()
    exif[0x010F] = "SpyCam Inc."  # Make
    exif[0x8825] = {2: (52.0, 31.0, 12.0), 1: "N", 4: (13.0, 24.0, 36.0), 3: "E"}  # GPS IFD
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif)
    return out.getvalue()


def _bomb_png(width=30000, height=30000) -> bytes:
    """A tiny PNG whose header claims 900 million pixels (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\x00" * (width + 1) * 64)  # the first rows only: the file stays small
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _auth(user):
    return {"Authorization": f"Bearer {user.token}"}


def _upload(gateway, user, body, content_type, **params):
    return requests.post(f"{gateway.http}/api/media", data=body, params=params,
                         headers={**_auth(user), "Content-Type": content_type}, timeout=60)


def _uploaded(gateway, user, body, content_type, **params) -> dict:
    r = _upload(gateway, user, body, content_type, **params)
    assert r.status_code == 201, r.text
    return r.json()


def _get(gateway, user, media_id, thumbnail=False, **headers):
    path = f"/api/media/{media_id}" + ("/thumbnail" if thumbnail else "")
    return requests.get(f"{gateway.http}{path}", headers={**_auth(user), **headers}, timeout=30)


def _refused(response, status, code, says):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and says in body["message"], body


def test_an_image_upload_is_cleaned_thumbnailed_and_served_privately_with_etag_and_range(cluster, make_user):
    alice = make_user()
    original = _png(size=(1000, 500), text="secret location: 52.5N 13.4E")
    media = _uploaded(cluster.gw1, alice, original, "image/png", filename="holiday.png")
    assert media["content_type"] == "image/png" and (media["width"], media["height"]) == (1000, 500)
    assert len(media["sha256"]) == 64 and media["media_id"].isdigit() and media["filename"] == "holiday.png"
    assert media["thumbnail_url"] == f"/api/media/{media['media_id']}/thumbnail"

    r = _get(cluster.gw2, alice, media["media_id"])  # any gateway
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/png"
    assert len(r.content) == media["size"] and b"secret location" not in r.content  # the text chunk is gone
    assert Image.open(io.BytesIO(r.content)).size == (1000, 500)
    assert r.headers["Cache-Control"].startswith("private")
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Content-Disposition"].startswith("inline") and "holiday.png" in r.headers["Content-Disposition"]
    etag = r.headers["ETag"]
    assert _get(cluster.gw1, alice, media["media_id"], **{"If-None-Match": etag}).status_code == 304
    part = _get(cluster.gw1, alice, media["media_id"], Range="bytes=0-7")
    assert part.status_code == 206 and part.content == b"\x89PNG\r\n\x1a\n"
    assert part.headers["Content-Range"] == f"bytes 0-7/{media['size']}"

    thumb = _get(cluster.gw1, alice, media["media_id"], thumbnail=True)
    assert thumb.status_code == 200 and thumb.headers["Content-Type"] == "image/webp"
    assert Image.open(io.BytesIO(thumb.content)).size == (320, 160)

    again = _uploaded(cluster.gw1, alice, original, "image/png")  # the same bytes: stored once
    assert again["media_id"] == media["media_id"]


def test_exif_and_gps_of_a_jpeg_are_never_served(cluster, make_user):
    alice = make_user()
    original = _jpeg_with_gps()
    assert Image.open(io.BytesIO(original)).getexif().get_ifd(0x8825), "the fixture carries GPS"
    media = _uploaded(cluster.gw1, alice, original, "image/jpeg")
    served = _get(cluster.gw1, alice, media["media_id"]).content
    image = Image.open(io.BytesIO(served))
    assert image.format == "JPEG" and not image.getexif() and b"SpyCam" not in served and b"Exif" not in served


def test_the_declared_type_must_be_the_content(cluster, make_user):
    alice = make_user()
    _refused(_upload(cluster.gw1, alice, _png(), "image/jpeg"), 415, "unsupported_media_type",
             "the content is image/png, not image/jpeg")
    _refused(_upload(cluster.gw1, alice, b"just some text", "image/png"), 415, "unsupported_media_type",
             "not image/png")
    _refused(_upload(cluster.gw1, alice, b"<svg onload=alert(1)>", "image/svg+xml"), 415, "unsupported_media_type",
             "is not accepted")
    _refused(_upload(cluster.gw1, alice, b"<html><script>alert(1)</script>", "text/html"), 415,
             "unsupported_media_type", "is not accepted")
    _refused(_upload(cluster.gw1, alice, _png(), "application/octet-stream"), 415, "unsupported_media_type",
             "image/png")  # an image must be declared as one, so it is cleaned
    _refused(_upload(cluster.gw1, alice, b"%PDF-1.7 pretending", "text/plain"), 415, "unsupported_media_type",
             "application/pdf")
    _refused(_upload(cluster.gw1, alice, b"", "image/png"), 415, "unsupported_media_type", "not image/png")
    assert _uploaded(cluster.gw1, alice, b"", "text/plain")["size"] == 0  # an empty text file is a file


def test_a_polyglot_keeps_only_its_pixels_and_a_script_file_is_never_run(cluster, make_user):
    alice = make_user()
    polyglot = _png() + b"<html><script>alert(document.cookie)</script></html>"
    media = _uploaded(cluster.gw1, alice, polyglot, "image/png")
    served = _get(cluster.gw1, alice, media["media_id"]).content
    assert b"<script>" not in served and Image.open(io.BytesIO(served)).size == (64, 48)

    page = _uploaded(cluster.gw1, alice, b"<html><script>alert(1)</script></html>", "text/plain", filename="a.html")
    r = _get(cluster.gw1, alice, page["media_id"])
    assert r.headers["Content-Type"].startswith("text/plain") and r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Content-Disposition"].startswith("attachment")
    assert "sandbox" in r.headers["Content-Security-Policy"]


def test_a_decompression_bomb_and_a_broken_image_are_refused(cluster, make_user):
    alice = make_user()
    bomb = _bomb_png()
    assert len(bomb) < 200_000
    _refused(_upload(cluster.gw1, alice, bomb, "image/png"), 415, "unsupported_media_type", "pixels")
    cut = _png(size=(400, 400), color=(1, 2, 3))
    _refused(_upload(cluster.gw1, alice, cut[:len(cut) // 2], "image/png"), 400, "invalid_request",
             "cannot be decoded")
    assert cluster.gw1.alive()


def test_bodies_over_media_max_bytes_are_refused_even_when_the_length_lies(cluster, make_user):
    alice = make_user()
    big = 26 * MIB
    host, port = urlparse(cluster.gw1.http).hostname, urlparse(cluster.gw1.http).port
    # Declared too large: refused before a byte of the body is read.
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall((f"POST /api/media HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {alice.token}\r\n"
                      f"Content-Type: text/plain\r\nContent-Length: {big}\r\n\r\n").encode() + b"x" * 100)
        answer = _read_http_answer(sock)
    assert answer.startswith(b"HTTP/1.1 413") and b"at most 26214400 bytes" in answer, answer[:300]

    # No length at all (chunked): cut off at MEDIA_MAX_BYTES, nothing stored.
    def chunks():
        block = b"y" * MIB
        for _ in range(26):
            yield block
    r = requests.post(f"{cluster.gw1.http}/api/media", data=chunks(),
                      headers={**_auth(alice), "Content-Type": "text/plain"}, timeout=60)
    assert r.status_code == 413, r.text

    # A 26 MiB body behind a Content-Length of 1000: the server reads the 1000 bytes it was told of,
    # never more, and stores at most those.
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall((f"POST /api/media HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {alice.token}\r\n"
                      "Content-Type: text/plain\r\nContent-Length: 1000\r\n\r\n").encode())
        try:
            sock.sendall(b"z" * big)
        except OSError:
            pass  # the server may close the connection once it answered
        answer = _read_http_answer(sock)
    assert answer.startswith(b"HTTP/1.1 201"), answer[:200]
    assert b'"size":1000' in answer.replace(b" ", b"")


def _read_http_answer(sock) -> bytes:
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        try:
            part = sock.recv(65536)
        except (socket.timeout, ConnectionResetError):
            break
        if not part:
            break
        data += part
    return data


def test_a_truncated_upload_is_not_stored(cluster, make_user):
    alice = make_user()
    payload = b"start of a file that never ends " * 10
    host, port = urlparse(cluster.gw1.http).hostname, urlparse(cluster.gw1.http).port
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall((f"POST /api/media HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {alice.token}\r\n"
                      f"Content-Type: text/plain\r\nContent-Length: {len(payload) * 10}\r\n\r\n").encode() + payload)
        sock.shutdown(socket.SHUT_WR)  # the client goes away mid-body
        answer = _read_http_answer(sock)
    assert not answer.startswith(b"HTTP/1.1 201"), answer[:300]
    # The complete file, uploaded afterwards, is new: nothing of the cut one was kept under its hash.
    media = _uploaded(cluster.gw1, alice, payload, "text/plain")
    assert media["size"] == len(payload)


def test_file_names_lose_their_path_and_quoting_characters(cluster, make_user):
    alice = make_user()
    media = _uploaded(cluster.gw1, alice, b"quarterly numbers", "text/plain",
                      filename='../../etc/pa"ss\r\nX-Evil: 1\\wd;.txt')
    assert media["filename"] == "wd;.txt"
    r = _get(cluster.gw1, alice, media["media_id"])
    disposition = r.headers["Content-Disposition"]
    assert disposition.startswith("attachment") and "/" not in disposition.split("filename*")[0]
    assert "X-Evil" not in r.headers and "\r" not in disposition and "\n" not in disposition
    unicode_name = _uploaded(cluster.gw1, alice, b"report", "text/plain", filename="报告 2026.txt")
    d = _get(cluster.gw1, alice, unicode_name["media_id"]).headers["Content-Disposition"]
    assert "filename*=UTF-8''%E6%8A%A5%E5%91%8A%202026.txt" in d


def test_others_may_read_an_upload_only_through_a_message_they_can_see_until_it_is_recalled(
        cluster, make_user, connect):
    alice, bob, carol = make_user(), make_user(), make_user()
    media = _uploaded(cluster.gw1, alice, _png(color=(0, 200, 0)), "image/png")
    _refused(_get(cluster.gw1, bob, media["media_id"]), 403, "forbidden", "in no message you can see")
    _refused(_get(cluster.gw1, bob, "99999999999"), 404, "not_found", "does not exist")
    a, b = connect(alice), connect(bob)
    ack = a.send_message(bob.user_id, "photo", message_type="image", extra={"media_id": media["media_id"]})
    assert ack["type"] == "ack", ack
    frame = b.wait_message(ack["msg_id"])
    assert frame["message_type"] == "image" and frame["extra"]["media_id"] == media["media_id"]
    assert _get(cluster.gw1, bob, media["media_id"]).status_code == 200
    assert _get(cluster.gw1, bob, media["media_id"], thumbnail=True).status_code == 200
    _refused(_get(cluster.gw1, carol, media["media_id"]), 403, "forbidden", "in no message you can see")
    a.send_json({"type": "recall", "msg_id": ack["msg_id"]})
    assert a.next_frame(lambda f: f["type"] in ("recalled", "error"))["type"] == "recalled"
    _refused(_get(cluster.gw1, bob, media["media_id"]), 403, "forbidden", "in no message you can see")
    assert _get(cluster.gw1, alice, media["media_id"]).status_code == 200  # still the uploader's


def test_a_group_member_reads_a_picture_only_if_they_may_see_its_message(cluster, make_user, connect):
    owner, member, late = make_user(), make_user(), make_user()
    group = make_group(lambda user: _Api(cluster.gw1, user), owner, [member])
    media = _uploaded(cluster.gw1, owner, _png(color=(9, 9, 9)), "image/png")
    o, m = connect(owner), connect(member)
    cmid = uuid.uuid4().hex
    o.send_json({"type": "send", "client_msg_id": cmid, "group_id": group["group_id"], "content": "team photo",
                 "message_type": "image", "extra": {"media_id": media["media_id"]}})
    ack = o.next_frame(lambda f: f.get("client_msg_id") == cmid and f["type"] in ("ack", "error"))
    assert ack["type"] == "ack", ack
    m.wait_message(ack["msg_id"])
    r = _Api(cluster.gw1, owner)("POST", f"/api/groups/{group['group_id']}/members", json={"user_ids": [late.user_id]})
    assert r.status_code == 200, r.text
    assert _get(cluster.gw1, member, media["media_id"]).status_code == 200
    _refused(_get(cluster.gw1, late, media["media_id"]), 403, "forbidden", "in no message you can see")


class _Api:
    def __init__(self, gateway, user):
        self.base, self.user = gateway.http, user

    def __call__(self, method, path, **kwargs):
        return requests.request(method, f"{self.base}{path}", headers=_auth(self.user), timeout=10, **kwargs)


def test_a_send_must_name_an_upload_of_the_sender(cluster, make_user, connect):
    alice, bob = make_user(), make_user()
    alices = _uploaded(cluster.gw1, alice, _png(color=(1, 1, 200)), "image/png")
    pdf = _uploaded(cluster.gw1, bob, b"%PDF-1.4 minimal", "application/pdf", filename="cv.pdf")
    b = connect(bob)

    def error_of(**fields):
        reply = b.send_message(alice.user_id, "look", **fields)
        assert reply["type"] == "error", reply
        return reply["code"], reply["message"]

    assert error_of(message_type="image", extra={"media_id": alices["media_id"]}) == (
        "not_found", f"media {alices['media_id']} is not one of your uploads")
    assert error_of(message_type="file", extra={"media_id": "424242424242"})[0] == "not_found"
    assert error_of(message_type="image", extra={})[0] == "invalid_frame"
    assert error_of(message_type="image", extra={"media_id": "../1"})[0] == "invalid_frame"
    assert error_of(message_type="image", extra={"media_id": pdf["media_id"]}) == (
        "invalid_frame", f"media {pdf['media_id']} is not an image; send it with message_type 'file'")
    ok = b.send_message(alice.user_id, "my CV", message_type="file", extra={"media_id": pdf["media_id"]})
    assert ok["type"] == "ack", ok


def test_pushes_say_photo_or_the_file_name_instead_of_the_content(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    token = add_device(storage, bob, "ios")
    photo = _uploaded(cluster.gw1, alice, _png(color=(5, 50, 5)), "image/png")
    a = connect(alice)
    ack = a.send_message(bob.user_id, "caption with no secrets", message_type="image",
                         extra={"media_id": photo["media_id"]})
    assert ack["type"] == "ack", ack
    wait_until(lambda: statuses(storage, bob) == ["success"], timeout=15, what="the photo push")
    assert [n.payload["aps"]["alert"]["body"] for n in apns_for(cluster.fakes, token)] == ["📷 Photo"]

    carol = make_user()
    token = add_device(storage, carol, "ios")
    doc = _uploaded(cluster.gw1, alice, b"%PDF-1.4 plan", "application/pdf", filename="plan 2027.pdf")
    ack = a.send_message(carol.user_id, "file", message_type="file", extra={"media_id": doc["media_id"]})
    assert ack["type"] == "ack", ack
    wait_until(lambda: statuses(storage, carol) == ["success"], timeout=15, what="the file push")
    assert [n.payload["aps"]["alert"]["body"] for n in apns_for(cluster.fakes, token)] == ["📎 plan 2027.pdf"]


def test_uploads_per_user_are_rate_limited(cluster, make_user):
    alice = make_user()
    answers = [_upload(cluster.gw1, alice, f"note {i}".encode(), "text/plain").status_code for i in range(12)]
    assert answers[:10] == [201] * 10 and 429 in answers[10:], answers
    r = _upload(cluster.gw1, alice, b"one more", "text/plain")
    _refused(r, 429, "rate_limited", "too many uploads")
    assert int(r.headers["Retry-After"]) >= 1


def test_the_quota_counts_each_users_uploads(services, storage, make_user, cluster, tmp_path):
    from app.config import Settings
    from app.errors import TooLarge
    from app.media.store import FilesystemMediaStore
    from app.media.uploads import accept_upload
    from app.storage import Storage

    alice = make_user()
    small = Storage(Settings.from_env(media_quota_bytes=100_000, media_max_bytes=60_000))
    store = FilesystemMediaStore(tmp_path)
    try:
        accept_upload(small, store, int(alice.user_id), "text/plain", io.BytesIO(b"a" * 50_000), 50_000, None)
        accept_upload(small, store, int(alice.user_id), "text/plain", io.BytesIO(b"a" * 50_000), 50_000, None)
        with pytest.raises(TooLarge, match="quota of 100000 bytes"):
            accept_upload(small, store, int(alice.user_id), "text/plain", io.BytesIO(b"b" * 50_001), 50_001, None)
        with pytest.raises(TooLarge, match="quota of 100000 bytes"):  # no length: counted while it streams
            accept_upload(small, store, int(alice.user_id), "text/plain", io.BytesIO(b"c" * 50_001), None, None)
        with pytest.raises(TooLarge, match="at most 60000 bytes"):
            accept_upload(small, store, int(alice.user_id), "text/plain", io.BytesIO(b"d" * 60_001), None, None)
        assert list((tmp_path / "tmp").iterdir()) == []  # refused uploads leave no temporary file
    finally:
        small.dispose()


def test_uploads_no_message_names_are_removed_after_a_day(cluster, make_user, connect, storage):
    from app.media.store import store_for
    from app.media.uploads import purge_unreferenced
    from models import Media

    alice, bob = make_user(), make_user()
    kept = _uploaded(cluster.gw1, alice, _png(color=(77, 7, 7)), "image/png")
    dropped = _uploaded(cluster.gw1, alice, _png(color=(7, 77, 7)), "image/png")
    ack = connect(alice).send_message(bob.user_id, "x", message_type="image", extra={"media_id": kept["media_id"]})
    assert ack["type"] == "ack", ack
    wait_until(lambda: _get(cluster.gw1, bob, kept["media_id"]).status_code == 200, what="the link stored")
    store = store_for(storage.settings)
    with storage.sessions() as session:
        key = session.get(Media, int(dropped["media_id"])).storage_key
    assert store.path(key).exists()
    now = int(time.time() * 1000)
    purge_unreferenced(storage, store, 24, now_ms=now + 23 * 3600 * 1000)  # not yet a day old
    assert _get(cluster.gw1, alice, dropped["media_id"]).status_code == 200
    assert purge_unreferenced(storage, store, 24, now_ms=now + 25 * 3600 * 1000) >= 1
    _refused(_get(cluster.gw1, alice, dropped["media_id"]), 404, "not_found", "does not exist")
    assert not store.path(key).exists() and not store.path(key + ".thumb").exists()
    assert _get(cluster.gw1, alice, kept["media_id"]).status_code == 200
    assert _get(cluster.gw1, bob, kept["media_id"]).status_code == 200


def test_media_needs_a_token(cluster):
    for r in (requests.post(f"{cluster.gw1.http}/api/media", data=b"x", timeout=10),
              requests.get(f"{cluster.gw1.http}/api/media/1", timeout=10)):
        _refused(r, 401, "unauthorized", "bearer")
