"""Train-step benchmark (`mugbench bench`): for each method, the steady-state time of one
optimiser step on synthetic batches already on the device, images/s, FLOPs per image (torch's
FLOP counter), peak memory and, on CUDA, model FLOPs utilisation against a measured bf16 matmul
peak; beside it the same numbers for a plain timm ViT of the same architecture trained on every
token, and each method's ratio to it; and the shared trainer's overhead over the bare loop of
the same method on the same pre-loaded batch. Measured side by side in one process.

``variants`` measure each fast path before and after, in the same run: the same step with one
fast path switched off (``math-attention``, ``loop-adamw``, ``full-context-text``) or with an
option switched on (``compiled``, ``grad-checkpointing``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ..config import StudyConfig
from ..data.tokenizer import TextTokenizer, corpus_vocab, trim_padding
from ..data.transforms import method_view_specs
from ..models.vit import build_encoder
from ..registry import get_method
from ..data.pretrain import text_spec
from ..runs import build_method
from ..train.distributed import DistInfo
from ..models.text import full_context
from ..train.loop import (
    CompiledOrEager, autocast, build_optimizer, enable_grad_checkpointing, memory_in_use_mb, run_after_step, train,
)

PLAIN_TIMM = "timm-vit (all tokens)"
# CC3M captions run about 10 words; synthetic captions of that length keep the text towers honest.
_WORDS = "a photo of the red dog cat man woman car street tree on in with next to at sunset beach city".split()


@dataclass
class StepStats:
    """One row of the benchmark table."""

    name: str
    batch: int
    step_ms: float
    images_per_s: float
    gflops_per_image: float
    peak_mem_mb: float
    mfu: float | None = None
    ratio_to_plain: float | None = None
    trainer_overhead: float | None = None  # the shared trainer's time over the bare loop's, minus 1
    variant_ms: dict = dataclasses.field(default_factory=dict)  # variant name -> ms/step of the same step

    def metrics(self) -> dict[str, float]:
        """The numbers a result record keeps."""
        out = {"step_ms": self.step_ms, "images_per_s": self.images_per_s, "gflops_per_image": self.gflops_per_image,
               "peak_mem_mb": self.peak_mem_mb}
        if self.mfu is not None:
            out["mfu"] = self.mfu
        if self.ratio_to_plain is not None:
            out["time_ratio_to_plain_vit"] = self.ratio_to_plain
        if self.trainer_overhead is not None:
            out["trainer_overhead"] = self.trainer_overhead
        for variant, ms in self.variant_ms.items():
            out[f"time_ratio_{variant.replace('-', '_')}"] = ms / self.step_ms
        return out


def synthetic_captions(count: int, seed: int = 0) -> list[str]:
    """Ten-word captions drawn from a small word list."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(10)) for _ in range(count)]


def synthetic_tokenizer(cfg: StudyConfig) -> TextTokenizer:
    """The study's tokenizer for synthetic captions: the full BPE, or (``text.vocab: corpus``) the compact
    vocabulary of the captions seen, as in the study."""
    if cfg.text.vocab == "corpus":
        return TextTokenizer(cfg.text.context_length, corpus_vocab(synthetic_captions(512)))
    return TextTokenizer(cfg.text.context_length)


