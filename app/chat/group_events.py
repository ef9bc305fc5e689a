"""Group events: a change to a group reaches the affected users live and in their streams.

Each change (creation, members added or removed, leaving, renames, role
changes, deletion) is one `group_event` row, written in the transaction of the
change itself, under the group row lock, with one ENTRY_GROUP_EVENT entry per
affected user appended by append_entries: the stream numbering of app.chat.sync
keeps every stream gap-free, and the event commits exactly when the change
does (a change that changes nothing writes no event). After commit the
`group_event` frame goes to every live connection of the same users.

Who is affected: the members after the change plus the users it removed (a
removed member learns at once and finds the entry in their stream).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.chat.delivery import deliver_frames, by_gateway
from app.chat.presence import Presence
from app.chat.sync import append_entries
from app.storage import Storage
from app.wire import group_event_frame
from models import ENTRY_GROUP_EVENT, GroupEvent

log = logging.getLogger(__name__)

CREATED, MEMBER_ADDED, MEMBER_REMOVED = "created", "member_added", "member_removed"
RENAMED, ROLE_CHANGED, DELETED = "renamed", "role_changed", "deleted"


@dataclass(frozen=True)
class Announcement:
    """A committed event's frame and the users it goes to."""
    frame: dict
    user_ids: list[int]


def record_event(session: Session, is_mysql: bool, group_id: int, event: str, actor_id: int | None,
                 user_ids, recipients, name: str | None = None, role: str | None = None) -> Announcement:
    """Store the event and its stream entries in the caller's transaction (which holds the group lock)."""
    row = GroupEvent(group_id=group_id, event=event, actor_id=actor_id, user_ids=sorted(set(user_ids)),
                     name=name, role=role, timestamp=int(time.time() * 1000))
    session.add(row)
    session.flush()  # its id is the entries' message_id
    recipients = sorted(set(recipients))
    append_entries(session, is_mysql, [(recipients, row.id, f"g_{group_id}")], kind=ENTRY_GROUP_EVENT)
    return Announcement(group_event_frame(row), recipients)


def announce(storage: Storage, announcements: list[Announcement]) -> None:
    """After commit: each event to every live connection of its users, in order, in one round trip.

    Redis trouble loses only the live copy (the entries are committed): logged, not raised,
    so the REST change that made them still answers its success.
    """
    if not announcements:
        return
    try:
        presence = Presence(storage.redis, storage.settings.presence_ttl_seconds)
        live = presence.live_connections(sorted({uid for a in announcements for uid in a.user_ids}))
        deliver_frames(storage.redis, [
            (a.frame, by_gateway(conn for uid in a.user_ids for conn in live.get(uid, ()))) for a in announcements])
    except Exception as exc:  # noqa: BLE001 - the stream has the events; clients catch up by sync
        log.warning("group events %s not delivered live: %s",
                    [a.frame["event_id"] for a in announcements], exc.__class__.__name__)
        return
    for a in announcements:
        log.info("group %s event %s (%s) announced to %d users", a.frame["group_id"], a.frame["event_id"],
                 a.frame["event"], len(a.user_ids))
