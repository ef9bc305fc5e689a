"""Alembic environment: the URL comes from the caller or DATABASE_URL."""
from __future__ import annotations

import os

from alembic import context

from app.storage import make_engine
from models import Base

config = context.config
url = config.attributes.get("database_url") or os.environ.get("DATABASE_URL") or "sqlite:///var/netherlink.db"

engine = make_engine(url)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=engine.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
