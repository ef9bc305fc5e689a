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
    assert s.env == "production" and s.jwt_ttl_seconds == 900 and s.refresh_ttl_seconds == 30 * 86400


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


@pytest.mark.parametrize("environ, variable", [
    ({"RABBITMQ_QUEUE_TYPE": "mirrored"}, "RABBITMQ_QUEUE_TYPE"),
    ({"RABBITMQ_QUEUE_TYPE": "quorum", "BROKER_URL": "redis://127.0.0.1:6380/1"}, "RABBITMQ_QUEUE_TYPE"),
    ({"REDIS_SENTINELS": "127.0.0.1"}, "REDIS_SENTINELS"),
    ({"REDIS_SENTINELS": "127.0.0.1:26379,host:port"}, "REDIS_SENTINELS"),
])
def test_cluster_settings_that_cannot_work_are_refused_by_name(environ, variable):
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(environ)


def test_a_single_node_keeps_the_classic_queues_and_a_cluster_gets_quorum_ones():
    import celeryconfig

    classic = celeryconfig.from_settings(Settings.from_env({}))
    assert classic["result_backend"] == "redis://127.0.0.1:6379/0" and "worker_consumer" not in classic
    push = next(q for q in classic["task_queues"] if q.name == "push_tasks")
    assert push.queue_arguments["x-max-priority"] == 10 and push.exchange.type == "direct"

    quorum = celeryconfig.from_settings(Settings.from_env({
        "RABBITMQ_QUEUE_TYPE": "quorum", "REDIS_SENTINELS": "10.0.0.1:26379, 10.0.0.2:26379",
        "REDIS_URL": "redis://:pw@ignored:6379/3",
        "BROKER_URL": "amqp://u:p@10.0.0.1:5672/v;amqp://u:p@10.0.0.2:5672/v"}))
    assert quorum["result_backend"] == "sentinel://:pw@10.0.0.1:26379/3;sentinel://:pw@10.0.0.2:26379/3"
    queues = {q.name: q for q in quorum["task_queues"]}
    assert set(queues) == {"private_messages", "group_messages", "offline_messages",
                           "push_tasks.high", "push_tasks.normal", "push_tasks.low"}
    for queue in queues.values():  # quorum, no priorities, and topic exchanges so countdowns can be delayed natively
        assert queue.queue_arguments["x-queue-type"] == "quorum" and "x-max-priority" not in queue.queue_arguments
        assert queue.exchange.type == "topic"
    assert [celeryconfig.push_route(p)["queue"] for p in (10, 8, 7, 5, 4, 1)] == [
        "push_tasks.high", "push_tasks.high", "push_tasks.normal", "push_tasks.normal", "push_tasks.low",
        "push_tasks.low"]
