"""ASGI middlewares of the HTTP processes: whole bodies, UTF-8 bodies, repeated keys, API key, request metrics,
health, HEAD.

Each is a plain ASGI wrapper, so it can answer before the body is parsed (a rejected
request costs no parsing) and see the status code of every reply, errors included.
"""

import asyncio
import codecs
import hashlib
import hmac
import json
import time
from typing import Any

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving import metrics
from serving.errors import CLIENT_CLOSED, is_json_type, reply_error
from serving.liveness import WorkerBeats

# How often a body still arriving looks whether the server has started to stop.
_CLOSING_POLL_SECONDS = 0.25


def _digest(key: bytes) -> bytes:
    # Comparing fixed-size digests keeps the comparison's time independent of the key's length too.
    return hashlib.sha256(key).digest()


class PathMiddleware:
    """A middleware for HTTP requests to one path (:meth:`handle`); everything else passes through."""

    def __init__(self, app: ASGIApp, path: str) -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class Utf8BodyMiddleware(PathMiddleware):
    """Answers 400 to a body on ``path`` that is not UTF-8 text, as JSON between systems must be,
    and 415 to one sent compressed (``Content-Encoding``), which it would be taken for.

    FastAPI would guess UTF-16 or UTF-32 from the bytes and read them. Such text without
    a byte-order mark is valid UTF-8 too, but holds NUL bytes, which JSON text never does.
    The check runs as the app reads the body, so a body refused for its size is never decoded.
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        encoding = Headers(scope=scope).get("content-encoding", "").strip()
        codings = {coding.strip().lower() for coding in encoding.split(",")} - {"", "identity"}
        if codings and scope["method"] == "POST":  # another method gets its 405 from the app
            await reply_error(send, 415, f"the body is sent with Content-Encoding {encoding!r}: send it uncompressed")
            return
        decoder = codecs.getincrementaldecoder("utf-8")()  # a character may straddle two chunks

        async def receive_checked() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                try:
                    decoder.decode(chunk, final=not message.get("more_body", False))
                except UnicodeDecodeError as error:
                    raise HTTPException(400, f"the body is not UTF-8 text ({error.reason})") from None
                if b"\x00" in chunk:
                    raise HTTPException(400, "the body holds a NUL byte: send JSON as UTF-8, not UTF-16 or UTF-32")
            return message

        # FastAPI answers an HTTPException raised while it reads the body as it answers its own.
        await self.app(scope, receive_checked, send)


class RepeatedKeyMiddleware(PathMiddleware):
    """Answers 422 to a JSON body on ``path`` that gives a key twice, as a batch job refuses such a line.

    The parser would keep the last value silently: ``{"mode": "beam", "mode": "greedy"}``
    decoded greedily. Every other fault of the body is the app's to tell.
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _whole_body(receive)
        unread = iter(body)

        async def receive_body() -> Message:
            return next(unread, None) or await receive()

        # The first Content-Type header, as FastAPI reads it, decides whether the body is JSON.
        if body[-1]["type"] == "http.request" and is_json_type(Headers(scope=scope).get("content-type", "")):
            key = repeated_field(b"".join(m.get("body", b"") for m in body))
            if key is not None:
                await reply_error(send, 422, "is given twice", field=key)
                return
        await self.app(scope, receive_body, send)


