"""SQLAlchemy 2.x models: the storage layer.

Tables keep the seed's names, columns and meanings (docs/schema.md lists the
deliberate changes). Every table is utf8mb4 on MySQL so emoji round-trip.
Times that travel on the wire are integer milliseconds since the epoch.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    case,
    func,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments INTEGER PRIMARY KEY; MySQL gets BIGINT.
AutoId = BigInteger().with_variant(Integer, "sqlite")


def ExactString(length: int):
    """VARCHAR compared byte for byte: "abc" and "ABC" are different client ids or tokens."""
    return String(length).with_variant(mysql.VARCHAR(length, collation="utf8mb4_bin"), "mysql")


MYSQL_TABLE_ARGS = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_unicode_ci"}

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
}

# Message status values (seed: 0 unread, 1 read, 2 recalled).
STATUS_UNREAD, STATUS_READ, STATUS_RECALLED = 0, 1, 2


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class User(Base):
    __tablename__ = "user"
    __table_args__ = (MYSQL_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    # Last sequence number of this user's sync stream; bumped under the row lock in commit order.
    inbox_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    disabled_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # ms; set: no login, no token works
    # ms; set: the account was deleted (app.accounts.deletion): username is "deleted-<id>", no login, no token
    deleted_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Who may see this user's presence (app.accounts.privacy): everyone / contacts / nobody.
    presence_visibility: Mapped[str] = mapped_column(String(16), default="everyone", server_default="everyone")
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())


DELETED_USER_NAME = "deleted user"
# The name pushes and digests show for a sender: the username, or "deleted user" for a deleted account.
USER_DISPLAY_NAME = case((User.deleted_at.is_not(None), DELETED_USER_NAME), else_=User.username)


class Message(Base):
    __tablename__ = "message"
    __table_args__ = (
        UniqueConstraint("sender_id", "client_msg_id"),  # the durable duplicate guard
        Index("idx_conversation", "conversation_id", "timestamp"),
        Index("idx_receiver", "receiver_id", "status"),
        Index("idx_sender", "sender_id", "timestamp"),
        Index("idx_conversation_msg", "conversation_id", "id"),  # history pages and unread counts by id
        MYSQL_TABLE_ARGS,
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)  # snowflake from the gateway
    conversation_id: Mapped[str] = mapped_column(String(100))
    sender_id: Mapped[int] = mapped_column(BigInteger)
    receiver_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # NULL for group messages
    group_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    client_msg_id: Mapped[str] = mapped_column(ExactString(64))
    message_type: Mapped[str] = mapped_column(String(20), default="text", server_default="text")
    content: Mapped[str] = mapped_column(Text)
    extra: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    is_group: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    timestamp: Mapped[int] = mapped_column(BigInteger)  # ms since epoch, assigned at the gateway
    status: Mapped[int] = mapped_column(SmallInteger, default=STATUS_UNREAD, server_default="0")
    recalled_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # ms
    # Who removed the content: "sender", "owner" (a group's owner) or "admin"; NULL on rows recalled before 0014.
    recalled_by: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # Group messages: the group's sequence number, taken under the group row lock in
    # commit order; membership bounds (joined_seq, left_seq] say who may see it.
    group_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # The message this one answers (same conversation, visible to the sender when sent; 0016).
    reply_to_msg_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Group messages: the mentioned members' ids as strings, deduplicated; NULL when none (0016).
    mentions: Mapped[list | None] = mapped_column(JSON, nullable=True)
    edited_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # ms of the latest edit; NULL: never
    # {emoji: [user id string, …]} in order of reacting: a summary of message_reaction kept in the
    # same transaction (app.chat.reactions), so frames, sync and history need no second query.
    reactions: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())


class MessageSearch(Base):
    """The search index of one message (app.chat.search): hash tokens of its words and CJK
    bigrams. FULLTEXT-indexed on MySQL; on SQLite mirrored into the FTS5 table
    message_search_fts by triggers (migration 0008). No row: nothing to find."""

    __tablename__ = "message_search"
    __table_args__ = (MYSQL_TABLE_ARGS,)  # the FULLTEXT index / FTS5 table: migration 0008 (per dialect)

    message_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    terms: Mapped[str] = mapped_column(Text)


class Media(Base):
    """One stored upload (app.media): the bytes live in the media store under `storage_key`
    (and `storage_key` + ".thumb" for an image's thumbnail), never in the database."""

    __tablename__ = "media"
    __table_args__ = (
        UniqueConstraint("uploader_id", "sha256"),  # the same bytes from the same user are stored once
        Index("idx_media_created", "created_at_ms"),
        MYSQL_TABLE_ARGS,
    )

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)  # the wire's media_id
    uploader_id: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(ExactString(64))  # of the bytes as uploaded
    content_type: Mapped[str] = mapped_column(String(100))  # of the stored bytes
    size: Mapped[int] = mapped_column(BigInteger)  # stored bytes (an image after re-encoding)
    upload_size: Mapped[int] = mapped_column(BigInteger)  # bytes as uploaded: what the quota counts
    filename: Mapped[str | None] = mapped_column(String(255), nullable=True)  # sanitised
    width: Mapped[int | None] = mapped_column(Integer, nullable=True)
    height: Mapped[int | None] = mapped_column(Integer, nullable=True)
    has_thumbnail: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    storage_key: Mapped[str] = mapped_column(String(128))
    created_at_ms: Mapped[int] = mapped_column(BigInteger)


