"""Uploads: accept, dedupe, grant access, link to messages, purge the unreferenced.

An upload is streamed to a temporary file in the media store (never whole in
memory) while its size is counted and its SHA-256 taken; then its declared
type is checked against its magic bytes, an image is decoded and re-encoded
without metadata (with a WebP thumbnail), and the result is committed under a
key of the uploader and the hash, so the same bytes from the same user are
stored once. Access: the uploader, or anyone who may see (as history shows
it) a message that names the media_id in `extra` and was not recalled;
persist records those links (`media_ref`) in the message's transaction.
"""
from __future__ import annotations

import hashlib
import logging
import re
import time
import unicodedata
from dataclasses import dataclass
from typing import BinaryIO

from sqlalchemy import delete, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.chat.conversations import visible_messages
from app.errors import Forbidden, InvalidInput, NotFound, TooLarge
from app.media.content import IMAGE_TYPES, check_declared_type, clean_image, SNIFF_BYTES
from app.media.store import MediaStore
from app.ratelimit import Limit, take
from app.storage import Storage
from app.wire import parse_id
from models import STATUS_RECALLED, Media, MediaRef, Message

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
MEDIA_MESSAGE_TYPES = ("image", "file")
MAX_FILENAME_CHARS = 255
_UNSAFE_IN_NAME = re.compile(r'[\x00-\x1f\x7f"\\/:*?<>|]')


def clean_filename(raw) -> str | None:
    """A name safe to store and to put in Content-Disposition: the last path part only, no control
    or quoting characters, NFC, at most 255 characters; None when nothing usable is left."""
    if not isinstance(raw, str):
        return None
    name = unicodedata.normalize("NFC", raw).replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in _UNSAFE_IN_NAME.sub("_", name) if unicodedata.category(ch)[0] != "C").strip(" .")
    return name[:MAX_FILENAME_CHARS] or None


def media_answer(media: Media) -> dict:
    """What POST /api/media answers (and the shape a client keeps for a media_id)."""
    return {"media_id": str(media.id), "content_type": media.content_type, "size": media.size,
            "sha256": media.sha256, "width": media.width, "height": media.height,
            "filename": media.filename,
            "thumbnail_url": f"/api/media/{media.id}/thumbnail" if media.has_thumbnail else None}


def accept_upload(storage: Storage, store: MediaStore, user_id: int, declared_type: str, body: BinaryIO,
                  declared_length: int | None, filename: str | None, now_ms: int | None = None) -> Media:
    """Store one upload of this user (see the module docstring); returns its row, an earlier one
    for the same bytes. TooLarge beyond MEDIA_MAX_BYTES or the quota, RateLimited past the
    upload rate, UnsupportedMediaType when the bytes are not of the declared type, InvalidInput
    for a truncated body or an image that does not decode."""
    settings = storage.settings
    limit = settings.media_max_bytes
    if declared_length is not None and declared_length > limit:
        raise TooLarge(f"uploads are at most {limit} bytes (MEDIA_MAX_BYTES); this one declares {declared_length}")
    take(storage, "media-upload", user_id,
         Limit.per_minute(settings.media_upload_rate_per_minute, settings.media_upload_burst), "uploads")
    used = _bytes_used(storage, user_id)
    if used + (declared_length or 0) > settings.media_quota_bytes:
        raise TooLarge(f"this upload does not fit in your quota of {settings.media_quota_bytes} bytes "
                       f"(MEDIA_QUOTA_BYTES; {used} used)")
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    upload = store.temporary()
    try:
        digest, size, head = _receive(body, upload, limit, declared_length)
        if used + size > settings.media_quota_bytes:
            raise TooLarge(f"this upload does not fit in your quota of {settings.media_quota_bytes} bytes "
                           f"(MEDIA_QUOTA_BYTES; {used} used)")
        check_declared_type(declared_type, head)
        existing = _own_copy(storage, user_id, digest)
        if existing is not None:  # the same bytes again: the first copy answers
            return existing
        key = f"u{user_id}/{digest}"
        media = Media(uploader_id=user_id, sha256=digest, content_type=declared_type, size=size, upload_size=size,
                      filename=clean_filename(filename), storage_key=key, created_at_ms=now_ms)
        if declared_type in IMAGE_TYPES:
            _store_image(store, upload, media, settings)
        else:
            store.commit(upload, key)
    finally:
        _discard(store, upload)
    try:
        with storage.session() as session:
            session.add(media)
    except IntegrityError:  # the same bytes committed by a concurrent upload of this user
        existing = _own_copy(storage, user_id, digest)
        if existing is None:
            raise
        return existing
    storage.fence_writes([user_id])  # the uploader fetches it at once, replica or not
    log.info("media %s stored for user %s (%s, %d bytes)", media.id, user_id, media.content_type, media.size)
    return media


def _receive(body: BinaryIO, upload: BinaryIO, limit: int, declared_length: int | None) -> tuple[str, int, bytes]:
    sha, size, head = hashlib.sha256(), 0, b""
    while True:
        chunk = body.read(CHUNK)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:  # a body longer than it said, or one sent without a length
            raise TooLarge(f"uploads are at most {limit} bytes (MEDIA_MAX_BYTES)")
        if len(head) < SNIFF_BYTES:
            head += chunk[:SNIFF_BYTES - len(head)]
        sha.update(chunk)
        upload.write(chunk)
    if declared_length is not None and size < declared_length:
        raise InvalidInput(f"the upload ended after {size} of the {declared_length} bytes it declared")
    upload.flush()
    return sha.hexdigest(), size, head


