"""A naive pipeline for bench/baseline.py: one Celery task per step, three steps per message.

`celery -A bench.celery_chain worker -Q bench_step1` (and 2, 3). Each step is
trivial and queues the next one after it ran, like persist -> dispatch ->
push; the last records the message in Redis (a set of ids and a counter of
runs, so a second run of a step shows up as a duplicate). The settings that
cost time per task are the pipeline's (celeryconfig.py): acks after the task,
one message in flight per process, persistent JSON messages and, on
RabbitMQ, a publisher confirm per publish.
"""
from __future__ import annotations

import os

import redis
from celery import Celery
from kombu import Exchange, Queue

DONE_KEY = "bench:chain:done"
RUNS_KEY = "bench:chain:runs"

broker_url = os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
app = Celery("bench_chain", broker=broker_url)
_exchange = Exchange("bench.chain", type="direct", durable=True)
app.conf.update(
    task_queues=tuple(Queue(f"bench_step{i}", _exchange, routing_key=f"step{i}", durable=True) for i in (1, 2, 3)),
    task_routes={f"bench.celery_chain.step{i}": {"queue": f"bench_step{i}", "routing_key": f"step{i}"}
                 for i in (1, 2, 3)},
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    accept_content=["json"],
    task_default_delivery_mode="persistent",
    worker_send_task_events=True,  # as the pipeline's workers do (for Flower)
    broker_connection_retry_on_startup=True,
    broker_heartbeat=30,
    broker_transport_options={"confirm_publish": True} if broker_url.startswith("amqp") else {},
)

_redis: redis.Redis | None = None


def _client() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(os.environ["REDIS_URL"])
    return _redis


@app.task(acks_late=True)
def step1(n: int, payload: str) -> None:
    step2.apply_async(args=[n, payload])


@app.task(acks_late=True)
def step2(n: int, payload: str) -> None:
    step3.apply_async(args=[n, payload])


@app.task(acks_late=True)
def step3(n: int, payload: str) -> None:
    pipe = _client().pipeline(transaction=False)
    pipe.sadd(DONE_KEY, n)
    pipe.incr(RUNS_KEY)
    pipe.execute()
