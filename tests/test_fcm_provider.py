"""FCM provider against a real local FCM HTTP v1 server and OAuth token endpoint (no mocks)."""
from __future__ import annotations

import email.utils
import logging
import socket
import time

import pytest

from app.config import Settings
from app.push.providers import DeadToken, Delivered, PermanentFailure, PushRequest, TemporaryFailure
from app.push.providers.fcm import FcmClient
from tests.fakes.fcm_server import FakeFcmServer, make_device_token, write_service_account


@pytest.fixture
def fake_fcm():
    with FakeFcmServer() as fake:
        yield fake


@pytest.fixture
def credentials_file(fake_fcm, tmp_path):
    return fake_fcm.write_service_account(tmp_path / "service-account.json")


@pytest.fixture
def fcm(fake_fcm, credentials_file):
    with FcmClient(_settings(fake_fcm.url, credentials_file), timeout=2.0) as client:
        yield client


def _settings(base_url, credentials_file) -> Settings:
    return Settings(env="test", fcm_base_url=base_url, fcm_credentials_file=str(credentials_file))


def _push(token: str | None = None, **overrides) -> PushRequest:
    fields = dict(token=token or make_device_token(), title="Alice", body="see you at 7 by the fountain",
                  badge=4, conversation_id="c-1001", msg_id="7301", priority=8)
    fields.update(overrides)
    return PushRequest(**fields)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_private_message_is_delivered_with_android_fields_and_data(fcm, fake_fcm):
    push = _push()

    outcome = fcm.send(push)

    assert isinstance(outcome, Delivered)
    assert outcome.provider_id.startswith("projects/netherlink-test/messages/")
    [message] = fake_fcm.messages
    assert message["token"] == push.token
    assert message["notification"] == {"title": "Alice", "body": "see you at 7 by the fountain"}
    assert message["data"] == {"msg_id": "7301", "conversation_id": "c-1001"}
    android = message["android"]
    assert android["priority"] == "high"
    assert android["collapse_key"] == "c-1001"
    assert android["notification"]["tag"] == "c-1001"
    assert android["notification"]["notification_count"] == 4


def test_group_message_goes_at_normal_priority(fcm, fake_fcm):
    assert isinstance(fcm.send(_push(priority=5)), Delivered)

    assert fake_fcm.messages[0]["android"]["priority"] == "normal"


def test_preview_off_shows_a_generic_notification_without_sender_or_text(fcm, fake_fcm):
    assert isinstance(fcm.send(_push(preview=False)), Delivered)

    [message] = fake_fcm.messages
    assert message["notification"] == {"body": "New message"}
    assert "Alice" not in str(message) and "fountain" not in str(message)
    assert message["data"] == {"msg_id": "7301", "conversation_id": "c-1001"}


def test_unregistered_token_is_dead(fcm, fake_fcm):
    push = _push()
    fake_fcm.fail_token(push.token, error_code="UNREGISTERED")

    outcome = fcm.send(push)

    assert isinstance(outcome, DeadToken)
    assert "UNREGISTERED" in outcome.reason
    assert fake_fcm.messages == []


def test_malformed_registration_token_is_dead(fcm, fake_fcm):
    outcome = fcm.send(_push(token="not-a-registration-token"))

    assert isinstance(outcome, DeadToken)
    assert "not a valid FCM registration token" in outcome.reason


def test_sender_id_mismatch_token_is_dead(fcm, fake_fcm):
    push = _push()
    fake_fcm.fail_token(push.token, error_code="SENDER_ID_MISMATCH")

    assert isinstance(fcm.send(push), DeadToken)


def test_message_fcm_rejects_is_a_permanent_failure_and_keeps_the_token(fcm, fake_fcm):
    outcome = fcm.send(_push(body="x" * 5000))  # over FCM's 4 KB payload limit

    assert isinstance(outcome, PermanentFailure)
    assert "INVALID_ARGUMENT" in outcome.reason and "too big" in outcome.reason


def test_unavailable_is_temporary_and_carries_retry_after(fcm, fake_fcm):
    fake_fcm.fail_next(error_code="UNAVAILABLE", retry_after=7)

    outcome = fcm.send(_push())

    assert outcome == TemporaryFailure("FCM 503 UNAVAILABLE: The service is currently unavailable.", 7.0)


def test_a_retry_after_http_date_counts_from_now(fcm, fake_fcm):
    fake_fcm.fail_next(error_code="UNAVAILABLE", retry_after=email.utils.formatdate(time.time() + 120, usegmt=True))

    outcome = fcm.send(_push())

    assert isinstance(outcome, TemporaryFailure) and 110.0 <= outcome.retry_after <= 120.0


@pytest.mark.parametrize("header", ["in a minute", "inf", "nan"])
def test_an_unreadable_retry_after_is_ignored(fcm, fake_fcm, header):
    fake_fcm.fail_next(error_code="UNAVAILABLE", retry_after=header)

    outcome = fcm.send(_push())

    assert isinstance(outcome, TemporaryFailure) and outcome.retry_after is None


def test_internal_error_is_temporary_and_the_next_attempt_delivers(fcm, fake_fcm):
    fake_fcm.fail_next(error_code="INTERNAL")
    push = _push()

    first = fcm.send(push)
    second = fcm.send(push)

    assert isinstance(first, TemporaryFailure) and first.retry_after is None
    assert isinstance(second, Delivered)
    assert len(fake_fcm.messages) == 1


