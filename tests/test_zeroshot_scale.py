"""Zero-shot scoring at ImageNet's size: memory bounded per decoder call, the same scores whatever the
chunking and the number of ranks (`mugbench.eval.zeroshot`)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mugbench.config import load_config
from mugbench.data.tokenizer import trim_padding
from mugbench.eval.zeroshot import decoder_size, embedding_scores, likelihood_scores, sequence_bytes
from mugbench.runs import build_method

CLASSES = ["circle", "star", "square", "triangle", "cross"]
TEMPLATES = ("a {}.", "there is a {}.", "a photo of a big {} here.")


def _images(cfg, samples, n: int) -> torch.Tensor:
    from mugbench.data.transforms import build_eval_transform
    return torch.stack([build_eval_transform(cfg.encoder.img_size)(s.image) for s in samples[:n]])


def _prompt_length(tokenizer) -> int:
    return trim_padding(tokenizer([t.format(c) for c in CLASSES for t in TEMPLATES]), tokenizer.pad_id).shape[1]


class _CountCalls:
    """Wraps a captioner's ``score_text_with_memory`` (the decoder calls of `likelihood_scores`) and keeps the
    number of sequences of each call."""

    def __init__(self, method):
        self.sizes, self.score = [], method.score_text_with_memory
        method.score_text_with_memory = self

    def __call__(self, memory, text):
        self.sizes.append(len(text))
        return self.score(memory, text)


@pytest.mark.parametrize("name", ["mug", "cap"])
def test_likelihood_scores_do_not_depend_on_the_prompt_chunks(name, smoke_cfg, spec, toy_samples, tokenizer):
    """A budget of 6 sequences per call scores each 2-image batch 3 prompts at a time (5 calls per batch,
    chunks cutting through classes) and the last, 1-image batch 6 at a time; the scores are bitwise those
    of one call per batch. mug's scores
    depend on its random masks (another seed gives others), so every chunk saw its batch's masks."""
    method = build_method(name, smoke_cfg, spec)
    images = _images(smoke_cfg, toy_samples, 5)
    per = sequence_bytes(decoder_size(method), _prompt_length(tokenizer))
    calls = _CountCalls(method)
    tiny = likelihood_scores(method, images, CLASSES, TEMPLATES, tokenizer, seed=0, batch_size=2,
                             max_memory_mb=6.5 * per / 2 ** 20)
    assert calls.sizes == [6] * 10 + [6, 6, 3]
    calls.sizes.clear()
    large = likelihood_scores(method, images, CLASSES, TEMPLATES, tokenizer, seed=0, batch_size=2,
                              max_memory_mb=1024)
    assert calls.sizes == [30, 30, 15]  # every prompt of a batch in one call
    assert tiny.shape == (5, len(CLASSES)) and torch.equal(tiny, large)
    other_seed = likelihood_scores(method, images, CLASSES, TEMPLATES, tokenizer, seed=1, batch_size=2)
    assert torch.equal(other_seed, large) == (name == "cap")  # cap encodes whole images: no randomness


def test_a_budget_below_one_prompt_per_image_splits_the_encoded_batch(smoke_cfg, spec, toy_samples, tokenizer):
    """With room for 3 sequences a call, a batch of 5 images is encoded once (mug: one mask draw) and decoded
    3 and 2 images at a time: calls never outgrow the budget, and the scores are those of one call per batch
    up to float rounding."""
    method = build_method("mug", smoke_cfg, spec)
    images = _images(smoke_cfg, toy_samples, 5)
    per = sequence_bytes(decoder_size(method), _prompt_length(tokenizer))
    whole = likelihood_scores(method, images, CLASSES, TEMPLATES, tokenizer, seed=0, batch_size=5)
    calls = _CountCalls(method)
    scores = likelihood_scores(method, images, CLASSES, TEMPLATES, tokenizer, seed=0, batch_size=5,
                               max_memory_mb=3.5 * per / 2 ** 20)
    assert calls.sizes == [3] * 15 + [2] * 15
    # The same masks and tokens; decoding 3 rows instead of 5 changes only the kernels' float rounding.
    torch.testing.assert_close(scores, whole, rtol=1e-5, atol=1e-6)


def test_a_captioner_without_an_encode_once_path_is_scored_by_score_text(smoke_cfg, spec, toy_samples, tokenizer):
    """A method offering only ``score_text`` (a plugin) gets batches that fit one call, each call seeded
    from its batch, and the same scores as the encode-once path where a batch fits (cap: no masks)."""
    method = build_method("cap", smoke_cfg, spec)
    images = _images(smoke_cfg, toy_samples, 5)

    class ScoreTextOnly:
        text_spec, encoder, caption_decoder = method.text_spec, method.encoder, method.caption_decoder
        score_text = staticmethod(method.score_text)

    plain = likelihood_scores(ScoreTextOnly(), images, CLASSES, TEMPLATES, tokenizer, seed=0, batch_size=2)
    assert torch.equal(plain, likelihood_scores(method, images, CLASSES, TEMPLATES, tokenizer, seed=0, batch_size=2))


