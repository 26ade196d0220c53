"""What every request must pass before any route runs: a body size that is declared sanely and
within the limit, a JSON content type where a body is expected, in UTF-8 and uncompressed (415
otherwise), and a gateway
connected to NATS (503 with `Retry-After` otherwise — answered at once rather than after a
request timeout, since nothing can be done while NATS is away). A HEAD request is turned into
its GET here (`headless`).

Plain ASGI in front of everything, the submit route included, so it costs a pass over the
headers and no task per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import errors
from .errors import ApiError

JSON_TYPES = (b"application/json",)
# Headers with one value: given twice, what the request means depends on which one a reader
# takes (Starlette the first, a proxy or this guard perhaps the last), so it is refused, as HTTP
# requires for Host. The parser itself refuses a second Content-Length.
SINGLE = frozenset(
    (b"host", b"authorization", b"content-type", b"content-encoding", b"transfer-encoding")
)


def authorization(scope: Scope) -> str | None:
    """The request's `Authorization` header (one at most: `Guard` refuses two)."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            return str(value.decode("latin-1"))
    return None


def expects_body(method: str, path: str) -> bool:
    """The routes whose request body is a JSON document."""
    return (method == "POST" and path == "/v1/tasks") or (
        method == "PUT" and path.startswith(("/v1/functions/", "/v1/asyncconfigs/"))
    )


def is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media in JSON_TYPES or (media.startswith(b"application/") and media.endswith(b"+json"))


def charset(content_type: bytes) -> bytes | None:
    """The `charset` parameter of a content type, lowercased and unquoted; None without one."""
    for param in content_type.split(b";")[1:]:
        name, _, value = param.partition(b"=")
        if name.strip().lower() == b"charset":
            return value.strip().strip(b'"').lower()
    return None


def headless(receive: Receive, send: Send) -> tuple[Receive, Send]:
    """A HEAD request runs as its GET and gets the GET's status and headers only, the response
    ended with them: a streamed answer (`logs -f`) would otherwise not end until its stream did,
    holding one of the account's log reads. The route is told the client has gone, so it stops
    and gives back what it holds."""
    ended = asyncio.Event()

    async def head_send(message: Message) -> None:
        if ended.is_set():
            return
        await send(message)
        if message["type"] == "http.response.start":
            ended.set()
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def head_receive() -> Message:
        if not ended.is_set():
            got = asyncio.ensure_future(receive())
            end = asyncio.ensure_future(ended.wait())
            await asyncio.wait((got, end), return_when=asyncio.FIRST_COMPLETED)
            end.cancel()
            if got.done():
                return got.result()
            got.cancel()
        return {"type": "http.disconnect"}

    return head_receive, head_send


class Guard:
    def __init__(self, app: ASGIApp, limit: int, connected: Callable[[], bool]) -> None:
        self.app = app
        self.limit = limit
        # The limit applies to the payload; leave room for the envelope around it.
        self.max_body = limit + 64 * 1024
        self.connected = connected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
            receive, send = headless(receive, send)
        if scope["type"] == "http":
            refusal = self.check(scope)
            if refusal is None and any(n == b"transfer-encoding" for n, _ in scope["headers"]):
                # Sent without a length (chunked): read it here, within the limit, so every
                # route answers 413 the same way (FastAPI would call a failed read a 400).
                receive, refusal = await self._buffered(receive)
            if refusal is not None:
                await errors.api_error(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _buffered(self, receive: Receive) -> tuple[Receive, ApiError | None]:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return receive, None  # the client went away; the route will see it
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return receive, errors.body_too_large(size, self.max_body, self.limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay, None

    def check(self, scope: Scope) -> ApiError | None:
        content_type: bytes | None = None
        encoding = b"identity"
        upgrade = False
        seen: set[bytes] = set()
        for name, value in scope["headers"]:
            if name in SINGLE:
                if name in seen:
                    shown = name.decode("latin-1").title()
                    return ApiError(400, f"header {shown} is given more than once; send it once")
                seen.add(name)
            if name == b"content-length":
                value = value.strip()  # the spaces around a field's value are not part of it
                if not value.isdigit():
                    return ApiError(400, "Content-Length is not a number")
                if int(value) > self.max_body:
                    return errors.body_too_large(int(value), self.max_body, self.limit)
            elif name == b"transfer-encoding" and value.strip().lower() != b"chunked":
                # The parser takes `gzip, chunked` as chunked and hands over gzip.
                shown = value.decode("latin-1")[:40]
                return ApiError(
                    415,
                    f"transfer coding {shown!r} is not accepted; send the body as it is, "
                    "chunked or with a Content-Length",
                )
            elif name == b"content-type":
                content_type = value
            elif name == b"content-encoding":
                encoding = value.strip().lower()
            elif name == b"connection":
                upgrade = upgrade or b"upgrade" in value.lower()
        path: str = scope["path"]
        if expects_body(scope["method"], path):
            # A body is read as it arrives: compressed, or in another character set, it would be
            # taken for malformed JSON at best and for other text at worst.
            if not is_json(content_type or b""):
                shown = (content_type or b"none").decode("latin-1")[:100]
                return ApiError(
                    415, f"content type {shown!r} is not accepted; send application/json"
                )
            if charset(content_type or b"") not in (None, b"utf-8", b"utf8"):
                shown = (charset(content_type or b"") or b"").decode("latin-1")[:40]
                return ApiError(415, f"charset {shown!r} is not accepted; JSON is sent as UTF-8")
            if upgrade:
                # The parser stops at the headers of an upgrade and the body never arrives.
                return ApiError(
                    400, "a request asking for an upgrade cannot carry a body; no upgrade is served"
                )
            if encoding not in (b"identity", b""):
                shown = encoding.decode("latin-1")[:40]
                return ApiError(
                    415, f"content encoding {shown!r} is not accepted; send the body uncompressed"
                )
        if path.startswith("/v1/") and not self.connected():
            return errors.unavailable("NATS is unreachable")
        return None
