"""POST /api/media (an upload, streamed) and GET /api/media/{id}[/thumbnail] (bearer token)."""
from __future__ import annotations

from urllib.parse import quote

from flask import Blueprint, current_app, g, jsonify, request, send_file

from app.errors import NotFound
from app.http import settings, storage
from app.http.chat import require_user
from app.http.requests import MediaUpload
from app.media.content import IMAGE_TYPES
from app.media.uploads import accept_upload, media_answer, media_for_reader

bp = Blueprint("media", __name__, url_prefix="/api")


def media_store():
    return current_app.extensions["netherlink.media_store"]


@bp.post("/media")
@require_user
def upload():
    req = MediaUpload.parse(request.args, request.mimetype, request.content_length)
    media = accept_upload(storage(), media_store(), g.user_id, req.content_type, request.stream,
                          req.declared_length, req.filename)
    return jsonify(media_answer(media)), 201


@bp.get("/media/<int:media_id>")
@require_user
def download(media_id: int):
    media = media_for_reader(storage(), g.user_id, media_id)
    return _serve(media.storage_key, media.content_type, f'"m{media.id}"', media.filename,
                  inline=media.content_type in IMAGE_TYPES)


@bp.get("/media/<int:media_id>/thumbnail")
@require_user
def thumbnail(media_id: int):
    media = media_for_reader(storage(), g.user_id, media_id)
    if not media.has_thumbnail:
        raise NotFound(f"media {media_id} has no thumbnail (it is not an image)")
    name = f"{media.filename.rsplit('.', 1)[0]}.webp" if media.filename else None
    return _serve(media.storage_key + ".thumb", "image/webp", f'"m{media.id}t"', name, inline=True)


def _serve(key: str, content_type: str, etag: str, filename: str | None, inline: bool):
    """The bytes (Range, If-None-Match), or with MEDIA_ACCEL_REDIRECT_PREFIX an empty answer whose
    X-Accel-Redirect has nginx send them; either way private, typed, never sniffed, never run."""
    prefix = settings().media_accel_redirect_prefix
    if request.if_none_match.contains(etag.strip('"')):
        response = current_app.response_class(status=304)
    elif prefix:
        response = current_app.response_class(mimetype=content_type)
        response.headers["X-Accel-Redirect"] = prefix.rstrip("/") + "/" + key
    else:
        response = send_file(media_store().path(key), mimetype=content_type, conditional=True, etag=False)
    response.headers["Content-Disposition"] = _disposition(filename, inline)
    response.set_etag(etag.strip('"'))
    response.headers["Cache-Control"] = "private, max-age=86400"
    response.headers["X-Content-Type-Options"] = "nosniff"
    # A polyglot that a browser might still run as a page is sandboxed, without scripts.
    response.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return response


def _disposition(filename: str | None, inline: bool) -> str:
    """RFC 6266: an ASCII fallback and the UTF-8 name (clean_filename left no quote or path in it)."""
    kind = "inline" if inline else "attachment"
    if not filename:
        return kind
    ascii_name = filename.encode("ascii", "replace").decode().replace("?", "_")
    return f"{kind}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"
