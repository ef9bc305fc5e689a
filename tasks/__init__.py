"""The Celery app (`celery -A tasks ...`), built by tasks.celery_app from the environment.

Task modules by queue family: tasks.messages (persist, dispatch), tasks.push
(send_push, deliver_push, send_digest), tasks.housekeeping (beat jobs).
Publishing without loading them: tasks.publish.
"""
from tasks.celery_app import make_celery
from tasks.runtime import settings

app = make_celery(settings())
