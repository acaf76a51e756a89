"""LitServe's request handler, which admits a request to the queue and stops waiting at a deadline or when the
client goes away.

A request takes its place in the queue (:mod:`serving.tickets`) here, once FastAPI has
validated its body: a request that can never succeed (another method, a body that is
not JSON, a field out of range) gets its 405, 400 or 422 even while the queue is full,
not a 429 that would have its client send it again. Past ``--max-queue``, 429.

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

# The uids this request submitted to the workers (one); set per request, read where it is submitted.
_SUBMITTED: ContextVar[list[str]] = ContextVar("genrnn_submitted")
# The request's place in the queue; carried to the worker with the request.
_TICKET: ContextVar[Any] = ContextVar("genrnn_ticket", default=None)
RETRY_AFTER_SECONDS = 1  # what a 429 tells its client to wait


def deadline_error(deadline: float) -> HTTPException:
    return HTTPException(
        504, f"no reply within the server's deadline of {deadline:g} s: the inference workers are stuck or overloaded"
    )


async def client_gone(receive: Receive) -> None:
    """Return once the client has closed its connection (the request's body has been read whole)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def saturated_error(places: int) -> HTTPException:
    return HTTPException(
        429,
        f"the server is saturated ({places} requests waiting); retry in {RETRY_AFTER_SECONDS} s",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


class DeadlineRequestHandler(RegularRequestHandler):
    """Takes a place in ``server.tickets`` (or answers 429), then waits for a reply at most ``server.deadline``
    seconds, and no longer than the client does; the place is free again once it stops waiting."""

    async def _prepare_request(self, request: Any, request_type: Any) -> Any:
        payload = await super()._prepare_request(request, request_type)
        payload.ticket = _TICKET.get()
        return payload

    async def _submit_request(self, payload: Any) -> tuple[str, Any]:
        uid, response_queue_id = await super()._submit_request(payload)
        _SUBMITTED.get().append(uid)
        return uid, response_queue_id

    async def handle_request(self, request: Any, request_type: Any, connection: Request) -> Response:
        tickets = self.server.tickets
        ticket = tickets.take()
        if ticket is None:
            raise saturated_error(len(tickets))
        submitted: list[str] = []
        # The tasks below copy this context: they read the ticket and fill ``submitted``.
        tokens = _SUBMITTED.set(submitted), _TICKET.set(ticket)
        reply = asyncio.ensure_future(super().handle_request(request, request_type))
        gone = asyncio.ensure_future(client_gone(connection.receive))
        try:
            done, _ = await asyncio.wait({reply, gone}, timeout=self.server.deadline, return_when="FIRST_COMPLETED")
        finally:
            reply.cancel()  # nothing, once it is done
            gone.cancel()
            _SUBMITTED.reset(tokens[0])
            _TICKET.reset(tokens[1])
            tickets.give_back(ticket)
        if reply in done:
            return reply.result()
        for uid in submitted:
            self.server.response_buffer.pop(uid, None)
        if gone in done:
            raise HTTPException(CLIENT_CLOSED, "the client closed the connection before its reply")
        raise deadline_error(self.server.deadline)
