"""Operator commands: `flask --app wsgi migrate`, `create-admin NAME`, `disable-user NAME`, `delete-user NAME`, …"""
from __future__ import annotations

import click
from flask import Flask, current_app
from app.accounts.users import all_user_ids, make_admin
from app.chat.unread import rebuild_unread
from app.errors import ChatError
from app.storage import upgrade_schema

REBUILD_CHUNK = 500  # users recounted per MySQL snapshot


def register_commands(app: Flask) -> None:
    @app.cli.command("migrate")
    def migrate():
        """Create or upgrade the database schema (Alembic, idempotent)."""
        upgrade_schema(current_app.config["SETTINGS"].database_url)
        click.echo("schema is up to date")

    @app.cli.command("create-admin")
    @click.argument("username")
    def create_admin(username):
        """Create an admin account (asks for its password), or make an existing user an admin."""
        try:
            user_id = make_admin(current_app.extensions["netherlink.storage"], current_app.config["SETTINGS"],
                                 username, lambda: click.prompt("Password for the new account", hide_input=True,
                                                                confirmation_prompt=True))
        except ChatError as err:
            raise click.ClickException(err.message) from None
        click.echo(f"user {username} (id {user_id}) is an admin")

    def _set_disabled(username: str, disabled: bool, done: str) -> None:
        from app.accounts.status import set_disabled

        from app.accounts.audit import ACTOR_OPERATOR, USER_DISABLED, USER_ENABLED, record

        storage = current_app.extensions["netherlink.storage"]
        try:
            user_id = set_disabled(storage, username, disabled)
        except ChatError as err:
            raise click.ClickException(err.message) from None
        record(storage, None, ACTOR_OPERATOR, USER_DISABLED if disabled else USER_ENABLED, "user", user_id)
        click.echo(f"user {username} (id {user_id}) {done}")

    @app.cli.command("disable-user")
    @click.argument("username")
    def disable_user(username):
        """Disable an account: no login, its tokens refused, its open sockets closed (4401)."""
        _set_disabled(username, True, "is disabled; open connections were closed")

    @app.cli.command("enable-user")
    @click.argument("username")
    def enable_user(username):
        """Enable a disabled account again."""
        _set_disabled(username, False, "is enabled")

    @app.cli.command("delete-user")
    @click.argument("username")
    @click.confirmation_option(prompt="Delete this account for good (its messages stay with the other parties)?")
    def delete_user(username):
        """Delete an account as DELETE /api/account does (sockets closed, username reserved), audited."""
        from app.accounts.deletion import delete_user_by_name

        try:
            user_id = delete_user_by_name(current_app.extensions["netherlink.storage"], username)
        except ChatError as err:
            raise click.ClickException(err.message) from None
        click.echo(f"user {username} (id {user_id}) is deleted; open connections were closed")

    @app.cli.command("rebuild-unread")
    @click.option("--user", "user_ids", type=int, multiple=True, help="only this user id (repeatable)")
    def rebuild_unread_command(user_ids):
        """Recount unread counters in Redis from MySQL (after Redis lost its data)."""
        storage = current_app.extensions["netherlink.storage"]
        user_ids = list(user_ids) or all_user_ids(storage)
        total = len(user_ids)
        for start in range(0, total, REBUILD_CHUNK):
            rebuild_unread(storage, user_ids[start:start + REBUILD_CHUNK])
            click.echo(f"rebuilt unread counters of {min(start + REBUILD_CHUNK, total)}/{total} users")

    @app.cli.command("reindex-search")
    @click.option("--after", type=int, default=0, show_default=True, help="only messages with a larger id (resume)")
    def reindex_search_command(after):
        """Write the search index of messages stored before it existed (idempotent, resumable)."""
        from app.chat.search import reindex_messages

        indexed = reindex_messages(current_app.extensions["netherlink.storage"], after=after, progress=lambda n, last:
                                   click.echo(f"indexed {n} message(s), up to msg id {last}"))
        click.echo(f"search index written for {indexed} message(s)")

    @app.cli.command("retry-pushes")
    @click.option("--id", "push_ids", type=int, multiple=True, help="retry this push (repeatable)")
    @click.option("--status", default="failed", show_default=True, help="with no --id: failed or skipped")
    @click.option("--user", "user_id", type=int, help="with no --id: only this user's pushes")
    @click.option("--provider", type=click.Choice(["apns", "fcm", "email"]), help="with no --id: only this provider")
    def retry_pushes_command(push_ids, status, user_id, provider):
        """Re-send failed pushes from the payload stored in push_log."""
        from app.http.admin import enqueue_deliveries
        from app.push.admin import PushFilter, reopen_matching, reopen_push

        storage = current_app.extensions["netherlink.storage"]
        try:
            if push_ids:
                reopened = [(push_id, reopen_push(storage, push_id)) for push_id in push_ids]
            else:
                reopened = reopen_matching(storage, PushFilter.parse(status, user_id, provider))
        except ChatError as err:
            raise click.ClickException(err.message) from None
        enqueue_deliveries(reopened)
        from app.accounts.audit import ACTOR_OPERATOR, PUSHES_RETRIED, record

        record(storage, None, ACTOR_OPERATOR, PUSHES_RETRIED, "push", "cli",
               {"ids": [str(i) for i, _ in reopened[:100]], "count": len(reopened)})
        click.echo(f"queued {len(reopened)} push(es) for another attempt")

    @app.cli.command("replay-dead-letters")
    @click.option("--limit", type=int, default=10_000, show_default=True)
    def replay_dead_letters_command(limit):
        """Send dead-lettered tasks back to the queue they came from (after fixing the cause)."""
        from tasks.dead_letters import replay_dead_letters

        replayed = replay_dead_letters(limit, progress=lambda n: click.echo(f"replayed {n}"))
        click.echo(f"replayed {replayed} dead-lettered task(s)")
