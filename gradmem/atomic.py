"""Atomic writes: build a file or a directory beside its destination, then rename it into place.

The one way this project publishes a whole file or directory (checkpoints, the best reader, exports, reports,
the store's manifest): another process, or a restart after a crash, sees the old content or the new, never
half of it. A file replaces a file with one ``os.replace``. A directory cannot be renamed over a non-empty
one, so an existing directory is first moved aside and deleted once the new one is in place; between the two
renames (microseconds) the path is absent, never partial.

Temporary names start with ``TMP_PREFIX`` (hidden; gradmem.store's clean-up of killed writers removes stale ones).
Not for never-overwrite publication (the store's parts use hard links and S3 copies for that).

``exclusive`` is the other half: one writer at a time per local directory (a training run's), so that two
processes resuming the same run cannot interleave their checkpoints and logs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; create a file or a directory there. On a normal exit it is
    flushed to disk and replaces ``path``; on an exception it is removed and ``path`` stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary {tmp} for {path}")
        _fsync_tree(tmp)
        _replace(tmp, path)
    finally:
        _remove(tmp)  # what a failure left; nothing after a success


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace the file ``path`` with ``data`` (text is written as UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def _replace(tmp: Path, path: Path) -> None:
    if path.exists() and (path.is_dir() or tmp.is_dir()):  # os.replace cannot put a directory over one
        aside = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-old-{path.name}")
        os.replace(path, aside)
        os.replace(tmp, path)
        _remove(aside)
    else:
        os.replace(tmp, path)
    _fsync(path.parent)  # the rename itself survives a power cut


def _fsync_tree(root: Path) -> None:
    for file in [root] if root.is_file() else (p for p in root.rglob("*") if p.is_file()):
        _fsync(file)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive(directory: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold ``directory/.lock`` exclusively while the block runs, or raise RuntimeError at once when another
    process holds it. An OS lock (``flock``): the kernel releases it when its holder exits, killed or not, so a
    crashed run never leaves a stale lock behind. ``what`` names the work in the message."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{directory} is in use by another process ({what}): wait for it to finish, or "
                               "use another directory") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
