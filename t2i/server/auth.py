"""HTTP Basic authentication on every route (`--api-auth USER:PASS[,USER2:PASS2]`), and the body-size cap.

Both are plain ASGI middleware, so nothing (the page, its files, /docs,
/openapi.json, the API) is reachable around them.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets

from t2i.server.errors import ConfigError


def parse_credentials(text: str) -> list[tuple[str, str]]:
    """'u:p,u2:p2' -> [('u', 'p'), ('u2', 'p2')]; a one-line ConfigError on anything else."""
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ConfigError("--api-auth takes USER:PASS[,USER2:PASS2], each with a user name and a password")
        pairs.append((user, password))
    return pairs


async def _send_plain(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BasicAuth:
    """401 unless the request carries one of the credentials (compared in constant time, all of them)."""

    def __init__(self, app, credentials: list[tuple[str, str]]):
        self.app = app
        self.credentials = [(u.encode(), p.encode()) for u, p in credentials]

    def allowed(self, header: bytes | None) -> bool:
        if not header or not header[:6].lower() == b"basic ":
            return False
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        ok = False
        for u, p in self.credentials:  # no early exit: the time taken does not tell which one matched
            ok |= secrets.compare_digest(user, u) & secrets.compare_digest(password, p)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization")
        if self.allowed(header):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await _send_plain(send, 401, "authentication required (HTTP Basic, see --api-auth)",
                          [(b"www-authenticate", b'Basic realm="t2i"')])


class BodyLimit:
    """413 for a request body over `max_bytes`, before any route reads it (the body is read here, up to
    the limit, and handed on; later receives still report the client's disconnect)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = f"the request body is over the server's limit of {self.max_bytes} bytes"
        if length is not None:
            try:
                if int(length) > self.max_bytes:
                    return await _send_plain(send, 413, too_big)
            except ValueError:
                return await _send_plain(send, 400, "bad Content-Length")
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _send_plain(send, 413, too_big)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
