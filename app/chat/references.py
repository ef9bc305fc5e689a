"""What a send points at: the message it answers (`reply_to`) and the members it mentions.

Checked by the intake before the ack (an acked send must be storable), and only for
sends that carry them: a plain send costs nothing here. One answer for every way a
reply target can be wrong (unknown, another conversation's, one the sender may not
see): `not_found`, so no one learns which messages exist elsewhere.
"""
from __future__ import annotations

from sqlalchemy import select

from app.errors import NotFound
from app.storage import Storage
from models import GroupMember, Message


def check_references(storage: Storage, sender_id: int, conversation_id: str, group_id: int | None,
                     reply_to: int | None, mentions: tuple[int, ...]) -> None:
    """NotFound unless `reply_to` is a message of this conversation the sender may see (a recalled
    one too: clients show it as recalled) and every mentioned user is a current member of the group."""
    if reply_to is None and not mentions:
        return
    with storage.sessions() as session:
        if reply_to is not None:
            target = session.execute(select(Message.conversation_id, Message.group_seq)
                                     .where(Message.id == reply_to)).first()
            visible = target is not None and target.conversation_id == conversation_id
            if visible and group_id is not None:  # the group's visibility rule (app.chat.groups)
                joined_seq = session.scalar(select(GroupMember.joined_seq).where(
                    GroupMember.group_id == group_id, GroupMember.user_id == sender_id,
                    GroupMember.left_seq.is_(None)))
                visible = joined_seq is not None and target.group_seq is not None and target.group_seq > joined_seq
            if not visible:
                raise NotFound(f"'reply_to': message {reply_to} is not one you can see in {conversation_id}")
        if mentions:
            members = set(session.scalars(select(GroupMember.user_id).where(
                GroupMember.group_id == group_id, GroupMember.user_id.in_(mentions),
                GroupMember.left_seq.is_(None))))
            missing = [uid for uid in mentions if uid not in members]
            if missing:
                raise NotFound(f"'mentions': user {missing[0]} is not a member of group {group_id}")