class MediaRef(Base):
    """A message naming a media_id in `extra`: what grants others access and keeps an upload."""

    __tablename__ = "media_ref"
    __table_args__ = (Index("idx_media_ref_message", "message_id"), MYSQL_TABLE_ARGS)

    media_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    message_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)


class Conversation(Base):
    """One row per (user, conversation): the user's conversation list."""

    __tablename__ = "conversation"
    __table_args__ = (
        UniqueConstraint("user_id", "conversation_id", name="uk_user_conversation"),
        Index("idx_user", "user_id", "updated_at"),
        Index("idx_conversation_members", "conversation_id"),
        MYSQL_TABLE_ARGS,
    )

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(String(100))
    user_id: Mapped[int] = mapped_column(BigInteger)
    target_id: Mapped[int] = mapped_column(BigInteger)  # the peer, or the group
    is_group: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    last_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_message_time: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_msg_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_read_msg_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # this user's read position
    # The furthest any of this user's devices confirmed holding (`received`, or a read).
    last_delivered_msg_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now(), onupdate=func.now())


ENTRY_MESSAGE, ENTRY_RECALL = 0, 1
ENTRY_EDIT, ENTRY_REACTION = 2, 3  # ref_id: the message_edit / message_reaction_event row
ENTRY_GROUP_EVENT = 4  # sync_entry.message_id is a group_event id
ENTRY_RECEIPT = 5  # message_id holds a Receipt's id
RECEIPT_DELIVERED, RECEIPT_READ = 1, 2
RECEIPT_KINDS = {RECEIPT_DELIVERED: "delivered", RECEIPT_READ: "read"}


class Receipt(Base):
    """A reader's position moved (delivered or read): what the peer's `receipt` entry shows."""

    __tablename__ = "receipt"
    __table_args__ = (Index("idx_receipt_conversation", "conversation_id", "msg_id"), MYSQL_TABLE_ARGS)

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(String(100))
    reader_id: Mapped[int] = mapped_column(BigInteger)
    msg_id: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[int] = mapped_column(SmallInteger)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)


class SyncEntry(Base):
    """One user's sync stream: every message of every conversation they are in
    (their own included), and recall events, numbered in commit order."""

    __tablename__ = "sync_entry"
    __table_args__ = (
        UniqueConstraint("user_id", "message_id", "kind", "ref_id"),
        Index("idx_sync_message", "message_id"),
        MYSQL_TABLE_ARGS,
    )

    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    message_id: Mapped[int] = mapped_column(BigInteger)
    conversation_id: Mapped[str] = mapped_column(String(100))
    kind: Mapped[int] = mapped_column(SmallInteger, default=ENTRY_MESSAGE, server_default="0")  # ENTRY_*
    # Which edit or reaction event (a message has several of each); 0 for messages and recalls.
    ref_id: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())


