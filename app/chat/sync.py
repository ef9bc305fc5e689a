"""A user's sync stream: gap-free, in commit order, paged by an opaque cursor.

Each entry has a per-user sequence number assigned while the user's row is
locked in the writing transaction, so number N+1 cannot exist before N is
committed: reading "after N" never skips a message that commits late.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from sqlalchemy import case, func, insert, select, update
from sqlalchemy.orm import Session

from app.errors import InvalidInput
from app.chat.versions import version_entries
from app.wire import group_event_frame, recalled_frame, receipt_frame
from models import (
    ENTRY_EDIT, ENTRY_GROUP_EVENT, ENTRY_MESSAGE, ENTRY_REACTION, ENTRY_RECALL, ENTRY_RECEIPT, RECEIPT_KINDS,
    GroupEvent, Message, OfflineMessageIndex, Receipt, SyncEntry, User,
)

DEFAULT_LIMIT, MAX_LIMIT = 100, 500
# Entries whose message_id points at another table's row (ids of two tables may be equal).
_NOT_MESSAGES = (ENTRY_RECEIPT, ENTRY_GROUP_EVENT)
_MESSAGE_COLUMNS = [c for c in Message.__table__.c if c.name != "created_at"]


def next_stream_seqs(session: Session, is_mysql: bool, counts) -> dict[int, int]:
    """Take each user's next sequence number(s); holds the user rows' locks until commit.

    `counts`: user ids (one number each) or {user id: how many}. Returns each
    user's highest new number; a user's numbers are that and the ones below.
    One UPDATE locks the rows in primary-key order, the one lock order every
    writer uses, so concurrent writers queue instead of deadlocking.
    """
    counts = counts if isinstance(counts, dict) else dict.fromkeys(counts, 1)
    if not counts:
        return {}
    ids = sorted(counts)
    step = 1 if set(counts.values()) == {1} else case(counts, value=User.id)
    bump = update(User).where(User.id.in_(ids)).values(inbox_seq=User.inbox_seq + step)
    if not is_mysql:
        return {uid: seq for uid, seq in session.execute(bump.returning(User.id, User.inbox_seq)).all()}
    session.execute(bump)
    # A locking read returns the values this transaction just wrote.
    return {uid: seq for uid, seq in session.execute(
        select(User.id, User.inbox_seq).where(User.id.in_(ids)).with_for_update()).all()}


def append_entries(session: Session, is_mysql: bool, items, kind: int = ENTRY_MESSAGE,
                   ref_id: int = 0) -> list[dict[int, int]]:
    """Stream entries of messages, (user ids, msg id, conversation id) each, in this order
    in every stream, with one sequence bump per user; returns each message's positions
    (deleted users, who have no stream, left out). `ref_id`: the edit or reaction event
    an ENTRY_EDIT / ENTRY_REACTION entry stands for."""
    items = [(sorted(set(user_ids)), msg_id, conversation_id) for user_ids, msg_id, conversation_id in items]
    counts = Counter(uid for user_ids, _, _ in items for uid in user_ids)
    tops = next_stream_seqs(session, is_mysql, dict(counts))
    following = {uid: top - counts[uid] + 1 for uid, top in tops.items()}
    rows, positions = [], []
    for user_ids, msg_id, conversation_id in items:
        seqs = {}
        for uid in user_ids:
            if uid in following:  # deleted users have no stream
                seqs[uid] = following[uid]
                following[uid] += 1
                rows.append({"user_id": uid, "seq": seqs[uid], "message_id": msg_id,
                             "conversation_id": conversation_id, "kind": kind, "ref_id": ref_id})
        positions.append(seqs)
    if rows:
        session.execute(insert(SyncEntry), rows)
    return positions


def entries_of(session: Session, msg_id: int, kind: int, user_ids=None, ref_id: int | None = None) -> dict[int, int]:
    """Users whose stream holds this entry, with its position."""
    query = select(SyncEntry.user_id, SyncEntry.seq).where(SyncEntry.message_id == msg_id, SyncEntry.kind == kind)
    if ref_id is not None:
        query = query.where(SyncEntry.ref_id == ref_id)
    if user_ids is not None:
        query = query.where(SyncEntry.user_id.in_(list(user_ids)))
    return {uid: seq for uid, seq in session.execute(query).all()}


def append_missing(session: Session, storage, user_ids: list[int], msg_id: int, conversation_id: str, kind: int,
                   ref_id: int | None = None) -> list[int]:
    """Entries of this kind (and ref) for the users whose streams lack one: the first
    GROUP_FANOUT_CHUNK in the caller's transaction. Returns the others, for
    `append_missing_later` once that transaction committed. Safe to redo (a retry completes
    what an interrupted attempt left undone)."""
    done = entries_of(session, msg_id, kind, user_ids, ref_id=ref_id)
    missing = [uid for uid in user_ids if uid not in done]
    chunk = storage.settings.group_fanout_chunk
    if missing[:chunk]:
        append_entries(session, storage.is_mysql, [(missing[:chunk], msg_id, conversation_id)], kind=kind,
                       ref_id=ref_id or 0)
    return missing[chunk:]


def append_missing_later(storage, user_ids: list[int], msg_id: int, conversation_id: str, kind: int,
                         ref_id: int | None = None) -> None:
    """The rest of `append_missing` (a big group), in transactions of at most GROUP_FANOUT_CHUNK users."""
    chunk = storage.settings.group_fanout_chunk
    for start in range(0, len(user_ids), chunk):
        with storage.session() as session:
            append_missing(session, storage, user_ids[start:start + chunk], msg_id, conversation_id, kind, ref_id)


def parse_cursor(cursor) -> int:
    if cursor is None:
        return 0
    if isinstance(cursor, str) and cursor.isascii() and cursor.isdigit() and len(cursor) <= 19 \
            and int(cursor) < 2**63:
        return int(cursor)
    raise InvalidInput("'cursor' must be null or a cursor this server returned")


LATEST = "latest"  # the sync cursor meaning "the current end of my stream"


def stream_end(storage, user_id: int) -> str:
    """The cursor after the user's last committed entry: a sync from it gets only newer entries.

    Read on the primary: every entry up to it is committed there (numbers are given
    under the user row lock), and a lagging replica read from it later just waits for them.
    """
    with storage.sessions() as session:
        return str(session.scalar(select(func.max(SyncEntry.seq)).where(SyncEntry.user_id == user_id)) or 0)


def parse_limit(limit) -> int:
    if limit is None:
        return DEFAULT_LIMIT
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidInput(f"'limit' must be a whole number from 1 to {MAX_LIMIT}")
    return min(limit, MAX_LIMIT)


@dataclass
class SyncPage:
    entries: list[dict]
    cursor: str
    has_more: bool


def read_stream(storage, user_id: int, after: int, limit: int, frame_of) -> SyncPage:
    """Entries after position `after`; marks offline-index rows of returned messages synced."""
    # Plain rows, not ORM objects: a 500-entry page is the hot path of a reconnect.
    with storage.reader(user_id).connect() as conn:
        # Entries of other kinds point at other rows: no message joins them (ids of two tables may be equal).
        rows = conn.execute(
            select(SyncEntry.seq, SyncEntry.kind, SyncEntry.message_id.label("entry_ref"), SyncEntry.ref_id,
                   *_MESSAGE_COLUMNS)
            .outerjoin(Message, (Message.id == SyncEntry.message_id) & SyncEntry.kind.notin_(_NOT_MESSAGES))
            .where(SyncEntry.user_id == user_id, SyncEntry.seq > after)
            .order_by(SyncEntry.seq).limit(limit + 1)).all()
        has_more = len(rows) > limit
        rows = rows[:limit]
        receipt_ids = [row.entry_ref for row in rows if row.kind == ENTRY_RECEIPT]
        receipts = {r.id: r for r in conn.execute(select(Receipt).where(Receipt.id.in_(receipt_ids)))} \
            if receipt_ids else {}
        events = _group_event_frames(conn, [row.entry_ref for row in rows if row.kind == ENTRY_GROUP_EVENT])
        edits, reactions = version_entries(conn, rows)  # the edits and reaction events the page names
    entries = []
    for row in rows:
        if row.kind == ENTRY_RECEIPT:
            r = receipts.get(row.entry_ref)
            if r is not None:
                entries.append(receipt_frame(r.conversation_id, r.reader_id, r.msg_id, RECEIPT_KINDS[r.kind],
                                             r.created_at_ms))
        elif row.kind == ENTRY_GROUP_EVENT:
            entries.append(events[row.entry_ref])
        elif row.kind == ENTRY_RECALL:
            entries.append(recalled_frame(row.id, row.conversation_id, row.recalled_at, row.recalled_by))
        elif row.kind in (ENTRY_EDIT, ENTRY_REACTION):
            entry = (edits if row.kind == ENTRY_EDIT else reactions).get(row.ref_id)
            if entry is not None:  # (its row is never deleted; a page must not fail if one were)
                entries.append(entry)
        else:
            entries.append(frame_of(row))
    position = rows[-1].seq if rows else after
    _mark_offline_index_synced(storage, user_id, position)
    return SyncPage(entries, str(position), has_more)


def _group_event_frames(conn, event_ids: list[int]) -> dict[int, dict]:
    """The `group_event` entries of a page, by event id (app.chat.group_events writes them)."""
    if not event_ids:
        return {}
    return {row.id: group_event_frame(row) for row in conn.execute(
        select(*GroupEvent.__table__.c).where(GroupEvent.id.in_(sorted(set(event_ids))))).all()}


def _mark_offline_index_synced(storage, user_id: int, position: int) -> None:
    """Index rows of every message up to `position` are delivered, including rows
    that dispatch wrote after the message was already synced."""
    with storage.sessions() as session:  # a read first: most pages have nothing to mark
        if session.scalar(select(OfflineMessageIndex.id).where(
                OfflineMessageIndex.user_id == user_id, OfflineMessageIndex.synced.is_(False)).limit(1)) is None:
            return
    delivered = select(SyncEntry.seq).where(
        SyncEntry.user_id == user_id, SyncEntry.message_id == OfflineMessageIndex.message_id,
        SyncEntry.kind == ENTRY_MESSAGE, SyncEntry.seq <= position).exists()
    with storage.session() as session:
        session.execute(update(OfflineMessageIndex).where(
            OfflineMessageIndex.user_id == user_id, OfflineMessageIndex.synced.is_(False), delivered)
            .values(synced=True, synced_at=func.now()))
