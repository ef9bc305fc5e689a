"""`read`: a user read a conversation up to a message.

Private chats mark the receiver's messages read (status 1); in groups each
member has a read position (conversation.last_read_msg_id) and the message
rows stay as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update

from app.chat.conversations import invalidate_conversation_lists, require_member
from app.storage import Storage
from app.chat.unread import rebuild_unread
from models import STATUS_READ, STATUS_UNREAD, Conversation, GroupMember, Message


@dataclass(frozen=True)
class ReadOutcome:
    conversation_id: str
    msg_id: int
    reader: int
    peer: int | None  # who gets a receipt: the other party of a private chat, the author in a group
    unread_left: int


def mark_read(storage: Storage, user_id: int, conversation_id: str, msg_id: int) -> ReadOutcome:
    """Mark the user's messages of the conversation up to msg_id read; recount unread."""
    with storage.session() as session:
        conv = require_member(session, user_id, conversation_id)
        session.execute(update(Message).where(
            Message.conversation_id == conversation_id, Message.receiver_id == user_id,
            Message.status == STATUS_UNREAD, Message.id <= msg_id).values(status=STATUS_READ))
        # The read position only moves forward (reads from two devices may cross).
        session.execute(update(Conversation).where(
            Conversation.id == conv.id,
            Conversation.last_read_msg_id.is_(None) | (Conversation.last_read_msg_id < msg_id))
            .values(last_read_msg_id=msg_id))
        if conv.is_group:  # a receipt to the author of the message read up to, if someone else
            peer = _group_receipt_to(session, user_id, conv.target_id, conversation_id, msg_id)
        else:
            peer = conv.target_id
    storage.fence_writes([user_id])
    counts = rebuild_unread(storage, [user_id])[user_id]
    invalidate_conversation_lists(storage, [user_id])
    return ReadOutcome(conversation_id, msg_id, user_id, peer, counts.get(conversation_id, 0))


def _group_receipt_to(session, user_id: int, group_id: int, conversation_id: str, msg_id: int) -> int | None:
    """The author of msg_id, if the reader is still a member and could see that message."""
    row = session.execute(select(Message.sender_id, Message.group_seq).where(
        Message.id == msg_id, Message.conversation_id == conversation_id)).first()
    member = session.scalar(select(GroupMember.joined_seq).where(
        GroupMember.group_id == group_id, GroupMember.user_id == user_id, GroupMember.left_seq.is_(None)))
    if row is None or member is None or row.group_seq <= member or row.sender_id == user_id:
        return None
    return row.sender_id
