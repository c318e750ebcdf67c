"""Whether files changed on disk, without reading them.

A file's stamp is what `os.stat` says of it: inode, size and modification
time.  The inode counts too, so that a file replaced by a rename (how
certificate tools renew) is seen even when its size and time happen to
match; an unreadable file has a stamp of its own, so that its coming back
is a change as well.  Compare two stamps of the same paths for equality;
nothing else is meant by their contents.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def file_stamp(path: Path) -> tuple:
    try:
        info = os.stat(path)
    except OSError:
        return (str(path), None)
    return (str(path), info.st_ino, info.st_size, info.st_mtime_ns)


def files_stamp(paths: Iterable[Path | None]) -> tuple:
    """The stamps of ``paths``, in order; the ``None`` of an optional file that is not set is left out."""
    return tuple(file_stamp(path) for path in paths if path is not None)
