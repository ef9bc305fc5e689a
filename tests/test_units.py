"""Plain-Python pieces that need no services: settings, snowflake ids."""
import pytest

from app.config import ConfigError, Settings
from app.ids import SnowflakeIds, timestamp_of


def test_production_refuses_the_default_jwt_secret_and_sqlite():
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"NETHERLINK_ENV": "production"})
    assert "JWT_SECRET" in str(err.value) and "DATABASE_URL" in str(err.value) and "FLOWER_BASIC_AUTH" in str(err.value)


def test_production_starts_with_safe_settings():
    s = Settings.from_env({"NETHERLINK_ENV": "production", "JWT_SECRET": "s" * 40, "FLOWER_BASIC_AUTH": "ops:pw",
                           "DATABASE_URL": "mysql+pymysql://u:p@db/netherlink"})
    assert s.env == "production" and s.jwt_ttl_seconds == 86400


def test_bad_values_name_the_variable():
    with pytest.raises(ConfigError, match="JWT_TTL_SECONDS"):
        Settings.from_env({"JWT_TTL_SECONDS": "soon"})
    with pytest.raises(ConfigError, match="NETHERLINK_ENV"):
        Settings.from_env({"NETHERLINK_ENV": "staging"})


@pytest.mark.parametrize("variable, value", [
    ("PUSH_BATCH_MAX", "0"), ("PUSH_BATCH_MAX", "1001"), ("PUSH_BATCH_WAIT_MS", "0"),
    ("PUSH_BATCH_WAIT_MS", "5000"), ("PUSH_BATCHES_IN_FLIGHT", "0"), ("PUSH_BATCHES_IN_FLIGHT", "65"),
])
def test_push_batch_settings_out_of_range_are_refused_by_name(variable, value):
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: value})


def test_push_batch_settings_default_and_accept_their_range():
    s = Settings.from_env({})
    assert (s.push_batch_max, s.push_batch_wait_ms, s.push_batches_in_flight) == (100, 10, 2)
    s = Settings.from_env({"PUSH_BATCH_MAX": "1", "PUSH_BATCH_WAIT_MS": "1000", "PUSH_BATCHES_IN_FLIGHT": "64"})
    assert (s.push_batch_max, s.push_batch_wait_ms, s.push_batches_in_flight) == (1, 1000, 64)


def test_snowflake_ids_are_unique_and_increasing_even_when_the_clock_steps_back():
    times = iter([1_800_000_000.000] * 5000 + [1_799_999_999.0] * 10 + [1_800_000_001.0] * 10)
    gen = SnowflakeIds(7, clock=lambda: next(times))
    ids = [gen.next_id() for _ in range(5020)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert abs(timestamp_of(ids[0]) - 1_800_000_000_000) <= 1


def test_two_nodes_never_collide_in_the_same_millisecond():
    a, b = SnowflakeIds(1, clock=lambda: 1_800_000_000.0), SnowflakeIds(2, clock=lambda: 1_800_000_000.0)
    assert not {a.next_id() for _ in range(1000)} & {b.next_id() for _ in range(1000)}
