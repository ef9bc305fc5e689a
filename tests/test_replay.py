"""The client's clock: a frame carrying `ts` far from server time is refused (a device with a
wrong clock is told so). FRAME_SIGNING was removed (docs/security.md): the process refuses it."""
import time

import pytest

from app.config import ConfigError, Settings


def now_ms():
    return int(time.time() * 1000)


@pytest.mark.parametrize("value", ["1", "true", "on", "maybe"])
def test_frame_signing_is_gone_and_asking_for_it_stops_the_start(value):
    with pytest.raises(ConfigError, match="FRAME_SIGNING was removed"):
        Settings.from_env({"FRAME_SIGNING": value})
    assert not hasattr(Settings.from_env({"FRAME_SIGNING": "0"}), "frame_signing")


def test_a_frame_far_from_server_time_is_refused_and_the_connection_stays(cluster, make_user, connect):
    client = connect(make_user())
    client.send_json({"type": "ping", "ts": now_ms() - 10 * 60 * 1000})
    err = client.next_frame(lambda f: f["type"] == "error")
    assert err["code"] == "invalid_frame" and "check the device clock" in err["message"]
    client.send_json({"type": "ping", "ts": now_ms()})
    assert client.next_frame(lambda f: f["type"] == "pong")
