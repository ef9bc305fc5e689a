"""A party's change to a stored message (an edit, a reaction): who may make it.

Both take the message row's lock and the same checks, in this order: the message
must be one the user has (a group member who joined later has no entry of it: for
them it does not exist), the user still a member of its group, the message not
recalled, and, in a private chat, the user not blocked by the peer (as for sends)."""
from __future__ import annotations

from sqlalchemy import select

from app.accounts.blocks import BLOCKED_SEND_MESSAGE, blocked_by_sql
from app.chat.groups import current_membership
from app.chat.recall import parties_of
from app.errors import Forbidden, NotFound
from models import STATUS_RECALLED, Message


def lock_for_change(session, user_id: int, msg_id: int, recalled_refusal: str,
                    sender_only: str | None = None) -> tuple[Message, list[int]]:
    """The message, locked, and the users who have it; NotFound / Forbidden as above (`sender_only`:
    the refusal for anyone but its sender, checked right after it is found)."""
    msg = session.scalar(select(Message).where(Message.id == msg_id).with_for_update())
    parties = parties_of(session, msg) if msg is not None else []
    if msg is None or (user_id not in parties and user_id != msg.sender_id):
        raise NotFound(f"message {msg_id} does not exist")
    if sender_only is not None and msg.sender_id != user_id:
        raise Forbidden(sender_only)
    if msg.is_group and current_membership(session, msg.group_id, user_id) is None:
        raise Forbidden("you are no longer a member of this group")
    if msg.status == STATUS_RECALLED:
        raise Forbidden(recalled_refusal)
    if not msg.is_group:
        peer = msg.receiver_id if msg.sender_id == user_id else msg.sender_id
        if blocked_by_sql(session, peer, [user_id]):
            raise Forbidden(BLOCKED_SEND_MESSAGE)
    return msg, parties
