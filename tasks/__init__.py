"""The Celery app (`celery -A tasks ...`). Tasks live in tasks.pipeline."""
from celery import Celery

app = Celery("netherlink")
app.config_from_object("celeryconfig")

import tasks.pipeline  # noqa: E402,F401  (registers the tasks)
import tasks.worker_metrics  # noqa: E402,F401  (task signals; /metrics on WORKER_METRICS_PORT)
