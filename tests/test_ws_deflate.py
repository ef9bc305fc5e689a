"""permessage-deflate is negotiated when a client offers it, unless WS_PERMESSAGE_DEFLATE is off."""
import base64
import json
import os
import socket
import zlib

import pytest

from tests.harness import Gateway, register_and_login

OFFER = "permessage-deflate; client_max_window_bits"


def handshake(gateway, token: str, offer: str | None) -> tuple[dict, socket.socket, bytes]:
    """Upgrade by hand (websocket-client never offers extensions): the 101's headers, the socket, bytes after them."""
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  + (f"Sec-WebSocket-Extensions: {offer}\r\n" if offer else "") + "\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed during the handshake: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 101"), lines[0]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}, sock, rest


def first_frame(sock: socket.socket, buffered: bytes) -> tuple[bool, bytes]:
    """(RSV1 set, payload) of the first server frame (hello: unmasked, final, under 64 KiB)."""
    data = buffered

    def need(n: int) -> None:
        nonlocal data
        while len(data) < n:
            chunk = sock.recv(4096)
            assert chunk, "closed before the first frame"
            data += chunk

    need(2)
    length, start = data[1] & 0x7F, 2
    if length == 126:
        need(4)
        length, start = int.from_bytes(data[2:4], "big"), 4
    need(start + length)
    return bool(data[0] & 0x40), data[start:start + length]


@pytest.fixture(scope="module")
def gateways(services, log_dir):
    on = Gateway("deflate-on", services, log_dir)
    off = Gateway("deflate-off", services, log_dir, WS_PERMESSAGE_DEFLATE="false")
    yield on, off
    on.stop()
    off.stop()


def test_an_offer_is_accepted_by_default_and_hello_comes_compressed(gateways):
    on, _ = gateways
    user = register_and_login(on.http)
    headers, sock, rest = handshake(on, user.token, OFFER)
    try:
        assert headers.get("sec-websocket-extensions", "").startswith("permessage-deflate")
        compressed, payload = first_frame(sock, rest)
        assert compressed
        hello = json.loads(zlib.decompressobj(-zlib.MAX_WBITS).decompress(payload + b"\x00\x00\xff\xff"))
        assert hello["type"] == "hello" and hello["user_id"] == user.user_id
    finally:
        sock.close()


def test_with_the_setting_off_the_offer_is_ignored_and_frames_go_uncompressed(gateways):
    _, off = gateways
    user = register_and_login(off.http)
    headers, sock, rest = handshake(off, user.token, OFFER)
    try:
        assert "sec-websocket-extensions" not in headers
        compressed, payload = first_frame(sock, rest)
        assert not compressed and json.loads(payload)["type"] == "hello"
    finally:
        sock.close()


def test_without_an_offer_nothing_is_negotiated(gateways):
    on, _ = gateways
    user = register_and_login(on.http)
    headers, sock, rest = handshake(on, user.token, None)
    try:
        assert "sec-websocket-extensions" not in headers
        assert not first_frame(sock, rest)[0]
    finally:
        sock.close()
