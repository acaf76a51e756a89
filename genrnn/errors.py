"""Errors a user can cause: each carries one line that says what to fix."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class GenrnnError(Exception):
    """Base class for errors reported to the user as one clear line."""


class ConfigurationError(GenrnnError):
    """A configuration value is missing, unknown or out of range; the message names the key."""


class DataError(GenrnnError):
    """A data file is missing or malformed; the message names the file and line."""


class BundleError(GenrnnError):
    """A bundle directory is missing, incomplete or altered; the message names the file."""


@contextmanager
def interruption_kept(trainer: Any) -> Iterator[None]:
    """Around a Lightning trainer's call: Ctrl+C stays the KeyboardInterrupt it was.

    Lightning answers it by exiting with status 1, which a script cannot tell from a
    failure; the command line reports an interruption as such (status 130).
    """
    try:
        yield
    except SystemExit:
        if getattr(trainer, "interrupted", False):
            raise KeyboardInterrupt from None
        raise
