"""Augmented training batches of a labelled evaluation split (fine-tuning), the same global batches for
any number of ranks and loader workers.

Epoch ``e`` is a permutation of the split drawn from (seed, e); global batch ``t`` is its items
``[t*B, (t+1)*B)`` (the last partial batch is dropped) and rank ``r`` of ``W`` loads rows
``[r*B/W, (r+1)*B/W)`` of it. Each item is augmented with every RNG a transform may draw from (torch's,
Python's, numpy's: timm's RandAugment, crops and erasing use all three) seeded from (seed, epoch, key),
so an image gets the same crop whichever rank or worker loads it, and the ranks' rows together are
exactly the batch one process trains on.
"""
from __future__ import annotations

import contextlib
import random
from typing import Callable, Iterator

import numpy as np
import torch

from .transforms import sample_seed


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """torch's CPU generator, Python's and numpy's global RNGs seeded from ``seed`` inside the block and
    restored after it, so nothing else in the process (model init, dropout) is disturbed."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)  # numpy's legacy seeds stop at 2**32 - 1
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class GlobalTrainBatches:
    """Base of a labelled split's ``train_batches``: subclasses give ``__len__`` and ``load(index) -> (PIL
    image, label, key)``; calling it yields one epoch of this rank's rows of every global batch."""

    num_workers: int = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int):
        """Item ``index`` as ``(PIL image, int label, str key)``."""
        raise NotImplementedError

    def __call__(self, *, epoch: int, batch_size: int, transform: Callable, seed: int, rank: int = 0,
                 world_size: int = 1):
        """The batches of one epoch: ``{"image", "label"}`` dicts of ``batch_size // world_size`` rows each
        (this rank's share of each global batch of ``batch_size``), ``len // batch_size`` of them."""
        if batch_size % world_size:
            raise ValueError(f"a global batch of {batch_size} does not split evenly over {world_size} ranks")
        per_rank, n = batch_size // world_size, len(self)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(sample_seed(seed, epoch, "order")))
        starts = range(0, n - batch_size + 1, batch_size)
        rows = [order[t + rank * per_rank:t + (rank + 1) * per_rank].tolist() for t in starts]
        loader = torch.utils.data.DataLoader(_SeededItems(self, transform, seed, epoch), batch_sampler=rows,
                                             num_workers=self.num_workers)
        return ({"image": images, "label": labels} for images, labels in loader)


class _SeededItems(torch.utils.data.Dataset):
    """``(transform(image), label)`` of a `GlobalTrainBatches`, each item under its own seeded RNGs."""

    def __init__(self, source: GlobalTrainBatches, transform: Callable, seed: int, epoch: int):
        self.source, self.transform, self.seed, self.epoch = source, transform, seed, epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image, label, key = self.source.load(index)
        with seeded_rngs(sample_seed(self.seed, self.epoch, key)):
            return self.transform(image), int(label)