class OfflineMessageIndex(Base):
    __tablename__ = "offline_message_index"
    __table_args__ = (
        UniqueConstraint("user_id", "message_id"),  # makes dispatch redelivery harmless
        Index("idx_user_synced", "user_id", "synced", "created_at"),
        Index("idx_offline_message", "message_id"),
        MYSQL_TABLE_ARGS,
    )

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(BigInteger)
    message_id: Mapped[int] = mapped_column(BigInteger)
    conversation_id: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    synced: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    synced_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class PushLog(Base):
    """One row per push target (device or email) per message."""

    __tablename__ = "push_log"
    __table_args__ = (
        UniqueConstraint("message_id", "user_id", "target"),  # send_push redelivery writes no second row
        Index("idx_user_status", "user_id", "push_status"),
        Index("idx_push_message", "message_id"),
        MYSQL_TABLE_ARGS,
    )

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(BigInteger)
    message_id: Mapped[int] = mapped_column(BigInteger)
    push_type: Mapped[str] = mapped_column(String(20))  # apns / fcm / email
    push_status: Mapped[str] = mapped_column(String(20))  # pending / success / failed
    target: Mapped[str] = mapped_column(String(64))  # "device:<id>" or "email"
    device_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    priority: Mapped[int] = mapped_column(SmallInteger, default=5, server_default="5")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    push_time: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    error_msg: Mapped[str | None] = mapped_column(Text, nullable=True)
    # What was (or will be) sent, so an admin retry re-sends exactly this.
    payload: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    provider_id: Mapped[str | None] = mapped_column(String(128), nullable=True)  # apns-id / FCM message name
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now(), onupdate=func.now())


class Device(Base):
    __tablename__ = "device"
    __table_args__ = (Index("idx_device_user", "user_id"), MYSQL_TABLE_ARGS)

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(BigInteger)
    platform: Mapped[str] = mapped_column(String(16))  # ios / android / web / webpush
    token: Mapped[str] = mapped_column(ExactString(255), unique=True)  # webpush: "webpush:<sha256 of endpoint>"
    # webpush only: {"endpoint", "p256dh", "auth"} (an endpoint may be longer than a token column)
    subscription: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now(), onupdate=func.now())


class PushSetting(Base):
    __tablename__ = "push_setting"
    __table_args__ = (MYSQL_TABLE_ARGS,)

    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    channels: Mapped[list] = mapped_column(JSON)  # subset of ["apns", "fcm", "email"]
    email: Mapped[str | None] = mapped_column(String(255), nullable=True)
    muted_conversations: Mapped[list] = mapped_column(JSON)
    dnd_start: Mapped[str | None] = mapped_column(String(5), nullable=True)  # "22:00", user's local time
    dnd_end: Mapped[str | None] = mapped_column(String(5), nullable=True)
    time_zone: Mapped[str] = mapped_column(String(64), default="UTC", server_default="UTC")
    preview: Mapped[bool] = mapped_column(Boolean, default=True, server_default="1")
    # Email verification (app.push.email_verification): the digest goes out only once `email` was confirmed.
    email_verified_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # ms; NULL: unconfirmed
    email_code_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)  # sha256 of the pending code
    email_code_expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # ms
    email_code_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    updated_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now(), onupdate=func.now())


class ChatGroup(Base):
    __tablename__ = "chat_group"
    __table_args__ = (MYSQL_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100))
    owner_id: Mapped[int] = mapped_column(BigInteger)
    # Last group_seq given to a message; sends and membership changes both take this row's lock.
    msg_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    deleted_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # ms; a deleted group is in no list


class GroupEvent(Base):
    """A change to a group (app.chat.group_events): the `group_event` frame and sync entry."""

    __tablename__ = "group_event"
    __table_args__ = (Index("idx_group_event_group", "group_id", "id"), MYSQL_TABLE_ARGS)

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    group_id: Mapped[int] = mapped_column(BigInteger)
    event: Mapped[str] = mapped_column(String(16))  # created, member_added, member_removed, renamed, ...
    actor_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    user_ids: Mapped[list | None] = mapped_column(JSON, nullable=True)  # the users the event is about
    name: Mapped[str | None] = mapped_column(String(100), nullable=True)  # the group's name after it
    role: Mapped[str | None] = mapped_column(String(16), nullable=True)  # role_changed: the new role
    timestamp: Mapped[int] = mapped_column(BigInteger)  # ms


class GroupMember(Base):
    __tablename__ = "group_member"
    __table_args__ = (
        UniqueConstraint("group_id", "user_id"),
        Index("idx_member_user", "user_id"),
        MYSQL_TABLE_ARGS,
    )

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    group_id: Mapped[int] = mapped_column(BigInteger)
    user_id: Mapped[int] = mapped_column(BigInteger)
    role: Mapped[str] = mapped_column(String(16), default="member", server_default="member")  # owner/admin/member
    joined_at: Mapped[int] = mapped_column(BigInteger)  # ms, latest join
    # The member sees messages with joined_seq < group_seq <= left_seq (left_seq NULL: still a member).
    joined_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    left_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    left_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # ms


