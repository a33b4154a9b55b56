"""Request bodies -> uploads: a bounded read, then the body by its content type.

* raw body, ``Content-Type: image/*`` or ``application/octet-stream``: one image;
* ``multipart/form-data``: every part with a file name is an image (a batch when several);
  parsed with the standard library's ``email`` parser (no extra dependency);
* ``application/json``: :class:`~.schema.BatchRequest`, images as base64.

Every refusal is an :class:`~.errors.ApiError` naming what was wrong: 400 unreadable, 413 too
large, 415 wrong content type, 422 a JSON body of the wrong shape.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import ValidationError

from .errors import ApiError
from .schema import BatchRequest

ACCEPTED = (
    "image/* (the raw image file), multipart/form-data (file parts) or application/json (a batch of base64 images)"
)


@dataclass(frozen=True)
class Upload:
    """One image of a request: the name it is reported under and its encoded bytes."""

    name: str
    data: bytes


def media_type(content_type: str | None) -> str:
    """``"image/png; charset=x"`` -> ``"image/png"`` (lower case; ``""`` when absent)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


async def read_body(chunks: AsyncIterator[bytes], content_length: str | None, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes.

    A ``Content-Length`` over the limit is refused before a byte of the body is read; a body that
    turns out longer (chunked transfer, or a wrong header) is refused once ``limit`` bytes arrived,
    so at most ``limit`` bytes (plus one chunk) are ever held.

    Raises:
        ApiError: 413 ``body_too_large`` naming ``max_body_bytes``; 400 ``bad_content_length``.
    """
    if content_length is not None:
        try:
            declared = int(content_length)
            if declared < 0:
                raise ValueError
        except ValueError:
            raise ApiError(
                400, "bad_content_length", f"Content-Length {content_length!r} is not a byte count"
            ) from None
        if declared > limit:
            raise _too_large(declared, limit)
    parts, total = [], 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise _too_large(None, limit)
        parts.append(chunk)
    return b"".join(parts)


def _too_large(size: int | None, limit: int) -> ApiError:
    said = f"has {size:,} bytes, more than" if size is not None else "is longer than"
    return ApiError(
        413,
        "body_too_large",
        f"the request body {said} the limit max_body_bytes={limit:,} (send fewer or smaller images per request)",
        limit=("max_body_bytes", size, limit),
    )


def parse_uploads(content_type: str | None, body: bytes, name: str | None, max_images: int) -> list[Upload]:
    """The images of a request body, by its ``content_type``.

    Args:
        content_type: the request's ``Content-Type`` header.
        body: the whole body (already bounded by :func:`read_body`).
        name: the ``name`` query parameter: the label of a raw-body image (default ``upload``).
        max_images: most images one request may hold.

    Returns:
        The uploads in the order sent (not yet decoded: decoding checks the images themselves).

    Raises:
        ApiError: 415 unsupported content type; 400 empty body, bad JSON, bad base64, multipart without
            a file part; 413 more than ``max_images`` images; 422 a JSON body not shaped as a batch.
    """
    mt = media_type(content_type)
    if mt.startswith("image/") or mt == "application/octet-stream":
        if not body:
            raise ApiError(400, "empty_image", "empty body (expected the bytes of an image file)")
        return [Upload(name or "upload", body)]
    if mt == "application/json":
        return _json_uploads(body, max_images)
    if mt == "multipart/form-data":
        return _multipart_uploads(content_type or "", body, max_images)
    said = f"Content-Type {mt!r}" if mt else "no Content-Type"
    raise ApiError(
        415,
        "unsupported_media_type",
        f"{said}: send {ACCEPTED}; e.g. curl -H 'Content-Type: image/png' --data-binary @part.png",
    )


def _check_count(n: int, max_images: int) -> None:
    if n > max_images:
        raise ApiError(
            413,
            "batch_too_large",
            f"{n} images in one request, more than the limit max_batch_images={max_images} (split the batch)",
            limit=("max_batch_images", n, max_images),
        )


def _json_uploads(body: bytes, max_images: int) -> list[Upload]:
    if not body:
        raise ApiError(400, "bad_json", 'empty JSON body (expected {"images": [{"data": "<base64>", "name": ...}]})')
    try:
        req = BatchRequest.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        kind, status = ("bad_json", 400) if first["type"] == "json_invalid" else ("invalid_request", 422)
        raise ApiError(
            status,
            kind,
            f"JSON body: {where + ': ' if where else ''}{first['msg']} (expected "
            '{"images": [{"data": "<base64 of an image file>", "name": "optional"}]})',
        ) from None
    _check_count(len(req.images), max_images)
    out = []
    for i, item in enumerate(req.images):
        label = item.name or f"images[{i}]"
        text = item.data.strip()
        if text.startswith("data:") and ";base64," in text[:100]:  # a data URL
            text = text.split(";base64,", 1)[1]
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            where = f"images[{i}]" + ("" if item.name is None else f" ({item.name})")
            raise ApiError(400, "bad_base64", f"{where}: data is not valid base64 ({e})") from None
        out.append(Upload(label, data))
    return out


def _multipart_uploads(content_type: str, body: bytes, max_images: int) -> list[Upload]:
    if "boundary=" not in content_type:
        raise ApiError(400, "bad_multipart", "multipart/form-data without a boundary parameter in Content-Type")
    # the email package parses MIME multipart (RFC 2046), which form-data (RFC 7578) is
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart() or msg.defects:
        raise ApiError(
            400,
            "bad_multipart",
            "the multipart/form-data body could not be parsed "
            f"({', '.join(type(d).__name__ for d in msg.defects) or 'no parts'})",
        )
    files = [p for p in msg.iter_parts() if p.get_filename() is not None]
    if not files:
        raise ApiError(
            400,
            "bad_multipart",
            "multipart/form-data body without a file part (send the image as a "
            "file field, e.g. curl -F file=@part.png)",
        )
    _check_count(len(files), max_images)
    out = []
    for i, part in enumerate(files):
        data = part.get_payload(decode=True) or b""
        out.append(
            Upload(part.get_filename() or part.get_param("name", header="content-disposition") or f"file[{i}]", data)
        )
    return out