def _store_image(store: MediaStore, upload: BinaryIO, media: Media, settings) -> None:
    cleaned, thumb = store.temporary(), store.temporary()
    try:
        with open(upload.name, "rb") as source:
            image = clean_image(source, media.content_type, cleaned, thumb, settings.media_max_image_pixels,
                                settings.media_thumbnail_px)
        media.width, media.height, media.has_thumbnail = image.width, image.height, True
        media.size = cleaned.tell()
        store.commit(cleaned, media.storage_key)
        store.commit(thumb, media.storage_key + ".thumb")
    finally:
        _discard(store, cleaned)
        _discard(store, thumb)


def _discard(store: MediaStore, temporary: BinaryIO) -> None:
    discard = getattr(store, "discard", None)
    if discard is not None:
        discard(temporary)


def _bytes_used(storage: Storage, user_id: int) -> int:
    with storage.sessions() as session:
        return int(session.scalar(select(func.coalesce(func.sum(Media.upload_size), 0))
                                  .where(Media.uploader_id == user_id)))


def _own_copy(storage: Storage, user_id: int, digest: str) -> Media | None:
    with storage.sessions() as session:
        return session.scalar(select(Media).where(Media.uploader_id == user_id, Media.sha256 == digest))


def media_for_reader(storage: Storage, user_id: int, media_id: int) -> Media:
    """The media row if this user may read it; NotFound for an unknown id, Forbidden otherwise."""
    with storage.read_session_for(user_id) as session:
        media = session.get(Media, media_id) if 0 < media_id < 2**63 else None
        if media is None:
            raise NotFound(f"media {media_id} does not exist")
        if media.uploader_id == user_id:
            return media
        granted = session.scalar(visible_messages(session, user_id).with_only_columns(Message.id)
                                 .join(MediaRef, MediaRef.message_id == Message.id)
                                 .where(MediaRef.media_id == media_id, Message.status != STATUS_RECALLED).limit(1))
    if granted is None:
        raise Forbidden(f"you may not read media {media_id}: it is in no message you can see")
    return media


@dataclass(frozen=True)
class Attachment:
    media_id: int
    content_type: str
    filename: str | None


def media_id_of(message_type: str, extra: dict | None) -> int | None:
    """The media_id an image or file message names (already checked at the boundary)."""
    if message_type not in MEDIA_MESSAGE_TYPES or not isinstance(extra, dict):
        return None
    try:
        return parse_id(extra.get("media_id"), "extra.media_id")
    except InvalidInput:
        return None


def check_attachment(storage: Storage, sender_id: int, message_type: str, extra: dict) -> Attachment | None:
    """For a `send` of an image or file: extra.media_id must be an upload of the sender
    (InvalidInput when missing or malformed, NotFound when not theirs), of an image type
    for `image`. None for other message types."""
    if message_type not in MEDIA_MESSAGE_TYPES:
        return None
    media_id = parse_id(extra.get("media_id"), "extra.media_id")
    with storage.sessions() as session:
        media = session.get(Media, media_id)
    if media is None or media.uploader_id != sender_id:
        raise NotFound(f"media {media_id} is not one of your uploads")
    if message_type == "image" and media.content_type not in IMAGE_TYPES:
        raise InvalidInput(f"media {media_id} is not an image; send it with message_type 'file'")
    return Attachment(media.id, media.content_type, media.filename)


def link_media(session: Session, messages: list[tuple[int, str, dict | None]]) -> None:
    """Record which stored messages name which media (inside persist's transaction)."""
    rows = [{"media_id": media_id, "message_id": msg_id} for msg_id, message_type, extra in messages
            if (media_id := media_id_of(message_type, extra)) is not None]
    if rows:
        session.execute(insert(MediaRef), rows)


def unlink_media(session: Session, msg_id: int) -> None:
    """A recalled or removed message stops granting access to its media."""
    session.execute(delete(MediaRef).where(MediaRef.message_id == msg_id))


def push_text(storage: Storage, message_type: str, extra: dict | None) -> str | None:
    """What a push shows for an image or file message ("📷 Photo", "📎 <file name>"); None for others."""
    if message_type == "image":
        return "📷 Photo"
    if message_type != "file":
        return None
    media_id = media_id_of(message_type, extra)
    with storage.sessions() as session:
        name = session.scalar(select(Media.filename).where(Media.id == media_id)) if media_id else None
    return f"📎 {name or 'File'}"


def purge_unreferenced(storage: Storage, store: MediaStore, older_than_hours: float, now_ms: int | None = None,
                       batch: int = 500) -> int:
    """Remove uploads no message names that are older than `older_than_hours` (files, then rows);
    at most one batch per call. Returns how many were removed."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    cutoff = now_ms - int(older_than_hours * 3600 * 1000)
    with storage.sessions() as session:
        stale = session.execute(select(Media.id, Media.storage_key).where(
            Media.created_at_ms < cutoff, ~select(MediaRef.media_id).where(MediaRef.media_id == Media.id).exists(),
        ).order_by(Media.id).limit(batch)).all()
    removed = 0
    for media_id, key in stale:
        with storage.session() as session:  # re-checked under the row lock: a send may have linked it meanwhile
            locked = session.scalar(select(Media.id).where(Media.id == media_id).with_for_update())
            linked = session.scalar(select(MediaRef.message_id).where(MediaRef.media_id == media_id).limit(1))
            if locked is None or linked is not None:
                continue
            session.execute(delete(Media).where(Media.id == media_id))
        store.delete(key)
        store.delete(key + ".thumb")
        removed += 1
    if removed:
        log.info("removed %d unreferenced upload(s)", removed)
    return removed