class UserBlock(Base):
    """`blocker_id` blocked `blocked_id` (app.accounts.blocks): no private sends from the blocked
    user to the blocker, no adding the blocker to groups, no presence of the blocker."""

    __tablename__ = "user_block"
    __table_args__ = (Index("idx_block_blocked", "blocked_id"), MYSQL_TABLE_ARGS)

    blocker_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    blocked_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)


class UsernameReservation(Base):
    """A deleted account's former username, kept from registration until `until_ms`
    (USERNAME_REUSE_DAYS after the deletion)."""

    __tablename__ = "username_reservation"
    __table_args__ = (MYSQL_TABLE_ARGS,)

    username: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger)
    until_ms: Mapped[int] = mapped_column(BigInteger)


class AuditEntry(Base):
    """One administrative action (app.accounts.audit): who, what, on what, when; never secrets."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("idx_audit_at", "at_ms"), MYSQL_TABLE_ARGS)

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    at_ms: Mapped[int] = mapped_column(BigInteger)
    actor_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # NULL: the operator's CLI
    actor: Mapped[str] = mapped_column(String(16))  # admin / operator / user
    action: Mapped[str] = mapped_column(String(64))  # e.g. user.disabled, message.removed
    target_type: Mapped[str] = mapped_column(String(32))  # user / message / push
    target_id: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class AuthSession(Base):
    """One login (app.accounts.sessions): its access tokens carry `sid` = id; revoked_at_ms set
    means every token of it is refused and its sockets are closed."""

    __tablename__ = "auth_session"
    __table_args__ = (Index("idx_auth_session_user", "user_id"), MYSQL_TABLE_ARGS)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    last_used_at_ms: Mapped[int] = mapped_column(BigInteger)
    revoked_at_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    revoked_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)  # logout / reuse / password …
    user_agent: Mapped[str | None] = mapped_column(String(255), nullable=True)
    ip: Mapped[str | None] = mapped_column(String(64), nullable=True)


class AuthRefresh(Base):
    """A refresh token of a session, by its sha256 (the token itself is never stored); used once."""

    __tablename__ = "auth_refresh"
    __table_args__ = (Index("idx_auth_refresh_session", "session_id"), MYSQL_TABLE_ARGS)

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(32))
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    expires_at_ms: Mapped[int] = mapped_column(BigInteger)
    used_at_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # rotated: reuse revokes the session


# Emoji compared byte for byte: utf8mb4_unicode_ci holds many different emoji equal.
EmojiString = String(32).with_variant(mysql.VARCHAR(32, collation="utf8mb4_bin"), "mysql")


class MessageEdit(Base):
    """One edit of a message (app.chat.edits): the content it set and the one it replaced,
    kept for the sender and admins; an `edited` sync entry points at it."""

    __tablename__ = "message_edit"
    __table_args__ = (Index("idx_edit_message", "message_id", "id"), MYSQL_TABLE_ARGS)

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(BigInteger)
    editor_id: Mapped[int] = mapped_column(BigInteger)
    edited_at: Mapped[int] = mapped_column(BigInteger)  # ms
    content: Mapped[str] = mapped_column(Text)
    previous_content: Mapped[str] = mapped_column(Text)


class MessageReaction(Base):
    """A user's reaction with one emoji to one message (app.chat.reactions)."""

    __tablename__ = "message_reaction"
    __table_args__ = (MYSQL_TABLE_ARGS,)

    message_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    emoji: Mapped[str] = mapped_column(EmojiString, primary_key=True)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)


class MessageReactionEvent(Base):
    """One reaction added or removed: what a `reaction` sync entry shows."""

    __tablename__ = "message_reaction_event"
    __table_args__ = (Index("idx_reaction_event_message", "message_id"), MYSQL_TABLE_ARGS)

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(BigInteger)
    user_id: Mapped[int] = mapped_column(BigInteger)
    emoji: Mapped[str] = mapped_column(EmojiString)
    op: Mapped[str] = mapped_column(String(8))  # add / remove
    at_ms: Mapped[int] = mapped_column(BigInteger)
