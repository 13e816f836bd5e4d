"""One run at a time per run folder: an advisory lock on ``run_dir/.lock``.

Two identical `mugbench run` commands would otherwise train into one folder at once, overwriting
each other's checkpoints and interleaving the log. The lock is ``flock``: the kernel drops it when
its holder exits or is killed, so a crashed run never leaves a stale lock behind.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Iterator

from .distributed import DistInfo

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another process is training or evaluating in this run folder."""


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it in the file."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written it yet
        return "a process that has not said which yet"


def acquire(run_dir: Path) -> int:
    """Take the lock of ``run_dir`` without waiting and write this process's pid and host into it;
    returns the open file descriptor that holds it (closing it releases the lock)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunLockedError(
            f"Run folder {run_dir} is in use by another mugbench run ({holder}; lock file {path}). Two runs "
            f"in one folder would overwrite each other's checkpoints and interleave the log, so this one stopped "
            f"without changing anything. Wait for that run to end, or stop it and rerun this command, which "
            f"resumes from its last checkpoint (the lock is released when its holder exits, even when killed; a "
            f"killed run's data workers may keep it a few seconds longer).") from None
    except BaseException:
        os.close(fd)
        raise
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)
    return fd


@contextlib.contextmanager
def run_lock(run_dir: Path, info: DistInfo = DistInfo()) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block, or raise `RunLockedError` at once if another process
    holds it. Under torchrun rank 0 takes it for the whole job (the ranks share one run) and every
    rank learns whether it got it, so that all of them stop together."""
    fd, refused = None, None
    if info.is_main:
        try:
            fd = acquire(Path(run_dir))
        except RunLockedError as exc:
            refused = exc
    if info.world_size > 1:
        refused = _shared_refusal(refused, info, run_dir)
    if refused is not None:
        raise refused
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock


def _shared_refusal(refused: RunLockedError | None, info: DistInfo, run_dir: Path) -> RunLockedError | None:
    """Rank 0's outcome on every rank (a collective: every rank calls it)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([float(refused is not None)], device=info.device)
    dist.broadcast(flag, src=0)
    if refused is None and flag.item():
        return RunLockedError(f"Run folder {run_dir} is in use by another mugbench run; rank 0 says which.")
    return refused