def synthetic_batch(cfg: StudyConfig, method_cls, tokenizer: TextTokenizer, batch: int, device, seed: int = 0) -> dict:
    """Random images for every view the method trains on (`method_view_specs`: the study's base view
    plus its extra views) and tokenised ten-word captions, on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    size = cfg.encoder.img_size
    views = [torch.randn(batch, 3, size, size, generator=gen).to(device)
             for _ in method_view_specs(method_cls, cfg.data.augment)]
    captions = synthetic_captions(batch, seed)
    # Trimmed as the loader trims (`trim_padding`), so text towers cost what they cost in training.
    text = trim_padding(tokenizer(captions), tokenizer.pad_id)
    out = {"image": views[0], "caption": captions, "text": text.to(device),
           "label": torch.zeros(batch, dtype=torch.long, device=device)}
    if len(views) > 1:
        out["image_views"] = views
    return out


class _PlainViT(torch.nn.Module):
    """The reference step: the shared ViT on every token, mean-pooled, a linear head, cross-entropy.
    It trains on the study's base view alone (no ``extra_views``)."""

    def __init__(self, cfg: StudyConfig):
        super().__init__()
        self.encoder = build_encoder(cfg.encoder, seed=0)
        self.head = torch.nn.Linear(cfg.encoder.embed_dim, 1000)

    def forward(self, batch: dict) -> dict:
        tokens = self.encoder.forward_features(batch["image"])
        return {"loss": F.cross_entropy(self.head(tokens.mean(1)), batch["label"])}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device, size: int = 8192, repeats: int = 20) -> float:
    """Measured bf16 matmul throughput of the device in TFLOP/s (the MFU denominator)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e12


@dataclass(frozen=True)
class Variant:
    """A change to the measured step: ``train`` settings, a context around each step, a module
    change, a batch change; ``applies`` says which methods it can change at all."""

    doc: str
    train: dict = dataclasses.field(default_factory=dict)
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    module: Callable[[torch.nn.Module], object] | None = None
    batch: Callable[[dict, object], dict] | None = None
    applies: Callable[[type], bool] = lambda cls: True


def _math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _checkpointed(module):
    enable_grad_checkpointing(module)
    return module


VARIANTS = {
    "math-attention": Variant("every attention (timm's, open_clip's, the decoders') on SDPA's unfused math kernel",
                              context=_math_attention),
    "loop-adamw": Variant("AdamW one parameter at a time instead of foreach (CPU) / fused (CUDA)",
                          train={"optimizer_impl": "loop"}),
    "full-context-text": Variant("captions padded to the whole context instead of the batch's longest",
                                 batch=lambda b, spec: dict(b, text=full_context(b["text"], spec)),
                                 applies=lambda cls: getattr(cls, "needs_text", False)),
    "compiled": Variant("torch.compile (inductor) of the whole method", train={"compile": True}),
    "grad-checkpointing": Variant("activations recomputed in the backward pass", module=_checkpointed),
}


def measure(name: str, module: torch.nn.Module, batch: dict, cfg: StudyConfig, device, steps: int,
            warmup: int, variant: Variant = Variant(""), count_flops: bool = True) -> StepStats:
    """Steady-state time of the bare loop's step (forward, backward, the recipe's gradient clipping,
    AdamW, the method's ``after_step``), FLOPs of one step (NaN with ``count_flops=False``, for
    callers that keep only the time: counting costs one more step, a long one at paper scale), peak
    memory; ``variant`` changes the step (see `VARIANTS`)."""
    module.to(device).train()
    train_cfg = dataclasses.replace(cfg.train, **variant.train)
    if variant.module is not None:
        variant.module(module)
    optimizer = build_optimizer(module, train_cfg, device)
    forward = CompiledOrEager(module, train_cfg.compile_backend) if train_cfg.compile else module
    n = batch["image"].shape[0]

    def step():
        with autocast(cfg.train, device), variant.context():
            loss = forward(batch)["loss"]
        loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.train.grad_clip)
        optimizer.step()
        run_after_step(module)  # as the trainer does, so the measured step is the trained one
        optimizer.zero_grad(set_to_none=True)

    flops = float("nan")
    if count_flops:
        with FlopCounterMode(display=False) as counter:
            with autocast(cfg.train, device), variant.context():
                loss = module(batch)["loss"]
            loss.backward()
        optimizer.zero_grad(set_to_none=True)
        flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    durations = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        durations.append(time.perf_counter() - start)
    seconds = statistics.median(durations)  # the median step: robust to a busy moment of the machine
    return StepStats(name=name, batch=n, step_ms=1000 * seconds, images_per_s=n / seconds,
                     gflops_per_image=flops / n / 1e9, peak_mem_mb=memory_in_use_mb(device))


def trainer_step_ms(name: str, cfg: StudyConfig, spec, batch: dict, device, steps: int, warmup: int) -> float:
    """The shared trainer (`train.loop.train`: logging, schedule, checkpoint bookkeeping) on the same
    pre-loaded batch: ms per step after ``warmup`` steps. The final checkpoint write is not timed."""
    method = build_method(name, cfg, spec)
    times = []

    def batches(epoch):
        for _ in range(warmup + steps + 1):  # the last fetch ends the last timed step
            times.append(time.perf_counter())
            yield dict(batch)

    train_cfg = dataclasses.replace(cfg.train, epochs=1, ckpt_every=10 ** 9)
    with tempfile.TemporaryDirectory(prefix="mugbench-bench-") as workdir:
        with contextlib.redirect_stderr(io.StringIO()):  # no progress bar in the table's way
            train(method, batches, train_cfg, steps_per_epoch=warmup + steps + 1, workdir=Path(workdir),
                  info=DistInfo(device=device), seed=0, desc=name)
    # One step lies between consecutive batch fetches; the median, as for the bare loop.
    return 1000 * statistics.median(b - a for a, b in zip(times[warmup:], times[warmup + 1:]))


def run(cfg: StudyConfig, methods: list[str], *, device, steps: int = 10, warmup: int = 3,
        batch_size: int | None = None, variants: Sequence[str] = (), rounds: int = 3) -> list[StepStats]:
    """Benchmark the plain ViT step and every method's step on the same synthetic batches, and each
    of ``variants`` (names of `VARIANTS`) of every step it applies to; the trainer's overhead is the
    median over ``rounds`` alternations of the bare loop and the trainer."""
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown bench variant {unknown[0]!r}: choose from {', '.join(VARIANTS)}")
    tokenizer = synthetic_tokenizer(cfg)
    spec = text_spec(cfg, tokenizer)
    batch = batch_size or cfg.train.batch_size // cfg.train.accum_steps
    peak = matmul_peak_tflops(device) if device.type == "cuda" else None
    torch.manual_seed(0)
    def variants_of(row: StepStats, build, data: dict, cls) -> None:
        for v in variants:
            if VARIANTS[v].applies(cls):
                changed = VARIANTS[v].batch(data, spec) if VARIANTS[v].batch else data
                row.variant_ms[v] = measure(row.name, build(), changed, cfg, device, steps, warmup, VARIANTS[v],
                                            count_flops=False).step_ms

    plain = synthetic_batch(cfg, _PlainViT, tokenizer, batch, device)
    rows = [measure(PLAIN_TIMM, _PlainViT(cfg), plain, cfg, device, steps, warmup)]
    variants_of(rows[0], lambda: _PlainViT(cfg), plain, _PlainViT)
    for name in methods:
        method = build_method(name, cfg, spec)
        data = synthetic_batch(cfg, type(method), tokenizer, batch, device)
        rows.append(measure(name, method, data, cfg, device, steps, warmup))
        # The bare loop and the trainer alternate for ``rounds`` rounds, and the median of the rounds'
        # ratios is kept: a slow spell of a shared machine then lands on both sides of a ratio.
        ratios = [trainer_step_ms(name, cfg, spec, data, device, steps, warmup) / rows[-1].step_ms]
        for _ in range(rounds - 1):
            bare_ms = measure(name, method, data, cfg, device, steps, warmup, count_flops=False).step_ms
            ratios.append(trainer_step_ms(name, cfg, spec, data, device, steps, warmup) / bare_ms)
        del method
        rows[-1].trainer_overhead = statistics.median(ratios) - 1
        variants_of(rows[-1], lambda name=name: build_method(name, cfg, spec), data, get_method(name))
    for row in rows:
        row.ratio_to_plain = row.step_ms / rows[0].step_ms
        if peak:
            row.mfu = row.gflops_per_image * row.images_per_s / 1e3 / peak
    return rows


def record_dataset(device, compiled: bool) -> str:
    """The ``dataset`` field of a train-step record: ``synthetic`` plus the device and compilation,
    so a CUDA or a compiled measurement sits beside the CPU eager one instead of replacing it."""
    return "-".join(["synthetic"] + (["cuda"] if device.type == "cuda" else []) + (["compiled"] if compiled else []))


def format_table(rows: list[StepStats], device, preset: str) -> str:
    """Markdown table of a `run`."""
    lines = [f"Train step on synthetic batches ({preset} preset, {device}):", "",
             "| step | batch | ms/step | images/s | GFLOP/image | peak MB | MFU | time vs plain ViT | trainer overhead |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{100 * r.mfu:.0f}%" if r.mfu is not None else "-"
        overhead = f"{100 * r.trainer_overhead:+.1f}%" if r.trainer_overhead is not None else "-"
        lines.append(f"| {r.name} | {r.batch} | {r.step_ms:.1f} | {r.images_per_s:.3g} | {r.gflops_per_image:.3g} | "
                     f"{r.peak_mem_mb:.0f} | {mfu} | {r.ratio_to_plain:.2f}x | {overhead} |")
    names = list(dict.fromkeys(v for r in rows for v in r.variant_ms))
    if names:
        lines += ["", "Before/after: each variant's ms/step as a multiple of the default step (measured in this run; "
                  "> 1 means the default's fast path saves that much):", "",
                  "| step | default ms | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for r in rows:
            cells = [f"{r.variant_ms[v]:.1f} ({r.variant_ms[v] / r.step_ms:.2f}x)" if v in r.variant_ms else "-"
                     for v in names]
            lines.append(f"| {r.name} | {r.step_ms:.1f} | " + " | ".join(cells) + " |")
        lines += [""] + [f"- {v}: {VARIANTS[v].doc}" for v in names]
    return "\n".join(lines)
