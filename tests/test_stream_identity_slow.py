"""The same numbers on any hardware (slow tier: real processes, torchrun over gloo on the CPU).

The smoke study, seed 0, run four ways: one process reading its streams itself, one process with two
loader workers, two torchrun ranks with one worker each, and one process accumulating two micro-batches
per step. Every way trains on the same global batches (`data.streams`), accumulates exactly and draws
masks by global row, so the records agree: the same fingerprint, steps, skip counts, loss curve and every
protocol's numbers. Loader workers change nothing at all; ranks and micro-batches change the order of
float sums only (DDP's gradient average, the two-pass accumulation), so their loss curves agree to 1e-5
(measured: 4e-7) and their metrics to rounding (measured: every one equal but the reconstructions' masked
MSE, 2e-9 apart), fine-tuning, near chance at this scale and itself trained under DDP on two ranks, to a
few of its 64 validation images (`test_distributed_eval_slow`; measured: 2 under torchrun, none with
accumulation).
"""
from __future__ import annotations

import math
import sys

import pytest

from test_distributed_eval_slow import MUGBENCH, TORCHRUN, _records, _run

# Per-sample reconstruction; contrast across ranks (two passes); NT-Xent with the head's BatchNorm over the
# global batch; reconstruction plus caption tokens averaged over the global batch.
METHODS = "mae,clip,simclr,mug"
WAYS = {
    "one process": ([sys.executable], []),
    "two workers": ([sys.executable], ["--set", "data.num_workers=2"]),
    "torchrun x2": ([*TORCHRUN, "--standalone", "--nproc-per-node", "2"], ["--set", "data.num_workers=1"]),
    "accum_steps=2": ([sys.executable], ["--set", "train.accum_steps=2"]),
}
# Fine-tuning's validation images (of 64) that may flip: it trains under DDP itself on two ranks.
FINETUNE_FLIPS = {"one process": 0, "torchrun x2": 3, "accum_steps=2": 1}
# What a record measured about pre-training, which must agree however the batch was cut.
TRAINING = ("fingerprint", "conditions", "steps", "epochs", "skipped_samples", "repaired_samples")
MEASURED = ("metrics", "per_example", "examples", "protocol_options")


def _close(a, b, rel: float = 1e-4) -> bool:
    """Numbers within ``rel`` (or 1e-6 absolute near zero); other values equal; containers element-wise."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=rel, abs_tol=1e-6)
    return a == b


@pytest.mark.slow
def test_smoke_study_gives_the_same_records_whatever_the_ranks_workers_and_accumulation(tmp_path):
    found = {}
    for way, (launch, sets) in WAYS.items():
        folder = way.replace(" ", "-").replace("=", "")
        _run([*launch, *MUGBENCH, "run", "--preset", "smoke", "--methods", METHODS, *sets,
              "--workdir", f"runs-{folder}", "--results", folder, "--reports", f"reports-{folder}"], tmp_path)
        found[way] = _records(tmp_path / folder)
    one = found["one process"]
    # mae: 3 encoder protocols + reconstruction; clip: + zero-shot, retrieval; simclr: 3; mug: + zero-shot, captioning, reconstruction
    assert {m for m, _, _ in one} == set(METHODS.split(",")) and len(one) == 4 + 5 + 3 + 6
    for way, records in found.items():
        assert records.keys() == one.keys(), way
        for key, record in records.items():
            ref = one[key]
            for field in TRAINING:
                assert record[field] == ref[field], (way, key, field)
            if way == "two workers":  # the very same computation
                for field in (*MEASURED, "loss_curve"):
                    assert record[field] == ref[field], (way, key, field)
                continue
            assert record["loss_curve"]["step"] == ref["loss_curve"]["step"]
            assert _close(record["loss_curve"]["loss"], ref["loss_curve"]["loss"], rel=1e-5), (way, key)
            if key[1] == "finetune":
                # Near chance at smoke scale (1 epoch, 8 classes), so near-ties abound: two ranks (a DDP average
                # of two halves' gradients, from encoders equal to 1e-7) flipped up to 2 of the 64 images.
                flips = FINETUNE_FLIPS[way]
                for x, y in zip(record["protocol_options"]["top1_per_epoch"], ref["protocol_options"]["top1_per_epoch"]):
                    assert abs(x - y) <= flips * 100 / 64 + 1e-9, (way, key, x, y)
                continue
            for field in MEASURED:
                assert _close(record[field], ref[field]), (way, key, field, record[field], ref[field])
