"""Accounts: registration, passwords and tokens (`auth`), user lookups (`users`), and
accounts an operator disabled (`status`). No Flask, Celery, `ws` or `tasks` imports."""
