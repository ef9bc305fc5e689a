"""`react`: a party adds or removes an emoji on a message.

One message_reaction row per (message, user, emoji) is the truth; message.reactions
is its summary, rewritten in the same transaction under the message row's lock, so
frames, sync and history show it without a second query. Each change is a
message_reaction_event that every party's stream gets as a `reaction` entry."""
from __future__ import annotations

import time
import unicodedata
from dataclasses import dataclass

from sqlalchemy import delete, insert, select

from app.chat.changes import lock_for_change
from app.chat.recall import await_persisted
from app.chat.sync import append_missing, append_missing_later
from app.errors import InvalidInput
from app.storage import Storage
from models import ENTRY_REACTION, Message, MessageReaction, MessageReactionEvent

ADD, REMOVE = "add", "remove"
MAX_EMOJI_BYTES = 32
MAX_DISTINCT_EMOJI = 20
_ZWJ, _KEYCAP = "\u200d", "\u20e3"


def clean_emoji(emoji) -> str:
    """One emoji: 1-32 bytes of UTF-8, no whitespace, control or letter characters.

    Not a full grapheme check: it refuses text ("lol", "+1", "a b") while letting through
    every emoji sequence (ZWJ families, skin tones, flags, subdivision flags, keycaps)."""
    if not isinstance(emoji, str) or not emoji:
        raise InvalidInput("'emoji' must be a non-empty string")
    try:
        size = len(emoji.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput("'emoji' is not valid Unicode text") from None
    if size > MAX_EMOJI_BYTES:
        raise InvalidInput(f"'emoji' must be one emoji of at most {MAX_EMOJI_BYTES} bytes")
    keycap = _KEYCAP in emoji
    for ch in emoji:
        category = unicodedata.category(ch)
        tag = 0xE0020 <= ord(ch) <= 0xE007F  # subdivision flags spell their region in tag characters
        if category[0] in "ZL" or category in ("Cc", "Cs", "Co", "Cn") or \
                (category == "Cf" and ch != _ZWJ and not tag) or (ch.isascii() and not (keycap and ch in "#*0123456789")):
            raise InvalidInput("'emoji' must be one emoji, without spaces, letters or control characters")
    return emoji


def parse_op(op) -> str:
    if op not in (ADD, REMOVE):
        raise InvalidInput("'op' must be \"add\" or \"remove\"")
    return op


@dataclass(frozen=True)
class ReactionOutcome:
    msg_id: int
    conversation_id: str
    parties: list[int]
    user_id: int
    emoji: str
    op: str
    changed: bool  # False: already so (an add again, a remove of nothing); no entry, no frame to others


def react(storage: Storage, user_id: int, msg_id: int, emoji: str, op: str,
          now_ms: int | None = None) -> ReactionOutcome:
    """Add or remove the user's `emoji` on the message, for every party to see. Asking for
    what already holds changes nothing (it completes an interrupted attempt's entries)."""
    emoji, op = clean_emoji(emoji), parse_op(op)
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    await_persisted(storage, msg_id, now_ms)
    with storage.session() as session:
        msg, parties = lock_for_change(session, user_id, msg_id, "a recalled message takes no reactions")
        key = (MessageReaction.message_id == msg.id, MessageReaction.user_id == user_id,
               MessageReaction.emoji == emoji)
        present = session.scalar(select(MessageReaction.user_id).where(*key)) is not None
        changed = present != (op == ADD)
        if changed:
            event_id = _apply(session, msg, user_id, emoji, op, now_ms, key)
        else:  # already so: the latest event of this reaction, if it says the same, may lack entries
            event_id = session.scalar(select(MessageReactionEvent.id).where(
                MessageReactionEvent.message_id == msg.id, MessageReactionEvent.user_id == user_id,
                MessageReactionEvent.emoji == emoji, MessageReactionEvent.op == op)
                .order_by(MessageReactionEvent.id.desc()).limit(1))
        rest = [] if event_id is None else \
            append_missing(session, storage, parties, msg.id, msg.conversation_id, ENTRY_REACTION, event_id)
    append_missing_later(storage, rest, msg.id, msg.conversation_id, ENTRY_REACTION, event_id)  # a big group
    if changed:
        storage.fence_writes([user_id])
    return ReactionOutcome(msg.id, msg.conversation_id, parties, user_id, emoji, op, changed)


def _apply(session, msg: Message, user_id: int, emoji: str, op: str, now_ms: int, key) -> int:
    summary = {e: list(users) for e, users in (msg.reactions or {}).items()}
    if op == ADD:
        if emoji not in summary and len(summary) >= MAX_DISTINCT_EMOJI:
            raise InvalidInput(f"a message takes at most {MAX_DISTINCT_EMOJI} different emoji")
        session.execute(insert(MessageReaction).values(message_id=msg.id, user_id=user_id, emoji=emoji,
                                                       created_at_ms=now_ms))
        summary.setdefault(emoji, []).append(str(user_id))
    else:
        session.execute(delete(MessageReaction).where(*key))
        users = [u for u in summary.get(emoji, []) if u != str(user_id)]
        if users:
            summary[emoji] = users
        else:
            summary.pop(emoji, None)
    msg.reactions = summary or None  # a new object: the JSON column sees the change
    return session.execute(insert(MessageReactionEvent).values(
        message_id=msg.id, user_id=user_id, emoji=emoji, op=op, at_ms=now_ms)).inserted_primary_key[0]


