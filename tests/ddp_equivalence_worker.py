"""Trains clip and mae for a few steps on fixed global batches of 16 and saves the weights; run as
a plain process (world size 1) or under torchrun, where each rank trains on its half of every
global batch, with DDP or FSDP. `test_distributed_slow` compares them."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from conftest import make_batch
from mugbench.config import TrainConfig, load_config
from mugbench.data.tokenizer import TextTokenizer, corpus_vocab
from mugbench.data.toy import ToyWorld
from mugbench.data.pretrain import text_spec
from mugbench.runs import build_method
from mugbench.train.distributed import init_distributed
from mugbench.train.loop import train

GLOBAL_BATCH = 16


def _rows(batch: dict, start: int, stop: int) -> dict:
    """This rank's rows of a global batch."""
    return {k: ([t[start:stop] for t in v] if k == "image_views" else v[start:stop]) for k, v in batch.items()}


def main(out: Path, strategy: str = "ddp") -> None:
    """Train each method with ``strategy`` (ddp | fsdp) and write ``out/<method>.pt`` from rank 0."""
    info = init_distributed("cpu")
    cfg = load_config("smoke")
    samples = [ToyWorld(seed=0).sample("pretrain", i) for i in range(2 * GLOBAL_BATCH)]
    tokenizer = TextTokenizer(32, corpus_vocab(c for s in samples for c in s.captions))
    spec = text_spec(cfg, tokenizer)
    per_rank = GLOBAL_BATCH // info.world_size
    lo, hi = info.rank * per_rank, (info.rank + 1) * per_rank
    for name in ("clip", "mae"):
        method = build_method(name, cfg, spec)
        batches = [make_batch(type(method), samples[i:i + GLOBAL_BATCH], tokenizer, cfg.encoder.img_size, seed=i)
                   for i in range(0, 2 * GLOBAL_BATCH, GLOBAL_BATCH)]
        train_cfg = TrainConfig(epochs=3, batch_size=GLOBAL_BATCH, blr=4e-3 * 256 / GLOBAL_BATCH, warmup_epochs=0.5,
                                grad_clip=1.0, ckpt_every=100, log_every=1, strategy=strategy)
        train(method, lambda epoch: iter([_rows(b, lo, hi) for b in batches]), train_cfg, steps_per_epoch=2,
              workdir=out / f"{name}-run", info=info, seed=0, desc=name)
        if info.is_main:  # the final checkpoint holds the full weights, whatever the strategy
            torch.save(torch.load(out / f"{name}-run" / "checkpoint.pt", weights_only=True)["model"],
                       out / f"{name}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
