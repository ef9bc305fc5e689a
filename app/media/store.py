"""Where media bytes live: one small interface, a filesystem implementation.

Keys are opaque strings made by the uploads module (digits, letters, '/', '.');
an object store could implement the same four operations later. Writes are
atomic: bytes go to a temporary file in the same directory, are fsynced, then
renamed into place, so a reader never sees half a file.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol

KEY_RE = re.compile(r"[0-9a-z]+(/[0-9a-z]+)*(\.[a-z]+)?")


class MediaStore(Protocol):
    def temporary(self) -> BinaryIO:
        """A new writable temporary file in the store (seekable, deleted unless committed)."""

    def commit(self, temporary: BinaryIO, key: str) -> None:
        """Make the temporary file's bytes the object `key` (atomic)."""

    def open(self, key: str) -> BinaryIO:
        """The object's bytes; FileNotFoundError if there is none."""

    def delete(self, key: str) -> None:
        """Remove the object (no error if it is gone already)."""


class FilesystemMediaStore:
    """Objects as files under MEDIA_ROOT (nginx can serve the same directory, X-Accel-Redirect)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        if not KEY_RE.fullmatch(key):  # keys are ours; this guards the root all the same
            raise ValueError(f"bad media key {key!r}")
        return self.root / key

    def temporary(self) -> BinaryIO:
        return tempfile.NamedTemporaryFile(dir=self.root / "tmp", prefix="up-", delete=False)

    def commit(self, temporary: BinaryIO, key: str) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary.flush()
        os.fsync(temporary.fileno())
        temporary.close()
        os.replace(temporary.name, target)

    def discard(self, temporary: BinaryIO) -> None:
        temporary.close()
        try:
            os.unlink(temporary.name)
        except FileNotFoundError:
            pass

    def open(self, key: str) -> BinaryIO:
        return open(self.path(key), "rb")

    def delete(self, key: str) -> None:
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            pass


def store_for(settings) -> FilesystemMediaStore:
    """The media store the settings name: MEDIA_ROOT, relative paths from the installation directory."""
    from app.storage import ROOT

    root = Path(settings.media_root)
    return FilesystemMediaStore(root if root.is_absolute() else ROOT / root)
