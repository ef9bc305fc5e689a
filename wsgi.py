"""WSGI entry point: `gunicorn --worker-class gevent wsgi:app`."""
from app import create_app

app = create_app()
