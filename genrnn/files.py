"""Files that must be whole: checksums, writes that a kill cannot cut short, and checked manifests."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from genrnn.errors import BundleError, ConfigurationError


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; once written, it replaces ``path`` in one step.

    A kill leaves the old file (or none), never part of one. Beside it, on the same file
    system, the rename cannot fail into a copy. The temporary file is named for the
    process, so that several ranks may write the same file at once.
    """
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)


def write_atomically(path: Path, content: str | bytes) -> None:
    """Write ``path`` whole or not at all (see :func:`replacing`)."""
    with replacing(path) as temporary:
        temporary.write_bytes(content.encode() if isinstance(content, str) else content)


def with_usual_permissions(path: Path) -> None:
    """Give ``path`` the permissions of a file created here by ``open`` (0644 under umask 022).

    safetensors writes its files 0600, so that a server running as another user (a
    container's) could not read the weights beside the rest of the bundle.
    """
    path.chmod(0o666 & ~current_umask())


def current_umask() -> int:
    """The process's umask, read from ``/proc/self/status`` where Linux has it.

    Elsewhere it is read by setting it and back, and a file another thread creates in
    that instant gets the wrong permissions.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write a manifest last, whole: the files it lists are complete once it exists."""
    write_atomically(path, json.dumps(manifest, indent=2) + "\n")


def read_manifest(path: Path, kind: str, version: int, required: set[str]) -> dict[str, Any]:
    """A manifest of ``kind`` (a bundle, a teacher table) after checking its format version and checksums."""
    if not path.is_file():
        raise BundleError(f"{path} is missing: not a {kind} (or an unfinished one)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} is not a {kind}'s manifest (a JSON object)")
    found = manifest.get("format_version")
    if type(found) is not int or found != version:  # JSON's true and 1.0 equal 1 in Python
        raise BundleError(f"{path}: format version {found!r}; this genrnn reads version {version}")
    verify_files(path, manifest, required)
    return manifest


def verify_files(manifest_path: Path, manifest: dict[str, Any], required: set[str]) -> None:
    """Check that every file the manifest lists is beside it with its checksum, the ``required`` ones among them."""
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise BundleError(f"{manifest_path}: 'files' must map file names to checksums")
    for name, expected in files.items():
        if Path(name).name != name or name in ("", ".", ".."):  # only files beside the manifest
            raise BundleError(f"{manifest_path}: {name!r} is not a file name beside it")
        path = manifest_path.parent / name
        if not path.is_file():
            raise BundleError(f"{path} is missing beside {manifest_path.name}")
        if sha256(path) != expected:
            raise BundleError(
                f"{path} does not match its checksum in {manifest_path.name}: the file was altered or damaged"
            )
    missing = required - set(files)
    if missing:
        raise BundleError(f"{manifest_path} lists no checksum for {', '.join(sorted(missing))}")


def check_apart(output: Path, reads: Iterable[str | Path]) -> None:
    """Refuse an output path that is, or lies inside, what the command reads (its input, a bundle)."""
    target = output.resolve()
    for read in reads:
        source = Path(read).resolve()
        if target == source or (source.is_dir() and source in target.parents):
            what = "is" if target == source else "lies inside"
            raise ConfigurationError(f"output: {output} {what} {read}, which this command reads; name another path")


def check_writable(path: Path) -> None:
    """Refuse an output path that could not be written, before the work whose result it is to hold."""
    if path.is_dir():
        raise ConfigurationError(f"output: {path} is a directory; name the file to write")
    if not path.parent.is_dir():
        missing = "is not a directory" if path.parent.exists() else "does not exist"
        raise ConfigurationError(f"output: {path.parent} {missing}")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigurationError(f"output: {path} cannot be written (permissions)")
