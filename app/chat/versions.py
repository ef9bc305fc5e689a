"""What `edited` and `reaction` sync entries show: the message_edit and message_reaction_event
rows they point at (sync_entry.ref_id), read in the page's own connection."""
from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.wire import edited_frame, reaction_frame
from models import ENTRY_EDIT, ENTRY_REACTION, STATUS_RECALLED, MessageEdit, MessageReactionEvent


def version_entries(conn, rows) -> tuple[dict[int, dict], dict[int, dict]]:
    """The frames of the page's edit and reaction entries, by ref_id; `rows` carry the message's columns."""
    edit_rows = {row.ref_id: row for row in rows if row.kind == ENTRY_EDIT}
    reaction_rows = {row.ref_id: row for row in rows if row.kind == ENTRY_REACTION}
    edits, reactions = {}, {}
    if edit_rows:
        for edit in conn.execute(select(MessageEdit.id, MessageEdit.content, MessageEdit.edited_at)
                                 .where(MessageEdit.id.in_(list(edit_rows)))).all():
            row = edit_rows[edit.id]
            # A recalled message shows no text, in none of its versions.
            content = "" if row.status == STATUS_RECALLED else edit.content
            edits[edit.id] = edited_frame(row.id, row.conversation_id, content, edit.edited_at)
    if reaction_rows:
        for event in conn.execute(select(MessageReactionEvent).where(
                MessageReactionEvent.id.in_(list(reaction_rows)))).all():
            row = reaction_rows[event.id]
            reactions[event.id] = reaction_frame(row.id, row.conversation_id, event.user_id, event.emoji, event.op)
    return edits, reactions


def forget_versions(session: Session, msg_id: int) -> None:
    """A recalled or removed message keeps no earlier text either."""
    session.execute(update(MessageEdit).where(MessageEdit.message_id == msg_id)
                    .values(content="", previous_content=""))
