"""Errors a user can cause: each carries one line that says what to fix."""

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for a message, cut after ``limit`` characters: a user's value may be a megabyte long."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


class GenrnnError(Exception):
    """Base class for errors reported to the user as one clear line."""

    # Set on one raised inside a trainer's run (see interruption_kept): every process of a
    # distributed run meets such an error, so that the first one's word is enough.
    in_trainer = False


class ConfigurationError(GenrnnError):
    """A configuration value is missing, unknown or out of range; the message names the key."""


class DataError(GenrnnError):
    """A data file is missing or malformed; the message names the file and line."""


class BundleError(GenrnnError):
    """A bundle directory is missing, incomplete or altered; the message names the file."""


class ServerStopped(GenrnnError):
    """The server stopped without being asked to: a worker failed to start or died."""


class Terminated(Exception):
    """SIGTERM stopped a run; the command line reports it and how to go on."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


@contextmanager
def sigterm_raises_terminated() -> Iterator[None]:
    """Meanwhile, SIGTERM raises :class:`Terminated`, except where :func:`sigterm_default` says otherwise.

    Otherwise a SIGTERM while a run reads its data, or writes its results, ended the process
    at once with status 143 and not a word of how to go on.
    """
    if threading.current_thread() is not threading.main_thread():  # where handlers are set
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def sigterm_default() -> Iterator[None]:
    """Meanwhile, SIGTERM ends the process at once, as by default, where it raised :class:`Terminated`.

    Around what may wait on other processes in native code: a trainer's run (which sets up
    its processes before Lightning installs its own handler) and a barrier. A Python
    handler runs only once such a wait is over, which may be never: a rank that is stuck.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not _terminate:
        yield
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, _terminate)


@contextmanager
def interruption_kept(trainer: Any) -> Iterator[None]:
    """Around a Lightning trainer's call: a stop by a signal is reported as one.

    Lightning answers Ctrl+C by exiting with status 1, which a script cannot tell from a
    failure, and SIGTERM by exiting with status 0, as if the run had ended. Ctrl+C stays
    the KeyboardInterrupt it was, SIGTERM becomes :class:`Terminated`. The Ctrl+C handler
    found on entry is put back on exit, whatever a callback installed.
    """
    handler = signal.getsignal(signal.SIGINT)
    try:
        with sigterm_default():  # Lightning's handler takes over once the run's processes are set up
            yield
    except GenrnnError as error:
        error.in_trainer = True
        raise
    except SystemExit as stop:
        if isinstance(stop.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        if getattr(trainer, "received_sigterm", False):
            raise Terminated from None
        raise
    finally:
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)


def first_sigterm_only() -> None:
    """Have the SIGTERM handler in place run on the first SIGTERM alone; later ones are ignored.

    Called inside a Lightning trainer's run, whose handler broadcasts from rank 0 to the
    other ranks, and in rank 0 passes the signal on to the ranks it started. A SIGTERM to
    every process (systemd, Slurm, ``kill -- -PGID``) reached those twice, and their second
    broadcast, which rank 0 never matched, failed in the middle of a batch. Lightning puts
    the handler it replaced back as the run ends.
    """
    handler = signal.getsignal(signal.SIGTERM)
    if not callable(handler):
        return
    called = False

    def once(signum: int, frame: Any) -> None:
        nonlocal called
        if not called:
            called = True
            handler(signum, frame)

    signal.signal(signal.SIGTERM, once)
