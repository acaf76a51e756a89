"""The queue's places: which admitted requests are still awaited, in memory every process of the server shares.

A request admitted to the queue takes a free place and marks it with a ticket number of
its own; its HTTP process frees the place once it stops waiting for the reply: the reply
came, the deadline passed, or the client went away. An inference worker that takes a
request whose place no longer holds its ticket drops it undecoded, since no one would
read the reply. So a client that hangs up, and retries, costs the workers nothing more
than its place in the queue while it waited, and that place is free again at once.
"""

import multiprocessing
from dataclasses import dataclass
from multiprocessing.sharedctypes import RawArray, RawValue
from typing import Any


@dataclass(frozen=True)
class Ticket:
    """A request's place in the queue and its number: a later request in the same place has another."""

    place: int
    number: int


class Tickets:
    """``places`` places, taken by the HTTP processes (forked) and read by the workers (spawned with it)."""

    def __init__(self, places: int) -> None:
        self._held: Any = RawArray("q", places)  # each place's ticket number; 0: free
        self._last: Any = RawValue("q", 0)
        # Of the spawn context, which also passes to forked processes: a fork context's lock would not pickle.
        self._lock = multiprocessing.get_context("spawn").Lock()

    def take(self) -> Ticket | None:
        """A free place, now held under a new number; ``None`` when every place is held.

        The search starts at the last ticket's number (modulo the places), so that the places
        are taken in turn; as they are freed in about the same order, a free one is near.
        """
        places = len(self._held)
        with self._lock:
            start = self._last.value % places
            for offset in range(places):
                place = (start + offset) % places
                if not self._held[place]:
                    self._last.value += 1
                    self._held[place] = self._last.value
                    return Ticket(place, self._last.value)
        return None

    def give_back(self, ticket: Ticket) -> None:
        """Free the ticket's place: its request is no longer awaited."""
        with self._lock:
            if self._held[ticket.place] == ticket.number:
                self._held[ticket.place] = 0

    def awaited(self, ticket: Ticket) -> bool:
        """Whether the ticket still holds its place (one aligned word: read without the lock)."""
        return self._held[ticket.place] == ticket.number

    def __len__(self) -> int:
        return len(self._held)
