"""Durable file writes, one way for every package (the lowest layer: appliance and provisioning use it too).

A file that must survive a power cut is written under a temporary name beside it, fsynced, renamed over
its target, and then the directory is fsynced: after a crash the old or the new content is there, never
a mix and never nothing. A rename that is not followed by a directory fsync may be lost with the power.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(src: Path, dst: Path) -> None:
    """``os.replace(src, dst)`` (a file or a directory, already fsynced), then the rename made durable."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def write_atomic(path: Path, data: bytes, mode: int = 0o640, *, sync_dir: bool = True) -> None:
    """Replace ``path`` with ``data`` durably (temp file, fsync, rename, directory fsync).

    ``sync_dir=False`` leaves the directory fsync to the caller, who writes several files into one
    directory and then calls :func:`fsync_dir` once (until then a power cut may undo the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if sync_dir:
            replace_durably(Path(tmp), path)
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
