"""Input-pipeline benchmark: images/s of one loader worker decoding and augmenting JPEG shards to
224 px, mugbench's pipeline against a plain PIL full decode with the same augmentation, side by
side in one run (`mugbench bench input-pipeline`).

The shards are generated here: photo-like JPEGs (a smooth random field plus fine grain, quality
90, so they compress like photographs rather than flat test patterns) in two size mixes:
``img2dataset-256`` (shorter side 256, what ``img2dataset --image_size 256 --resize_mode
keep_ratio`` writes for CC3M/CC12M) and ``web-originals`` (shorter side 480-1200 px, as
LAION-style sets without resizing hold).
"""
from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from ..config import AugmentConfig
from ..data.decode import draft_size
from ..data.pipeline import DecodeOptions, make_loader
from ..data.transforms import base_view_spec, build_view_transform
from ..files import atomic_write

SIZE_MIXES = {"img2dataset-256": (256, 256), "web-originals": (480, 1200)}
ASPECTS = (4 / 3, 3 / 2, 1.0, 16 / 9)


def photo_like_jpeg(rng: np.random.Generator, shorter: int) -> bytes:
    """A JPEG whose statistics resemble a photograph's: smooth colour regions and grain."""
    aspect = ASPECTS[rng.integers(len(ASPECTS))]
    w, h = (round(shorter * aspect), shorter) if rng.random() < 0.7 else (shorter, round(shorter * aspect))
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    grain = rng.normal(0, 10, (h, w, 3))
    pixels = np.clip(np.asarray(coarse, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shard(path: Path, count: int, shorter_range: tuple[int, int], seed: int = 0) -> int:
    """Write ``count`` photo-like samples (jpg + txt) to one shard; returns its size in bytes. Written
    whole or not at all (`atomic_write`): `run` reuses a shard that exists, so a cut-off one must never."""
    rng = np.random.default_rng(seed)

    def write(tmp: str) -> None:
        with wds.TarWriter(tmp, encoder=False) as sink:
            for i in range(count):
                shorter = int(rng.integers(shorter_range[0], shorter_range[1] + 1))
                sink.write({"__key__": f"{i:06d}", "jpg": photo_like_jpeg(rng, shorter), "txt": b"a photo"})

    return atomic_write(path, write).stat().st_size


def _rate(batches, warmup: int) -> float:
    """Images per second over what ``batches`` yields after ``warmup`` images."""
    seen, start = 0, None
    for batch in batches:
        seen += len(batch)
        if start is None and seen >= warmup:
            start, seen = time.perf_counter(), 0
    return seen / max(time.perf_counter() - start, 1e-9)


def plain_pil_batches(path: Path, transform, batch_size: int):
    """The baseline: tarfile + PIL full decode + the same transform, no webdataset, no draft."""
    with tarfile.open(path) as tar:
        batch = []
        for member in tar:
            if member.name.endswith(".jpg"):
                image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                batch.append(transform(image))
                if len(batch) == batch_size:
                    yield torch.stack(batch)
                    batch = []


def mugbench_batches(path: Path, transform, batch_size: int, decode: DecodeOptions, workers: int):
    """mugbench's loader over the same shard (no shuffling, so both read the same images)."""
    loader = make_loader(str(path), batch_size=batch_size, image_transforms=[transform], tokenizer=None,
                         need_caption=False, shuffle=False, seed=0, num_workers=workers, decode=decode)
    return (batch["image"] for batch in loader)


def run(workdir: Path, images: int = 384, image_size: int = 224, workers: int = 0, batch_size: int = 32,
        repeats: int = 3) -> dict:
    """Measure every pipeline on every size mix; returns ``{mix: {pipeline: images/s, ...}}``.

    ``workers=0`` decodes in the measuring process itself: the throughput of one worker.
    """
    torch.set_num_threads(1)  # a loader worker runs single-threaded; so does the baseline here
    spec = base_view_spec(AugmentConfig())  # every method's default base view: MAE's RandomResizedCrop(0.2, 1.0)
    transform = build_view_transform(spec, image_size)
    draft = DecodeOptions(draft_to=draft_size(image_size, [spec.scale[0]]))
    warmup = 2 * batch_size
    out = {}
    for mix, shorter_range in SIZE_MIXES.items():
        shard = workdir / f"{mix}.tar"
        nbytes = shard.stat().st_size if shard.exists() else write_shard(shard, images + warmup, shorter_range)
        pipelines = {
            "plain_pil_full_decode": lambda: plain_pil_batches(shard, transform, batch_size),
            "mugbench_no_draft": lambda: mugbench_batches(shard, transform, batch_size, DecodeOptions(), workers),
            "mugbench": lambda: mugbench_batches(shard, transform, batch_size, draft, workers),
        }
        # Round-robin repeats, median of each: a slow moment of the machine then hits every pipeline alike.
        rates = {name: [] for name in pipelines}
        for _ in range(repeats):
            for name, batches in pipelines.items():
                rates[name].append(_rate(batches(), warmup))
        result = {name: float(np.median(r)) for name, r in rates.items()}
        result["ratio_mugbench_to_plain"] = result["mugbench"] / result["plain_pil_full_decode"]
        result.update(images=images, repeats=repeats, kb_per_image=nbytes / 1024 / (images + warmup), shorter_side=list(shorter_range),
                      draft_to=draft.draft_to)
        out[mix] = result
    return out


def format_table(results: dict, image_size: int, workers: int) -> str:
    """Markdown table of a `run`."""
    who = "one loader worker" if workers == 0 else f"{workers} loader workers"
    lines = [f"Decode + RandomResizedCrop(0.2-1) + flip to {image_size} px, {who}, images/s:", "",
             "| shards | KB/image | plain PIL full decode | mugbench, draft off | mugbench | ratio |",
             "|---|---|---|---|---|---|"]
    for mix, r in results.items():
        lines.append(f"| {mix} (shorter side {r['shorter_side'][0]}-{r['shorter_side'][1]}) | {r['kb_per_image']:.0f} | "
                     f"{r['plain_pil_full_decode']:.0f} | {r['mugbench_no_draft']:.0f} | {r['mugbench']:.0f} | "
                     f"{r['ratio_mugbench_to_plain']:.2f}x |")
    return "\n".join(lines)
