"""Error replies: every error is JSON ``{"detail": "<one line a person can act on>"}``.

Validation errors add ``"errors": [{"field": .., "message": ..}]``; a value over a size
limit (too many inputs, an input too long) is a 413, any other bad field a 422.
"""

import json
import sys
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from serving.schemas import MAX_LISTED, TOO_LARGE

# The status of a request whose client went away before its reply (nginx's): no one reads it,
# but the request metrics count it apart from the errors a client is told.
CLIENT_CLOSED = 499


async def reply_error(
    send: Send, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = (), field: str | None = None
) -> None:
    """Send an error reply from ASGI middleware; one about a ``field`` of the body lists it as validation does."""
    reply: dict[str, Any] = {"detail": detail if field is None else f"{field}: {detail}"}
    if field is not None:
        reply["errors"] = [{"field": field, "message": detail}]
    body = json.dumps(reply).encode()
    start_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start_headers})
    await send({"type": "http.response.body", "body": body})


def _field_and_message(error: dict[str, Any]) -> tuple[str, str]:
    """The offending field, named as in the body (``inputs.2``), and what is wrong with it."""
    context = error.get("ctx") or {}
    if error["type"] == "out_of_range":  # a DecodingConfig range, checked on the whole body
        return context["field"], context["message"]
    if error["type"] == "json_invalid":
        return "body", f"not valid JSON ({context.get('error', 'decode error')})"
    location = [str(part) for part in error["loc"][1:]]  # the first part is always "body"
    return ".".join(location) or "body", error["msg"]


def is_json_type(content_type: str) -> bool:
    """Whether FastAPI parses a body of this content type as JSON: application/json or a ``+json`` type."""
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def http_error_reply(request: Request, error: StarletteHTTPException) -> Response:
    """FastAPI's reply to an HTTPException, with a detail a person can act on where FastAPI's says nothing."""
    if error.status_code == 400 and isinstance(error.__cause__, RecursionError):
        error = StarletteHTTPException(400, "body: JSON nested too deeply to read", error.headers)
    elif error.status_code == 400 and "integer string conversion" in str(error.__cause__):  # Python's digit cap
        digits = sys.get_int_max_str_digits()
        error = StarletteHTTPException(
            400, f"body: a number in the JSON has more than {digits:,} digits", error.headers
        )
    return await http_exception_handler(request, error)


async def validation_error_reply(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 naming each bad field (the first few), or 413 when every problem is a size limit."""
    errors = error.errors()
    status = 413 if all(e["type"] == TOO_LARGE for e in errors) else 422
    problems, unlisted = [_field_and_message(e) for e in errors[:MAX_LISTED]], max(0, len(errors) - MAX_LISTED)
    if not is_json_type(request.headers.get("content-type", "")) and all(e["loc"] == ("body",) for e in errors):
        # FastAPI reads such a body as text, and "Input should be a valid dictionary" helps no one.
        problems, unlisted = [("body", "must be JSON sent with the header Content-Type: application/json")], 0
    detail = "; ".join(f"{field}: {message}" for field, message in problems)
    if unlisted:
        detail += f"; and {unlisted:,} more"
    return JSONResponse(
        {"detail": detail, "errors": [{"field": field, "message": message} for field, message in problems]},
        status_code=status,
    )
