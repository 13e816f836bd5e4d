"""Run a function on several real gloo ranks (spawned processes) from a test, as torchrun would."""
from __future__ import annotations

import io
import os
import socket
import traceback


def _worker(rank: int, world: int, port: int, target, args, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # As bytes: a tensor put on a torch queue lives in this process's shared memory, gone when it exits.
        buffer = io.BytesIO()
        torch.save(target(*args), buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # the test reports the rank's traceback instead of waiting for its result
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now (for a job's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_ranks(target, world: int, *args, timeout: float = 600) -> list:
    """``target(*args)`` on ``world`` gloo ranks (module-level, picklable ``target``); each rank's return
    value, in rank order. A rank's exception fails the call with its traceback."""
    import torch.multiprocessing as mp

    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, target, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = sorted((queue.get(timeout=timeout) for _ in procs), key=lambda item: item[0])
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    errors = [f"rank {rank}:\n{value}" for rank, status, value in results if status == "error"]
    assert not errors, "\n".join(errors)
    import torch

    return [torch.load(io.BytesIO(value), weights_only=True) for _, _, value in results]