def test_quota_exceeded_is_temporary_with_the_providers_delay(fcm, fake_fcm):
    fake_fcm.fail_next(error_code="QUOTA_EXCEEDED", retry_after=30)
    fake_fcm.fail_next(error_code="QUOTA_EXCEEDED")

    with_header = fcm.send(_push())
    without_header = fcm.send(_push())

    assert isinstance(with_header, TemporaryFailure) and with_header.retry_after == 30.0
    assert isinstance(without_header, TemporaryFailure) and without_header.retry_after == 60.0


def test_oauth_token_is_fetched_once_and_reused_across_sends(fcm, fake_fcm):
    for _ in range(3):
        assert isinstance(fcm.send(_push()), Delivered)

    assert fake_fcm.token_grants == 1
    assert len(set(fake_fcm.bearer_tokens_used)) == 1


def test_revoked_access_token_is_refreshed_once_and_the_push_still_goes_out(fcm, fake_fcm):
    assert isinstance(fcm.send(_push()), Delivered)
    fake_fcm.revoke_access_tokens()

    assert isinstance(fcm.send(_push()), Delivered)
    assert fake_fcm.token_grants == 2
    assert len(fake_fcm.messages) == 2


def test_persistent_401_is_temporary_after_one_refresh(fcm, fake_fcm):
    fake_fcm.fail_next(2, status=401)

    outcome = fcm.send(_push())

    assert isinstance(outcome, TemporaryFailure)
    assert fake_fcm.token_grants == 2 and fake_fcm.send_attempts == 2


def test_third_party_auth_error_is_permanent_without_a_token_refresh(fcm, fake_fcm):
    fake_fcm.fail_next(error_code="THIRD_PARTY_AUTH_ERROR")

    outcome = fcm.send(_push())

    assert isinstance(outcome, PermanentFailure) and "THIRD_PARTY_AUTH_ERROR" in outcome.reason
    assert fake_fcm.token_grants == 1 and fake_fcm.send_attempts == 1


def test_connection_refused_is_temporary(fake_fcm, credentials_file):
    with FcmClient(_settings(f"http://127.0.0.1:{_free_port()}", credentials_file), timeout=2.0) as client:
        outcome = client.send(_push())

    assert isinstance(outcome, TemporaryFailure)
    assert "unreachable" in outcome.reason


def test_unreachable_token_endpoint_is_temporary(fake_fcm, tmp_path):
    credentials = tmp_path / "sa.json"
    write_service_account(credentials, f"http://127.0.0.1:{_free_port()}/token")

    with FcmClient(_settings(fake_fcm.url, credentials), timeout=2.0) as client:
        outcome = client.send(_push())

    assert isinstance(outcome, TemporaryFailure)
    assert fake_fcm.send_attempts == 0


def test_slow_fcm_times_out_as_temporary(fake_fcm, credentials_file):
    fake_fcm.delay_next(1.0)

    with FcmClient(_settings(fake_fcm.url, credentials_file), timeout=0.3) as client:
        outcome = client.send(_push())

    assert isinstance(outcome, TemporaryFailure)
    assert "Timeout" in outcome.reason


def test_token_signed_by_an_unknown_key_is_refused_permanently(fake_fcm, tmp_path):
    # Same service-account email, different private key: the fake must reject the JWT signature.
    fake_fcm.write_service_account(tmp_path / "trusted.json")
    forged = tmp_path / "forged.json"
    write_service_account(forged, fake_fcm.token_url)

    with FcmClient(_settings(fake_fcm.url, forged), timeout=2.0) as client:
        outcome = client.send(_push())

    assert isinstance(outcome, PermanentFailure)
    assert "Invalid JWT Signature" in outcome.reason
    assert fake_fcm.token_grants == 0


def test_logs_never_contain_the_device_token_or_message_text(fcm, fake_fcm, caplog):
    push = _push()
    fake_fcm.fail_next(error_code="UNAVAILABLE")
    caplog.set_level(logging.DEBUG)

    fcm.send(push)
    fcm.send(push)

    assert "7301" in caplog.text
    assert push.token not in caplog.text
    assert "fountain" not in caplog.text


@pytest.mark.parametrize("problem, path_of", [
    ("unset", lambda tmp: ""),
    ("missing", lambda tmp: tmp / "nope.json"),
    ("garbage", lambda tmp: _write(tmp / "bad.json", "{not json")),
    ("not a service account", lambda tmp: _write(tmp / "user.json", '{"type": "authorized_user"}')),
])
def test_unusable_credentials_are_refused_naming_the_setting(problem, path_of, tmp_path):
    with pytest.raises(ValueError, match="FCM_CREDENTIALS_FILE"):
        FcmClient(_settings("http://127.0.0.1:1", path_of(tmp_path)))


def _write(path, text):
    path.write_text(text)
    return path


def test_send_many_sends_concurrently_and_answers_in_order(fcm, fake_fcm):
    import time

    tokens = [make_device_token() for _ in range(8)]
    fake_fcm.fail_token(tokens[3], error_code="UNREGISTERED", status=404)
    fake_fcm.delay_next(0.5, count=8)  # one after the other: 4 s
    started = time.monotonic()
    outcomes = fcm.send_many([_push(token) for token in tokens])
    took = time.monotonic() - started

    assert took < 3, f"{took:.1f} s: the requests were not concurrent"
    assert [type(o) for o in outcomes] == [Delivered] * 3 + [DeadToken] + [Delivered] * 4
    assert {m["token"] for m in fake_fcm.messages} == set(tokens) - {tokens[3]}
    assert fake_fcm.token_grants == 1  # the threads share one access token