def test_the_protocol_scores_within_its_memory_budget(smoke_cfg, spec, toy_samples, tokenizer):
    """`eval.zeroshot.max_memory_mb` reaches the scoring: at 1 MB no call holds more sequences than the
    budget allows, and the images are judged as by one call per batch."""
    from mugbench.eval.harness import run_protocol
    from mugbench.eval.zeroshot import sequences_per_call
    from mugbench.evalset import ClassificationSet, LabelledImages

    method = build_method("mug", smoke_cfg, spec)
    images = _images(smoke_cfg, toy_samples, 6)
    scores = likelihood_scores(method, images, CLASSES, TEMPLATES, tokenizer, seed=smoke_cfg.seed,
                               batch_size=smoke_cfg.eval.batch_size, max_memory_mb=1024)
    labels = scores.argmax(1)
    labels[::2] = (labels[::2] + 1) % len(CLASSES)  # images 0, 2 and 4 wrong
    val = LabelledImages(images, labels, [f"v{i}" for i in range(6)])
    data = ClassificationSet(name="shapes", classes=CLASSES, train=val, val=val, train_batches=lambda **_: iter(()),
                             prompts=TEMPLATES)
    calls = _CountCalls(method)
    result = run_protocol("zeroshot", method, data, load_config("smoke", ["eval.zeroshot.max_memory_mb=1"]),
                          tokenizer=tokenizer)
    assert result.per_example["top1"].tolist() == [False, True] * 3 and result.options["max_memory_mb"] == 1
    allowed = sequences_per_call(decoder_size(method), _prompt_length(tokenizer), 1)
    assert len(calls.sizes) > 1 and max(calls.sizes) <= allowed < 6 * len(CLASSES) * len(TEMPLATES)


def _rank_scores(threads: int, budget_mb: float) -> tuple:
    """On one gloo rank: the zero-shot scores it gathers for mug (likelihood) and clip (embeddings)."""
    from mugbench.data.pretrain import text_spec
    from mugbench.data.tokenizer import TextTokenizer, corpus_vocab
    from mugbench.data.toy import ToyWorld

    torch.set_num_threads(threads)  # as the parent process: the same kernels
    world = ToyWorld(seed=0)
    samples = [world.sample("pretrain", i) for i in range(32)]  # the conftest fixtures, rebuilt
    tokenizer = TextTokenizer(32, corpus_vocab(c for s in samples for c in s.captions))
    cfg = load_config("smoke")
    spec = text_spec(cfg, tokenizer)
    images = _images(cfg, samples, 5)
    mug = likelihood_scores(build_method("mug", cfg, spec), images, CLASSES, TEMPLATES, tokenizer, seed=0,
                            batch_size=2, max_memory_mb=budget_mb)
    clip = embedding_scores(build_method("clip", cfg, spec), images, CLASSES, TEMPLATES, tokenizer, batch_size=2)
    return mug, clip


@pytest.mark.slow
def test_two_ranks_score_zero_shot_as_one_process(smoke_cfg, spec, toy_samples, tokenizer):
    """Two gloo ranks split 3 image batches (2 + 1) and 5 classes (3 + 2); the scores each rank gathers
    equal one process's bit for bit: mug's likelihoods (random masks seeded per batch, 6 sequences per
    call) and clip's prompt-ensemble similarities."""
    from gloo import run_on_ranks

    images = _images(smoke_cfg, toy_samples, 5)
    method = build_method("mug", smoke_cfg, spec)
    budget_mb = 6.5 * sequence_bytes(decoder_size(method), _prompt_length(tokenizer)) / 2 ** 20
    mug = likelihood_scores(method, images, CLASSES, TEMPLATES, tokenizer, seed=0, batch_size=2,
                            max_memory_mb=budget_mb)
    clip = embedding_scores(build_method("clip", smoke_cfg, spec), images, CLASSES, TEMPLATES, tokenizer,
                            batch_size=2)
    for rank_mug, rank_clip in run_on_ranks(_rank_scores, 2, torch.get_num_threads(), budget_mb):
        assert torch.equal(rank_mug, mug) and torch.equal(rank_clip, clip)


_MEMORY_SCRIPT = textwrap.dedent("""
    import re, sys
    import torch
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, SIMPLE_IMAGENET_TEMPLATES
    from mugbench.config import load_config
    from mugbench.data.pretrain import text_spec
    from mugbench.data.tokenizer import TextTokenizer
    from mugbench.eval.zeroshot import likelihood_scores
    from mugbench.runs import build_method

    def status(key):  # KB, from the kernel's view of this process
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

    cfg = load_config("smoke", ["text.vocab=full"])
    tokenizer = TextTokenizer(cfg.text.context_length)
    method = build_method("cap", cfg, text_spec(cfg, tokenizer))
    images = torch.randn(1, 3, cfg.encoder.img_size, cfg.encoder.img_size)
    templates = tuple(t("{}") for t in SIMPLE_IMAGENET_TEMPLATES)
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from here: scoring's own
    scores = likelihood_scores(method, images, list(IMAGENET_CLASSNAMES), templates, tokenizer, seed=0,
                               batch_size=cfg.eval.batch_size, max_memory_mb=int(sys.argv[1]))
    assert scores.shape == (1, 1000) and bool(scores.isfinite().all())
    print(before, status("VmHWM"))
""")



@pytest.mark.slow
def test_scoring_imagenet_classes_with_the_full_vocabulary_stays_within_its_budget():
    """ImageNet's 1,000 classes x 7 prompts on an image, a captioner over the full 49,408-token vocabulary
    (smoke preset, context 32), at ``max_memory_mb=256``: the peak resident memory while scoring (Linux's
    VmHWM, reset just before) must exceed the memory before it by less than twice the budget. The old
    single call per image batch held 7,000 sequences x 31 positions x 49,408 logits in float32 plus
    log_softmax's copy: 86 GB."""
    budget = 256
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(budget)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = (int(x) for x in out.stdout.split())  # resident KB before, and the peak while scoring
    growth_mb = (after - before) / 1024
    print(f"\nzero-shot over 1,000 ImageNet classes x 7 prompts: peak memory grew by {growth_mb:.0f} MB "
          f"(budget {budget} MB)")
    assert growth_mb < 2 * budget, f"scoring grew the peak memory by {growth_mb:.0f} MB"
