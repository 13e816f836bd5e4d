"""Evaluation over ranks (`mugbench.eval.sharding`): each rank takes a run of the one-process batches, and
the gathered results are those of one process, bit for bit (two real gloo ranks)."""
from __future__ import annotations

import pytest
import torch

from gloo import run_on_ranks
from mugbench.eval import sharding

CASES = [(10, 3), (5, 4), (3, 4), (1, 1)]  # (items, batch): uneven runs, a rank without any batch


@pytest.mark.parametrize("size", [1, 2, 3, 8])
@pytest.mark.parametrize("n,batch", CASES + [(1000, 256)])
def test_rank_batches_split_the_one_process_batches_into_runs(n, batch, size):
    runs = [sharding.rank_batches(n, batch, r, size) for r in range(size)]
    assert [span for run in runs for span in run] == sharding.batch_spans(n, batch)  # each batch once, in order
    lengths = [len(run) for run in runs]
    assert max(lengths) - min(lengths) <= 1


def _gathered(n: int, batch: int) -> dict:
    """map_batches of a tensor, a list and a dict of tensors (bool included) over n items."""
    def rows(a, b):
        return torch.arange(a, b, dtype=torch.float64)[:, None] * torch.tensor([1.0, -1.0], dtype=torch.float64)

    return {"tensor": sharding.map_batches(rows, n, batch),
            "list": sharding.map_batches(lambda a, b: [f"item {i}" for i in range(a, b)], n, batch),
            "dict": sharding.map_batches(lambda a, b: {"even": torch.arange(a, b) % 2 == 0,
                                                       "index": torch.arange(a, b)}, n, batch),
            "rank": sharding.world()}


def _gather_all() -> list:
    return [_gathered(n, batch) for n, batch in CASES]


def test_map_batches_gathers_every_item_once_in_order_on_every_rank():
    one = _gather_all()
    for rank, got in enumerate(run_on_ranks(_gather_all, 2)):
        for case, mine in zip(one, got):
            assert mine["rank"] == (rank, 2)
            assert torch.equal(mine["tensor"], case["tensor"]) and mine["list"] == case["list"]
            assert mine["dict"].keys() == case["dict"].keys()
            assert all(torch.equal(mine["dict"][k], case["dict"][k]) for k in case["dict"])
            assert mine["dict"]["even"].dtype == torch.bool


def _smoke_encoder_outputs() -> dict:
    """Features, k-NN and a three-rate probe grid of a smoke encoder on 20 seeded images, batch 8."""
    from mugbench.config import load_config
    from mugbench.eval.features import extract_features
    from mugbench.eval.knn import knn_outcomes
    from mugbench.eval.linear import evaluate_linear
    from mugbench.models.vit import build_encoder

    torch.set_num_threads(1)  # the same kernels in the test process and in the ranks
    cfg = load_config("smoke")
    encoder = build_encoder(cfg.encoder, seed=0)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(20, 3, cfg.encoder.img_size, cfg.encoder.img_size, generator=g)
    labels = torch.arange(20) % 4
    feats = extract_features(encoder, images, pool="avg", batch_size=8)
    knn = knn_outcomes(feats[:12], labels[:12], feats[12:], labels[12:], 4, k=3)
    metrics, grid, right = evaluate_linear(feats[:12], labels[:12], feats[12:], labels[12:], 4, epochs=3,
                                           lrs=[0.1, 0.3, 1.0], batch_size=4, seed=0)
    return {"features": feats, "knn": knn, "linear": (metrics, grid, right)}


def test_features_knn_and_the_probe_grid_over_two_ranks_equal_one_process():
    threads = torch.get_num_threads()
    try:
        one = _smoke_encoder_outputs()
    finally:
        torch.set_num_threads(threads)
    for got in run_on_ranks(_smoke_encoder_outputs, 2):
        assert torch.equal(got["features"], one["features"])
        assert all(torch.equal(got["knn"][k], one["knn"][k]) for k in one["knn"])
        assert got["linear"][:2] == one["linear"][:2]  # the grid was split 2 + 1 over the ranks
        assert torch.equal(got["linear"][2]["top1"], one["linear"][2]["top1"])
