"""The frozen-feature protocols on features whose answer is known."""
from __future__ import annotations

import math

import pytest
import torch

from mugbench.config import load_config
from mugbench.eval.captioning import caption_scores
from mugbench.eval.harness import run_protocol
from mugbench.eval.knn import evaluate_knn, knn_outcomes, knn_predict, standardize, topk_outcomes
from mugbench.eval.linear import evaluate_linear
from mugbench.evalset import ClassificationSet, LabelledImages
from mugbench.protocol import Features


def _clusters(n_per_class: int, num_classes: int, dim: int, noise: float, seed: int):
    """Gaussian blobs around random unit centres: (features, labels)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[labels] + noise * torch.randn(len(labels), dim, generator=g), labels


def test_knn_votes_match_a_hand_computed_example():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[0.6, 0.8]])
    scores = knn_predict(train, labels, query, num_classes=2, k=3, temperature=0.5)
    # Cosine similarities of the query: 0.6, 0.96, 0.8, -0.6; the 3 nearest are rows 1, 2, 0.
    expected = [math.exp(0.96 / 0.5) + math.exp(0.6 / 0.5), math.exp(0.8 / 0.5)]
    assert scores[0].tolist() == pytest.approx(expected, rel=1e-5)


def test_knn_separates_clusters_and_reports_top5_beyond_ten_classes():
    train, train_y = _clusters(30, 12, 16, 0.2, seed=0)
    val, val_y = _clusters(10, 12, 16, 0.2, seed=0)
    metrics = evaluate_knn(train, train_y, val[::1], val_y, 12)
    assert metrics["top1"] > 95.0 and metrics["top5"] >= metrics["top1"]
    assert "top5" not in evaluate_knn(train[:80], train_y[:80], val[:20], val_y[:20], 8)


def test_standardizing_stops_large_nuisance_dimensions_dominating():
    train, train_y = _clusters(40, 4, 8, 0.3, seed=1)
    val, val_y = _clusters(20, 4, 8, 0.3, seed=1)
    # Two large dimensions unrelated to the class decide every raw cosine similarity.
    g = torch.Generator().manual_seed(2)
    big = lambda n: 50.0 + 10.0 * torch.randn(n, 2, generator=g)  # noqa: E731
    train, val = torch.cat([train, big(len(train))], 1), torch.cat([val, big(len(val))], 1)
    raw = evaluate_knn(train, train_y, val, val_y, 4)["top1"]
    std = evaluate_knn(train, train_y, val, val_y, 4, standardize_features=True)["top1"]
    assert std > 90.0 and std > raw + 20.0
    train_z, val_z = standardize(train, val)
    assert train_z.mean(0).abs().max() < 1e-4 and (train_z.std(0) - 1).abs().max() < 1e-4
    assert val_z.shape == val.shape


def test_linear_probe_learns_separable_features_and_is_seeded():
    train, train_y = _clusters(50, 5, 12, 0.3, seed=3)
    val, val_y = _clusters(20, 5, 12, 0.3, seed=3)
    a, a_grid, _ = evaluate_linear(train, train_y, val, val_y, 5, epochs=20, lr=0.1, batch_size=64, seed=0)
    b, _, _ = evaluate_linear(train, train_y, val, val_y, 5, epochs=20, lr=0.1, batch_size=64, seed=0)
    assert a["top1"] > 90.0 and a == b and a_grid["best_lr"] == 0.1
    shuffled, _, _ = evaluate_linear(train, train_y[torch.randperm(len(train_y))], val, val_y, 5, epochs=20, lr=0.1,
                                     batch_size=64, seed=0)
    assert shuffled["top1"] < 60.0  # labels unrelated to features: no better than chance-ish


# LARS scales each step by 0.001 x |w| / |g| (MAE's trust coefficient), so it needs far larger
# rates and more steps than SGD: MAE's probe runs 90 epochs at a peak of 6.4.
@pytest.mark.parametrize("solver,rate,epochs", [("sgd", 0.1, 10), ("lars", 100.0, 30)])
def test_linear_grid_trains_every_rate_in_one_pass_and_reports_the_best(solver, rate, epochs):
    train, train_y = _clusters(50, 5, 12, 0.3, seed=4)
    val, val_y = _clusters(20, 5, 12, 0.3, seed=4)
    kw = dict(epochs=epochs, batch_size=64, warmup_epochs=2, solver=solver, seed=0)
    best, grid, _ = evaluate_linear(train, train_y, val, val_y, 5, lrs=[1e-7, rate], **kw)
    alone, _, _ = evaluate_linear(train, train_y, val, val_y, 5, lrs=[rate], **kw)
    # A rate too small to move the head stays near chance (20 %); the grid reports the working one.
    assert grid["grid_top1"]["1e-07"] < 50.0 and grid["best_lr"] == rate and best["top1"] > 80.0
    # Heads train independently: a grid entry equals the run at that rate alone.
    assert grid["grid_top1"][str(rate)] == alone["top1"]


def _labels_only(train_y: torch.Tensor, val_y: torch.Tensor, num_classes: int) -> ClassificationSet:
    """A classification set for the frozen-feature protocols, which read its labels and the features
    handed to them, never its images (1-pixel placeholders here)."""
    def split(labels, prefix):
        return LabelledImages(torch.zeros(len(labels), 3, 1, 1), labels, [f"{prefix}{i}" for i in range(len(labels))])

    return ClassificationSet(name="blobs", classes=[f"c{i}" for i in range(num_classes)], train=split(train_y, "t"),
                             val=split(val_y, "v"), train_batches=lambda **_: iter(()))


def _percent(flags: torch.Tensor) -> float:
    """The share of right examples in percent, in float64: what a report computes from a record."""
    return 100.0 * flags.double().mean().item()


def test_knn_keeps_whether_each_val_image_was_right_and_their_mean_is_the_metric(smoke_cfg):
    train, train_y = _clusters(10, 16, 16, 0.3, seed=5)
    val, val_y = _clusters(4, 16, 16, 0.3, seed=5)  # 64 val images
    result = run_protocol("knn", Features(train, val), _labels_only(train_y, val_y, 16), smoke_cfg)
    flags = result.per_example
    assert set(flags) == set(result.metrics) == {"top1", "top5"}
    assert 30.0 < result.metrics["top1"] < 90.0 < result.metrics["top5"]  # some right, some wrong
    opts = smoke_cfg.eval.options_for("knn")
    scores = knn_predict(train, train_y, val, 16, k=opts.k, temperature=opts.temperature)
    assert torch.equal(flags["top1"], scores.argmax(1) == val_y)  # image by image, in the val split's order
    for metric in ("top1", "top5"):
        assert flags[metric].shape == (64,) and _percent(flags[metric]) == pytest.approx(result.metrics[metric], rel=1e-9)
    # Accuracy is an exact count, so it equals the outcomes' mean for any count, not only powers of two.
    few = knn_outcomes(train, train_y, val[:60], val_y[:60], 16)
    assert evaluate_knn(train, train_y, val[:60], val_y[:60], 16)["top1"] == 100.0 * int(few["top1"].sum()) / 60


def test_linear_probe_keeps_the_best_heads_outcome_per_val_image():
    train, train_y = _clusters(40, 4, 8, 0.8, seed=8)
    val, val_y = _clusters(16, 4, 8, 0.8, seed=8)  # 64 val images
    cfg = load_config("smoke", ["eval.linear.lrs=[1e-7, 0.1]", "eval.linear.epochs=10", "eval.linear.batch_size=32"])
    result = run_protocol("linear", Features(train, val), _labels_only(train_y, val_y, 4), cfg)
    right = result.per_example["top1"]
    assert set(result.per_example) == {"top1"} and right.shape == (64,)
    assert result.options["best_lr"] == 0.1 and 50.0 < result.metrics["top1"] < 90.0  # the near-chance 1e-7 lost
    assert _percent(right) == pytest.approx(result.metrics["top1"], rel=1e-9)
    # The reported head's answers: the same rate trained alone (heads train independently) agrees on every image.
    opts = cfg.eval.options_for("linear")
    _, _, alone = evaluate_linear(train, train_y, val, val_y, 4, lrs=[0.1], epochs=10, batch_size=32,
                                  weight_decay=opts.weight_decay, warmup_epochs=opts.warmup_epochs,
                                  solver=opts.solver, seed=cfg.seed)
    assert torch.equal(right, alone["top1"])


def test_zeroshot_keeps_whether_each_scored_image_was_right(smoke_cfg, spec, toy_samples, tokenizer):
    from mugbench.data.transforms import build_eval_transform
    from mugbench.eval.zeroshot import accuracy, embedding_scores
    from mugbench.runs import build_method

    # Scores of 12 classes: top-1 and top-5 outcomes average to the accuracy, exactly.
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.randn(64, 12, generator=g), torch.randint(0, 12, (64,), generator=g)
    outcomes, acc = topk_outcomes(scores, labels), accuracy(scores, labels)
    assert set(outcomes) == set(acc) == {"top1", "top5"}
    assert all(_percent(outcomes[m]) == pytest.approx(acc[m], rel=1e-9) for m in acc)
    # The protocol on an untrained CLIP, 4 of 6 val images scored: labels set so images 0 and 2 are right.
    method = build_method("clip", smoke_cfg, spec)
    images = torch.stack([build_eval_transform(smoke_cfg.encoder.img_size)(s.image) for s in toy_samples[:6]])
    classes = ["circle", "star", "square"]
    data = _labels_only(torch.zeros(1, dtype=torch.long), torch.zeros(6, dtype=torch.long), 3)
    data.classes, data.val.image = classes, images
    picked = embedding_scores(method, images[:4], classes, data.prompts, tokenizer).argmax(1)
    data.val.label[:4] = torch.stack([picked[0], (picked[1] + 1) % 3, picked[2], (picked[3] + 1) % 3])
    result = run_protocol("zeroshot", method, data, load_config("smoke", ["eval.zeroshot.images=4"]), tokenizer=tokenizer)
    assert result.per_example["top1"].tolist() == [True, False, True, False] and result.metrics["top1"] == 50.0


class _PerfectOrFlat:
    """Stands in for a method's ``reconstruct``: returns the input itself or its flat patches."""

    def __init__(self, perfect: bool):
        self.perfect = perfect

    def reconstruct(self, x):
        mask = torch.zeros(x.shape[0], 1, *x.shape[2:])
        mask[..., :4, :] = 1  # the top row of patches is "removed"
        flat = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
        return {"reconstruction": x if self.perfect else flat.expand_as(x), "pixel_mask": mask}


