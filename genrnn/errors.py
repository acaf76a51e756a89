"""Errors a user can cause: each carries one line that says what to fix."""


class GenrnnError(Exception):
    """Base class for errors reported to the user as one clear line."""


class ConfigurationError(GenrnnError):
    """A configuration value is missing, unknown or out of range; the message names the key."""


class DataError(GenrnnError):
    """A data file is missing or malformed; the message names the file and line."""


class BundleError(GenrnnError):
    """A bundle directory is missing, incomplete or altered; the message names the file."""