def repeated_field(body: bytes) -> str | None:
    """The first key that a JSON object body gives twice; ``None`` for any other body.

    Only the body's own keys: a nested object is an error of its field, which validation names.
    """
    last: dict[str, Any] = {}  # the pairs and the object of the object the parser closed last

    def remember(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        last["pairs"], last["object"] = pairs, dict(pairs)
        return last["object"]

    try:
        value = json.loads(body.decode("utf-8-sig"), object_pairs_hook=remember)
    except (ValueError, RecursionError):  # not JSON (nor UTF-8): the app or the UTF-8 check tells it
        return None
    # The body's own object closes last; a body that is an array or a string has none.
    if not last or value is not last["object"] or len(value) == len(last["pairs"]):
        return None
    seen: set[str] = set()
    for key, _ in last["pairs"]:
        if key in seen:
            return key
        seen.add(key)
    return None


class ApiKeyMiddleware:
    """Paths under ``prefix`` need the key, as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""

    def __init__(self, app: ASGIApp, prefix: str, key: str) -> None:
        self.app = app
        self.prefix = prefix
        self.key_digest = _digest(key.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix) and not self._authorized(scope):
            await reply_error(
                send,
                401,
                "missing or wrong API key: send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        headers = Headers(scope=scope)  # the first of a repeated header, as the app reads them
        presented = headers.get("x-api-key", "").strip()  # white space around a header value is not part of it
        if not presented:  # an empty header, as a proxy may add, is none
            scheme, _, token = headers.get("authorization", "").partition(" ")
            presented = token.strip() if scheme.lower() == "bearer" else ""
        return hmac.compare_digest(_digest(presented.encode("latin-1")), self.key_digest)


async def _whole_body(receive: Receive, closing: Any = None) -> list[Message] | None:
    """Every message of a request's body, up to its last (or to the client's going away).

    ``None`` once ``closing`` (a shared flag) is set while the body is still arriving.
    """
    messages = []
    while True:
        message = await receive() if closing is None else await _unless_closing(receive(), closing)
        if message is None:
            return None
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            return messages


async def _unless_closing(awaitable: Any, closing: Any) -> Any:
    """What ``awaitable`` gives, or ``None`` once ``closing.value`` is set first."""
    task = asyncio.ensure_future(awaitable)
    while True:
        done, _ = await asyncio.wait({task}, timeout=_CLOSING_POLL_SECONDS)
        if done:
            return task.result()
        if closing.value:
            task.cancel()
            return None


class WholeBodyMiddleware(PathMiddleware):
    """Reads a request's whole body before the app sees it: 413 over the limit, 499 once the client is gone,
    503 when the server starts to stop meanwhile.

    So a request takes its place in the queue (:mod:`serving.deadline`) only once its whole
    body is in: a client that trickles its body, or never ends it, holds a connection but
    no place, and a few slow clients cannot have every other one refused. Nor can they
    hold up a stop: a body still arriving once ``closing`` is set gets a 503.
    """

    def __init__(self, app: ASGIApp, path: str, closing: Any, max_body_bytes: int) -> None:
        super().__init__(app, path)
        self.closing = closing  # a shared flag: the server has started to stop
        self.max_body_bytes = max_body_bytes  # checked by LitServe as the body arrives; named in its 413

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await _whole_body(receive, self.closing)
        except HTTPException as error:  # LitServe's size check raises it as the body arrives
            detail = error.detail
            if error.status_code == 413:
                detail = f"the body is over the server's limit of {self.max_body_bytes:,} bytes (--max-body-bytes)"
            await reply_error(send, error.status_code, detail)
            return
        if body is None:
            await reply_error(send, 503, "the server is stopping and takes no new requests: send it to another")
            return
        if body[-1]["type"] != "http.request":  # nothing will read the reply: for the metrics
            await reply_error(send, CLIENT_CLOSED, "the client closed the connection before its body was complete")
            return
        unread = iter(body)

        async def receive_body() -> Message:
            return next(unread, None) or await receive()

        await self.app(scope, receive_body, send)


class HeadMiddleware:
    """Answers HEAD as GET, as a server must wherever it answers GET (RFC 9110, 9.3.2).

    FastAPI's routes take only the methods they name, and LitServe's ``/health`` and ``/info``
    name GET alone: a load balancer or uptime check that asks with HEAD had 405 and saw the server down.
    The app answers the GET whole, so that the middlewares outside (LitServe's compression) give it
    GET's headers; uvicorn, whose own scope still says HEAD, sends no body.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


class HealthMiddleware(PathMiddleware):
    """Answers 503 on ``path`` while a worker is stuck (:mod:`serving.liveness`), and gives LitServe's
    plain-text 503 (a worker is still loading the model) as a JSON error.
    """

    def __init__(self, app: ASGIApp, path: str, beats: WorkerBeats, deadline: float) -> None:
        super().__init__(app, path)
        self.beats = beats
        self.deadline = deadline

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        stuck = self.beats.stuck(self.deadline)
        if stuck is not None:
            await reply_error(send, 503, f"not ready: {stuck}")
            return
        refused = False

        async def send_json_error(message: Message) -> None:
            nonlocal refused
            if message["type"] == "http.response.start" and message["status"] == 503:
                refused = True
                await reply_error(send, 503, "not ready: an inference worker is still loading the model")
            elif not refused:
                await send(message)

        await self.app(scope, receive, send_json_error)


class RequestMetricsMiddleware(PathMiddleware):
    """Counts requests to ``path`` by mode and status, times them, and tracks how many are in flight.

    A request is in flight from the end of its body, as the queue counts it (a client still
    sending is not), until its reply.
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        body = bytearray()  # kept as the app reads it, for the mode label
        status = 500  # what the client gets if the app raises
        in_flight = False

        async def receive_and_keep() -> Message:
            nonlocal in_flight
            message = await receive()
            if message["type"] == "http.request":
                body.extend(message.get("body", b""))
                if not message.get("more_body", False) and not in_flight:
                    in_flight = True
                    metrics.INFLIGHT.inc()
            return message

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive_and_keep, send_and_note)
        finally:
            if in_flight:
                metrics.INFLIGHT.dec()
            # A mode given twice is no valid way to say one (parsed again only for a 422).
            repeated = status == 422 and repeated_field(bytes(body)) is not None
            mode = "unknown" if repeated else metrics.mode_label(bytes(body))
            metrics.REQUESTS.labels(mode, str(status)).inc()
            metrics.REQUEST_DURATION.labels(mode).observe(time.perf_counter() - started)