def test_reconstruction_error_counts_removed_patches_and_has_a_flat_patch_baseline():
    from mugbench.eval.reconstruction import reconstruction_error
    x = torch.randn(3, 3, 8, 8)
    perfect = reconstruction_error(_PerfectOrFlat(True), x, seed=0, patch_size=4)
    flat = reconstruction_error(_PerfectOrFlat(False), x, seed=0, patch_size=4)
    assert perfect["masked_mse"] == 0.0 and perfect["flat_patch_mse"] > 0.5
    assert flat["masked_mse"] == pytest.approx(flat["flat_patch_mse"], rel=1e-6)
    # By hand: mean squared deviation from each top-row patch's joint mean.
    patches = x[:, :, :4, :].unfold(3, 4, 4)  # [B, C, 4, 2, 4]
    dev = patches - patches.mean(dim=(1, 2, 4), keepdim=True)
    assert flat["flat_patch_mse"] == pytest.approx(float(dev.pow(2).mean()), rel=1e-5)


def test_recall_of_identical_embeddings_is_perfect_and_matches_a_loop_on_noisy_ones():
    from mugbench.eval.retrieval import recall_at_k
    images = torch.eye(4)
    owner = torch.tensor([0, 0, 1, 2, 3, 3])
    assert all(v == 100.0 for v in recall_at_k(images, images[owner], owner).values())
    g = torch.Generator().manual_seed(0)
    owner = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4, 4])
    images = torch.randn(5, 6, generator=g)
    texts = images[owner] + 1.2 * torch.randn(9, 6, generator=g)  # captions near their image, noisily
    r = recall_at_k(images, texts, owner, ks=(1, 3))
    cos = lambda a, b: float(a @ b) / float(a.norm() * b.norm())  # noqa: E731
    for k in (1, 3):
        i2t = sum(any(owner[j] == i for j in sorted(range(9), key=lambda j: -cos(images[i], texts[j]))[:k])
                  for i in range(5))
        t2i = sum(int(owner[j]) in sorted(range(5), key=lambda i: -cos(images[i], texts[j]))[:k] for j in range(9))
        assert r[f"i2t_r{k}"] == pytest.approx(100.0 * i2t / 5) and r[f"t2i_r{k}"] == pytest.approx(100.0 * t2i / 9)
    assert 0 < r["i2t_r1"] < 100  # the noisy case is not trivially all-or-nothing


