"""LitServe's batched loop, with batches measured in inputs rather than requests.

LitServe fills a batch with up to ``max_batch_size`` *requests*; a request here may
carry a list of inputs, and the engine's cost grows with inputs. This loop fills a
batch with up to ``max_batch_size`` *inputs*: a request that does not fit starts a
later batch (a request is never split), and one larger than the whole budget is
decoded on its own. Everything else (decode, predict, encode, replies) is LitServe's.

A request that does not fit is handed on, not kept: it goes to a queue that the
workers of the endpoint share and read before the request queue, so that the next
batch to start, in whichever worker, starts with it; and a wake-up goes on the
request queue, so that an idle worker takes it at once instead of when the worker
that could not fit it is done. The server shares that queue (see
``serving.server.Server``); a loop it did not share keeps its own.

A request whose client stopped waiting (gone, or past the deadline) is dropped undecoded
when it is taken (see :mod:`serving.tickets`).

It also differs in how it waits: it blocks until a first request arrives, then
gathers more for at most ``batch_timeout``, instead of polling the queue every
millisecond while idle; and it marks each of its turns in the server's
:class:`serving.liveness.WorkerBeats` (as the engine marks its decoder steps), so that a
worker that stops moving is seen.
"""

import time
from queue import Empty, Queue
from typing import Any

from fastapi import HTTPException
from litserve import LitAPI
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.transport.base import MessageTransport
from litserve.utils import LitAPIStatus, LoopResponseType, PickleableHTTPException

from serving import metrics
from serving.liveness import WorkerBeats
from serving.tickets import Tickets

# An idle worker wakes this often, so that LitServe's loop stays responsive.
_IDLE_WAIT = 1.0

# Put on the request queue after a request is handed on: whoever takes it looks at the handed-on queue.
WAKE = "genrnn-handed-on"


def timeout_error(waited: float, limit: float) -> HTTPException:
    """The 504 of a request that waited in the queue longer than the server's timeout."""
    return HTTPException(
        504, f"the request waited {waited:.2f} s for a worker, longer than the server's timeout of {limit:g} s"
    )


class InputBudgetLoop(BatchedLoop):
    """Batches of at most ``max_batch_size`` inputs, requests kept whole."""

    def __init__(self) -> None:
        super().__init__()
        # Requests that did not fit a batch, oldest first: set by the server before its workers start.
        self.handed_on: Queue | None = None
        self.beats = WorkerBeats()  # the server's, allocated before its workers start
        self.tickets: Tickets | None = None  # the queue's places: set by the server before its workers start

    def moved(self) -> None:
        """Mark that this worker is moving: a turn of its loop, or a decoder step of its batch."""
        self.beats.turned(self.worker_id or 0)  # LitServe's id is None outside a worker

    def _handed_on(self) -> Queue:
        if self.handed_on is None:  # not shared: this worker keeps its own
            self.handed_on = Queue()
        return self.handed_on

    def _take_handed_on(self) -> Any:
        """The oldest handed-on request, or ``None``."""
        try:
            return self._handed_on().get_nowait()
        except Empty:
            return None

    def _next(self, request_queue: Queue, deadline: float | None, first: bool) -> Any:
        """The next request: a handed-on one before a queued one; ``None`` when none comes before the deadline."""
        item = self._take_handed_on() if first else None
        while item is None:
            timeout = _IDLE_WAIT if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = request_queue.get(timeout=timeout)
            except Empty:
                return None
            except (EOFError, OSError):  # the queue manager died: the main process reports it and stops
                raise _StopLoopError() from None
            if item == WAKE:
                item = self._take_handed_on()  # None when another worker took it first
        return item

    def get_batch_requests(self, lit_api: LitAPI, request_queue: Queue, transport: MessageTransport):
        """One batch ``[(response_queue_id, uid, request)]``; requests that waited too long get their 504 here."""
        self.moved()  # once a batch, and once a second while idle (see _next)
        batch, arrivals, inputs, deadline = [], [], 0, None
        timeout = lit_api.request_timeout
        while inputs < lit_api.max_batch_size:
            item = self._next(request_queue, deadline, first=not batch)
            if item is None:
                break
            if item == _SENTINEL_VALUE:
                raise _StopLoopError()
            response_queue_id, uid, arrived, request = item
            waited = time.monotonic() - arrived  # monotonic clocks agree across processes on one machine
            if not self.awaited(request):
                # Its client left, or had its 504 at the deadline: dropped, but the wait was real,
                # and with stuck workers it is the wait that an operator watches grow.
                metrics.QUEUE_WAIT.observe(waited)
                continue
            if timeout not in (-1, False, None) and waited > timeout:
                # Answered now: the loop may go on waiting for company for a batch, or for a second when idle.
                metrics.QUEUE_WAIT.observe(waited)
                self.put_error(transport, response_queue_id, uid, timeout_error(waited, timeout))
                continue
            size = len(request.inputs)
            if batch and inputs + size > lit_api.max_batch_size:
                # The queue manager has the request before the wake-up goes out: whoever wakes finds it.
                self._handed_on().put(item)
                request_queue.put(WAKE)
                break
            batch.append((response_queue_id, uid, request))
            arrivals.append(arrived)
            inputs += size
            if deadline is None:
                deadline = time.monotonic() + lit_api.batch_timeout
        started = time.monotonic()
        self.moved()  # the wait for the batch is over; the engine's steps go on
        for arrived in arrivals:  # queued until the batch starts: the wait for it to fill counts too
            metrics.QUEUE_WAIT.observe(started - arrived)
        return batch, []

    def awaited(self, request: Any) -> bool:
        """Whether someone waits for the request's reply: its ticket still holds its place in the queue."""
        ticket = getattr(request, "ticket", None)
        return ticket is None or self.tickets is None or self.tickets.awaited(ticket)

    def put_error(self, transport: MessageTransport, response_queue_id: int, uid: str, error: HTTPException) -> None:
        """Answer one request with an HTTP error."""
        self.put_response(
            transport,
            response_queue_id,
            uid,
            PickleableHTTPException.from_exception(error),
            LitAPIStatus.ERROR,
            LoopResponseType.REGULAR,
        )
