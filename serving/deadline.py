"""LitServe's request handler, which stops waiting at a deadline or when the client goes away.

LitServe's own timeout (``--timeout``) is checked when a worker takes a request, so a
worker that never takes it, or never finishes its batch, would leave the client waiting
for good. Here the HTTP process stops waiting at the deadline (504), or as soon as the
client closes its connection (counted as 499), and forgets the request: a reply that
comes later finds no one waiting and is dropped. Either way the request's place in the
queue is freed (:mod:`serving.tickets`), and a worker that has not taken it yet drops it
undecoded.
"""

import asyncio
from contextvars import ContextVar
from typing import Any

from fastapi import HTTPException
from fastapi.responses import Response
from litserve.server import RegularRequestHandler
from starlette.requests import Request
from starlette.types import Receive

from serving.errors import CLIENT_CLOSED
from serving.tickets import TICKET_KEY

# The uids this request submitted to the workers (one); set per request, read where it is submitted.
_SUBMITTED: ContextVar[list[str]] = ContextVar("genrnn_submitted")
# The request's place in the queue, from the admission middleware; carried to the worker with the request.
_TICKET: ContextVar[Any] = ContextVar("genrnn_ticket", default=None)


def deadline_error(deadline: float) -> HTTPException:
    return HTTPException(
        504, f"no reply within the server's deadline of {deadline:g} s: the inference workers are stuck or overloaded"
    )


async def client_gone(receive: Receive) -> None:
    """Return once the client has closed its connection (the request's body has been read whole)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class DeadlineRequestHandler(RegularRequestHandler):
    """Waits for a reply at most ``server.deadline`` seconds, and no longer than the client does."""

    async def _prepare_request(self, request: Any, request_type: Any) -> Any:
        payload = await super()._prepare_request(request, request_type)
        payload.ticket = _TICKET.get()
        return payload

    async def _submit_request(self, payload: Any) -> tuple[str, Any]:
        uid, response_queue_id = await super()._submit_request(payload)
        _SUBMITTED.get().append(uid)
        return uid, response_queue_id

    async def handle_request(self, request: Any, request_type: Any, connection: Request) -> Response:
        submitted: list[str] = []
        # The tasks below copy this context: they read the ticket and fill ``submitted``.
        tokens = _SUBMITTED.set(submitted), _TICKET.set(connection.scope.get(TICKET_KEY))
        reply = asyncio.ensure_future(super().handle_request(request, request_type))
        gone = asyncio.ensure_future(client_gone(connection.receive))
        try:
            done, _ = await asyncio.wait({reply, gone}, timeout=self.server.deadline, return_when="FIRST_COMPLETED")
        finally:
            reply.cancel()  # nothing, once it is done
            gone.cancel()
            _SUBMITTED.reset(tokens[0])
            _TICKET.reset(tokens[1])
        if reply in done:
            return reply.result()
        for uid in submitted:
            self.server.response_buffer.pop(uid, None)
        if gone in done:
            raise HTTPException(CLIENT_CLOSED, "the client closed the connection before its reply")
        raise deadline_error(self.server.deadline)
