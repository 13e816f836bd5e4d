"""Exact accumulation on several ranks: two gloo ranks, each forwarding its half of every global batch in
two micro-batches, train the weights and log the loss that one process does with the whole batch at once
(the cross-rank gather of a contrastive loss composing with the two-pass accumulation, the global-batch
BatchNorm of SimCLR's head, caption means over the global batch's tokens, masks keyed by global row). The
one-process case for every registered method is the contract kit's (`mugbench.testing.check_accumulation`)."""
from __future__ import annotations

import pytest
import torch

from mugbench.testing import LOSS_RTOL, WEIGHT_RTOL, train_tiny

from gloo import run_on_ranks

# One method of each kind of loss: contrastive (two passes), contrastive + global BN, contrastive + caption
# tokens, masked reconstruction + caption tokens.
METHODS = ("clip", "simclr", "coca", "mug")
STEPS = 4


def _train_on_rank(names: tuple[str, ...], accum_steps: int, steps: int) -> dict:
    import torch.distributed as dist

    import mugbench.methods  # noqa: F401  (registers the built-in methods in the spawned process)
    from mugbench.train.distributed import DistInfo

    info = DistInfo(dist.get_rank(), dist.get_world_size())
    return {name: train_tiny(name, accum_steps, steps, info) for name in names}


def _relative_drift(a: dict, b: dict) -> float:
    drift = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5
    return drift / sum(float(v.pow(2).sum()) for v in a.values()) ** 0.5


@pytest.mark.slow
def test_two_ranks_with_two_micro_batches_each_train_what_one_process_does():
    ranks = run_on_ranks(_train_on_rank, 2, METHODS, 2, STEPS)
    for name in METHODS:
        alone = train_tiny(name, 1, STEPS)
        for rank, result in enumerate(ranks):
            assert _relative_drift(alone["weights"], result[name]["weights"]) < WEIGHT_RTOL, (name, rank)
        logged = ranks[0][name]["loss"]
        assert [s for s, _ in logged] == [s for s, _ in alone["loss"]] == list(range(1, STEPS + 1))
        for (_, a), (_, b) in zip(alone["loss"], logged):
            assert b == pytest.approx(a, rel=LOSS_RTOL), name
        # The runs moved: equal weights are not the untrained ones.
        assert alone["loss"][0][1] != alone["loss"][-1][1]
    assert torch.equal(ranks[0]["clip"]["weights"]["logit_scale"], ranks[1]["clip"]["weights"]["logit_scale"])