def test_zeroshot_likelihood_scores_are_per_pair_caption_scores(smoke_cfg, spec, toy_samples, tokenizer):
    from mugbench.data.transforms import build_eval_transform
    from mugbench.eval.zeroshot import accuracy, likelihood_scores
    from mugbench.runs import build_method
    method = build_method("cap", smoke_cfg, spec)
    images = torch.stack([build_eval_transform(smoke_cfg.encoder.img_size)(s.image) for s in toy_samples[:3]])
    classes, templates = ["circle", "star"], ("a {}.", "there is a {}.")
    scores = likelihood_scores(method, images, classes, templates, tokenizer, seed=0, batch_size=2)
    assert scores.shape == (3, 2)
    for i in range(3):
        for c, name in enumerate(classes):
            one = method.score_text(images[i:i + 1].repeat(2, 1, 1, 1), tokenizer([t.format(name) for t in templates]))
            assert float(scores[i, c]) == pytest.approx(float(one.mean()), abs=1e-5)
    assert accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))["top1"] == 50.0


def test_bleu_and_cider_of_references_against_themselves_are_maximal():
    refs = [["A red circle on the left.", "a circle at the left"], ["a small blue square", "blue square"],
            ["two green triangles near the top", "green triangles at the top"]]
    own = caption_scores([r[0] for r in refs], refs)
    assert own["bleu4"] == pytest.approx(100.0, abs=1e-4)
    # Any departure from the references scores lower on both metrics.
    for candidates in (["a red circle", "a blue square", "green triangles"],
                       ["a blue square", "a red circle on the left", "two green triangles near the top"]):
        other = caption_scores(candidates, refs)
        assert other["bleu4"] < own["bleu4"] and other["cider"] < own["cider"]
    # The scorers see lower-case words without punctuation, as after COCO's PTB tokenizer.
    assert caption_scores(["a RED circle, on the left!"], [["a red circle on the left"]])["bleu4"] == \
        pytest.approx(100.0, abs=1e-4)


def test_imagenet_zeroshot_prompts_name_classes_not_wordnet_ids():
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    from mugbench.evalsets.imagenet import class_words

    # ImageFolder's sorted WordNet ids are the standard class index: n01440764 is class 0, "tench".
    wnids = [f"n{i:08d}" for i in range(1000)]
    names = class_words(wnids)
    assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish"
    assert all(not n.startswith("n0") for n in names)
    # Anything else keeps its folder names: another set, a subset of classes, unsorted ids.
    assert class_words(["circle", "square"]) is None
    assert class_words(wnids[:10]) is None and class_words(wnids[::-1]) is None
    assert len(SIMPLE_IMAGENET_TEMPLATES) == 7  # CLIP's seven-prompt ensemble
