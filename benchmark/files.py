"""Files written whole or not at all: every file mugbench writes for others to read (records, reports,
checkpoints, exports, generated shards, logs) goes through `atomic_write`, so a kill mid-write leaves the
old file or none, never half of one."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def new_temp_file(path: Path) -> tuple[int, str]:
    """A new, empty ``.NAME.<random>.tmp`` beside ``path``, open for writing: ``(fd, temp path)``.

    Unlike ``tempfile.mkstemp`` (always 0o600) it is created with mode 0o666 and lets the kernel apply
    the user's umask, as ``open()`` does (0o644 under 022), so a results folder shared with
    collaborators stays readable. The ".tmp" suffix keeps half-written files out of every
    "*.json" / "*.md" glob.
    """
    while True:
        tmp = Path(path).parent / f".{Path(path).name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:  # another writer drew the same name: draw again
            continue


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Create ``path`` by ``write(temp_path)`` into a fresh temp file beside it, then rename it into place.

    Each writer has its own uniquely named temp file in the destination folder (same file system, so
    ``os.replace`` is atomic): readers see the old file or the whole new one, concurrent writers of one
    path never interleave and the last rename wins. A failed ``write`` leaves no temp file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = new_temp_file(path)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` with `atomic_write`, synced to disk before the rename."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    return atomic_write(path, write)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable across a crash; not supported everywhere (Windows).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
