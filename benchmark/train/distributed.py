"""torch.distributed set-up: one process, or torchrun (NCCL on GPU, gloo on CPU)."""
from __future__ import annotations

import datetime
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes checkpoints, logs and result records."""
        return self.rank == 0


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else what the launcher announces
    (`launched_rank_and_world`): the one place the rest of mugbench asks."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return launched_rank_and_world()


def launched_rank_and_world() -> tuple[int, int]:
    """(rank, world size) as torchrun announces them in the environment (``RANK``, ``WORLD_SIZE``), before
    any process group exists; (0, 1) without a launcher or with values that are not numbers."""
    try:
        return int(os.environ.get("RANK", "0")), max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 0, 1


def init_distributed(device: str = "auto", timeout_min: float | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op without torchrun), with
    collectives that give up after ``timeout_min`` minutes (``train.dist_timeout_min``; None: torch's
    default) instead of waiting for a dead rank forever."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if "RANK" in os.environ and launched_rank_and_world()[1] > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if not dist.is_initialized():
            timeout = {} if timeout_min is None else {"timeout": datetime.timedelta(minutes=float(timeout_min))}
            dist.init_process_group(backend="nccl" if want_cuda else "gloo", **timeout)
        if want_cuda:
            torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    return DistInfo(device=torch.device("cuda") if want_cuda else torch.device("cpu"))


def _repeated_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a method, found by shape rather than by name: the children of any
    Sequential/ModuleList made of two or more modules of one type that hold parameters (timm's
    ``blocks``, open_clip's ``resblocks``, decoders alike)."""
    found = []
    for container in module.modules():
        if isinstance(container, (torch.nn.Sequential, torch.nn.ModuleList)):
            children = list(container.children())
            if len(children) >= 2 and len({type(c) for c in children}) == 1 and any(
                    p.requires_grad for p in children[0].parameters()):
                found += children
    return found


def shard_with_fsdp(method: torch.nn.Module) -> torch.nn.Module:
    """FSDP (torch's ``fully_shard``, FSDP2) for encoders too large to replicate: each transformer
    block is its own shard unit, the rest of the method the root one. Works on CUDA (NCCL) and on
    the CPU (gloo). Returns the same module, now holding sharded parameters."""
    from torch.distributed.fsdp import fully_shard

    for block in _repeated_blocks(method):
        fully_shard(block)
    # fully_shard takes no 0-d parameters (CLIP's logit_scale): they stay replicated, and their
    # gradients are averaged over ranks by hand, as DDP would.
    scalars = {p for p in method.parameters() if p.ndim == 0 and p.requires_grad}
    for param in scalars:
        param.register_post_accumulate_grad_hook(_average_grad_over_ranks)
    fully_shard(method, ignored_params=scalars or None)
    return method


def _average_grad_over_ranks(param: torch.nn.Parameter) -> None:
    dist.all_reduce(param.grad)
    param.grad /= dist.get_world_size()


def gather_full_state(method: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts of an FSDP method, on the CPU of rank 0
    (empty on the other ranks). Every rank must call it: it is a collective."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(method, options=options), get_optimizer_state_dict(method, optimizer, options=options)


def load_full_state(method: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: dict) -> None:
    """Load full state dicts (as `gather_full_state` writes them) into an FSDP method on every rank."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(method, model_state, options=options)
    set_optimizer_state_dict(method, optimizer, optimizer_state, options=options)


def once_per_cache(cache_dir: Path, prepare: Callable[[], T], info: DistInfo | None = None) -> T:
    """``prepare()`` (which fills ``cache_dir`` and returns what it made) run first by one rank of each group
    of ranks that see the same ``cache_dir``, then by the others, which find everything cached.

    A cluster keeps caches on node-local scratch (`MUGBENCH_CACHE`) or on a shared file system: each rank
    drops a marker file in the folder and learns who shares it from the markers it sees, so one rank per
    node prepares a node-local cache and one rank in all a shared one; nobody waits on a file another node
    cannot see. Should a file system show a marker late, two ranks prepare into one folder at once, which
    the cache's writers allow (atomic renames of identical content). Every rank must call it (collective);
    ``info``: this process's place (default: the initialised process group's).
    """
    if info is None:
        initialised = dist.is_available() and dist.is_initialized()
        info = DistInfo(dist.get_rank(), dist.get_world_size()) if initialised else DistInfo()
    if info.world_size == 1:
        return prepare()
    leader = _cache_leader(Path(cache_dir), info)
    if info.rank == leader:
        result = prepare()
    dist.barrier()  # the others wait for their folder's leader (rank 0 for a shared folder) to finish
    if info.rank != leader:
        result = prepare()
    return result


_LEADERS: dict[tuple[str, int], int] = {}


def _cache_leader(cache_dir: Path, info: DistInfo) -> int:
    """The lowest rank that sees the same ``cache_dir`` as this one (found once per folder and job)."""
    key = (str(cache_dir.resolve()), id(dist.group.WORLD))
    if key not in _LEADERS:
        token = [uuid.uuid4().hex if info.is_main else None]
        dist.broadcast_object_list(token, src=0)
        markers = cache_dir / ".ranks" / token[0]
        markers.mkdir(parents=True, exist_ok=True)
        (markers / str(info.rank)).touch()
        dist.barrier()
        sharing = sorted(int(p.name) for p in markers.iterdir() if p.name.isdigit())
        dist.barrier()  # everyone has listed the markers: they can go
        if info.rank == sharing[0]:
            shutil.rmtree(markers, ignore_errors=True)
        _LEADERS[key] = sharing[0]
    return _LEADERS[key]
