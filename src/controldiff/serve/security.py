"""Who may call the server and how much a request may carry.

* :class:`Guard` (ASGI middleware): with a token, every route needs ``Authorization: Bearer
  TOKEN``, or HTTP basic auth whose password (or ``user:password``) is the token, as A1111
  clients send it (``webuiapi``'s ``set_auth``, A1111's ``--api-auth``); a browser asked with
  ``WWW-Authenticate: Basic`` sends it on every later request. Bodies over the byte limit are
  refused with 413, by ``Content-Length`` or while streaming.
* :func:`check_uploads`: every image in a request (any base64 or data-URL string that opens as
  one) within the pixel limit, read from its header before anything decodes it.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
from typing import Any, Iterator

from PIL import Image

__all__ = ["Guard", "check_uploads", "image_strings", "decode_base64"]


class Guard:
    """ASGI middleware: token check, then the body size limit."""

    def __init__(self, app, token: str | None, max_body: int):
        self.app = app
        self.token = token
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):   # lifespan
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        authorized = self.token is None or self._authorized(headers.get("authorization", ""))
        if scope["type"] == "websocket":
            if not authorized:
                return await send({"type": "websocket.close", "code": 1008})
            return await self.app(scope, receive, send)
        if not authorized:
            return await _reply(send, 401, "a token is required: send 'Authorization: Bearer TOKEN' "
                                           "(or HTTP basic auth with the token as the password)",
                                [(b"www-authenticate", b'Basic realm="controldiff"')])
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _reply(send, 413, f"request body of {int(length)} bytes exceeds the limit of "
                                           f"{self.max_body} bytes")
        received, refused = 0, False

        async def limited():
            # over the limit: answer 413 here and tell the app the client left
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    refused = True
                    await _reply(send, 413, f"request body exceeds the limit of {self.max_body} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not refused:
                await send(message)

        try:
            await self.app(scope, limited, guarded_send)
        except Exception:
            if not refused:
                raise

    def _authorized(self, header: str) -> bool:
        kind, _, value = header.partition(" ")
        value = value.strip()
        if kind.lower() == "bearer":
            return hmac.compare_digest(value.encode(), self.token.encode())
        if kind.lower() == "basic":
            try:
                user_pass = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return False
            password = user_pass.partition(":")[2]
            return (hmac.compare_digest(password.encode(), self.token.encode())
                    or hmac.compare_digest(user_pass.encode(), self.token.encode()))
        return False


async def _reply(send, status: int, message: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def decode_base64(text: str) -> bytes | None:
    """The bytes of a base64 string or a ``data:...;base64,`` URL, or None when it is neither."""
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def image_strings(data: Any, path: tuple = ()) -> Iterator[tuple[tuple, str]]:
    """(field path, string) of every string in ``data`` long enough to be an image."""
    if isinstance(data, str):
        if len(data) >= 64:
            yield path, data
    elif isinstance(data, dict):
        for k, v in data.items():
            yield from image_strings(v, (*path, k))
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            yield from image_strings(v, (*path, i))


def check_uploads(data: Any, max_pixels: int) -> tuple[tuple, str] | None:
    """The first (field path, message) of an uploaded image over ``max_pixels``, else None. Only
    the header is read (PIL opens lazily), so a decompression bomb is never decoded."""
    for path, text in image_strings(data):
        raw = decode_base64(text)
        if raw is None:
            continue
        try:
            with Image.open(io.BytesIO(raw)) as im:
                w, h = im.size
        except Image.DecompressionBombError:
            return path, f"image exceeds the limit of {max_pixels} pixels"
        except (OSError, ValueError):
            continue  # not an image (or unreadable): the request's own parsing names it
        if w * h > max_pixels:
            return path, f"image of {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} pixels"
    return None
