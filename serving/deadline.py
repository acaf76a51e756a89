"""LitServe's request handler with a deadline on the whole request: a stuck worker's requests get a 504.

LitServe's own timeout (``--timeout``) is checked when a worker takes a request, so a
worker that never takes it, or never finishes its batch, would leave the client waiting
for good. Here the HTTP process stops waiting at the deadline, and forgets the request:
a reply that comes later finds no one waiting and is dropped.
"""

import asyncio
from contextvars import ContextVar
from typing import Any

from fastapi import HTTPException
from fastapi.responses import Response
from litserve.server import RegularRequestHandler

# The uids this request submitted to the workers (one); set per request, read where it is submitted.
_SUBMITTED: ContextVar[list[str]] = ContextVar("genrnn_submitted")


def deadline_error(deadline: float) -> HTTPException:
    return HTTPException(
        504, f"no reply within the server's deadline of {deadline:g} s: the inference workers are stuck or overloaded"
    )


class DeadlineRequestHandler(RegularRequestHandler):
    """Waits for a reply at most ``server.deadline`` seconds from the request's arrival."""

    async def _submit_request(self, payload: Any) -> tuple[str, Any]:
        uid, response_queue_id = await super()._submit_request(payload)
        _SUBMITTED.get().append(uid)
        return uid, response_queue_id

    async def handle_request(self, request: Any, request_type: Any) -> Response:
        submitted: list[str] = []
        token = _SUBMITTED.set(submitted)  # the task that wait_for runs the handler in copies this context
        try:
            return await asyncio.wait_for(super().handle_request(request, request_type), self.server.deadline)
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
            for uid in submitted:
                self.server.response_buffer.pop(uid, None)
            raise deadline_error(self.server.deadline) from None
        finally:
            _SUBMITTED.reset(token)
