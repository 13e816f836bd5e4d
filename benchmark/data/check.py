"""`mugbench data check`: read every sample of a shard set, in parallel over shards, the way
training reads it, and summarise what is there and what is wrong.

Each shard is checked by `check_shard` in a worker process with the training pipeline's own
stages (`pipeline._sample_pipeline`), so a sample counted bad here is exactly a sample the
trainer skips. Images are decoded in full (no draft mode), which also catches files cut off
mid-download.
"""
from __future__ import annotations

import multiprocessing
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

import webdataset as wds

from .catalog import expand_urls
from .pipeline import DecodeOptions, SkipCounter, _sample_pipeline, _ToExample


def distribution(counts: Counter) -> dict:
    """Count, mean, min, 5th/50th/95th percentile and max of integer values given as a
    value -> count Counter (exact: the values of caption lengths and image sides are few).
    Percentiles are numpy's "lower" method: always a value that occurs."""
    total = sum(counts.values())
    if not total:
        return {"count": 0}
    ordered = sorted(counts.items())

    def percentile(q: float) -> int:
        rank, seen = q * (total - 1), 0
        for value, n in ordered:
            seen += n
            if seen > rank:
                return value
        return ordered[-1][0]

    mean = sum(v * n for v, n in ordered) / total
    return {"count": total, "mean": round(mean, 2), "min": ordered[0][0], "p5": percentile(0.05),
            "p50": percentile(0.5), "p95": percentile(0.95), "max": ordered[-1][0]}


def check_shard(url: str, need_caption: bool = True, decode: DecodeOptions = DecodeOptions()) -> dict:
    """Read one shard; counts, bad keys and the raw value counts behind the statistics."""
    counter = SkipCounter(keep_keys=True)
    to_example = _ToExample(counter, None, 0, 0, need_caption, False, False, None, decode)
    stages = _sample_pipeline([url], counter, to_example, shuffle=False, seed=0, epoch=0,
                              shuffle_buffer=0, split=False)
    words, chars, widths, heights = Counter(), Counter(), Counter(), Counter()
    good = 0
    for example in wds.DataPipeline(*stages):
        good += 1
        width, height = example["views"][0].size
        widths[width] += 1
        heights[height] += 1
        words[len(example["caption"].split())] += 1
        chars[len(example["caption"])] += 1
    return {"url": url, "samples": good, "skipped": counter.counts, "repaired": counter.repaired,
            "bad_keys": [(url, key, reason) for key, reason in counter.bad_keys],
            "words": words, "chars": chars, "widths": widths, "heights": heights}


def _check_one(args: tuple) -> dict:
    return check_shard(*args)


def check_shard_set(urls: str | Sequence[str], *, workers: int = 1, need_caption: bool = True,
                    decode: DecodeOptions = DecodeOptions()) -> dict:
    """Check every shard (``workers`` processes in parallel) and merge the results.

    Returns a JSON-ready summary: ``shards``, ``samples`` (good), ``bad`` and
    ``bad_fraction``, ``skipped`` (reason -> count), ``repaired`` (kind -> count),
    ``caption_words`` / ``caption_chars`` / ``image_width`` / ``image_height``
    distributions of the good samples, and ``bad_keys`` ``[shard, key, reason]``.
    """
    urls = expand_urls(urls)
    jobs = [(url, need_caption, decode) for url in urls]
    if workers > 1 and len(urls) > 1:
        # fork where there is one: workers need no re-import of torch (spawn costs seconds each).
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin" else "spawn"
        with ProcessPoolExecutor(max_workers=min(workers, len(urls)),
                                 mp_context=multiprocessing.get_context(method)) as pool:
            parts = list(pool.map(_check_one, jobs))
    else:
        parts = [_check_one(job) for job in jobs]
    merged = {name: Counter() for name in ("skipped", "repaired", "words", "chars", "widths", "heights")}
    for part in parts:
        for name, total in merged.items():
            total.update(part[name])
    good = sum(p["samples"] for p in parts)
    bad = sum(merged["skipped"].values())
    return {
        "shards": len(urls), "samples": good, "bad": bad, "bad_fraction": round(bad / max(1, good + bad), 6),
        "skipped": dict(sorted(merged["skipped"].items())), "repaired": dict(sorted(merged["repaired"].items())),
        "caption_words": distribution(merged["words"]), "caption_chars": distribution(merged["chars"]),
        "image_width": distribution(merged["widths"]), "image_height": distribution(merged["heights"]),
        "bad_keys": [list(entry) for part in parts for entry in part["bad_keys"]],
    }


def format_report(report: dict) -> str:
    """The human-readable summary `mugbench data check` prints."""
    def dist(d: dict) -> str:
        if not d.get("count"):
            return "-"
        return f"mean {d['mean']}, min {d['min']}, p5 {d['p5']}, median {d['p50']}, p95 {d['p95']}, max {d['max']}"

    skipped = ", ".join(f"{k}={v}" for k, v in report["skipped"].items()) or "none"
    repaired = ", ".join(f"{k}={v}" for k, v in report["repaired"].items()) or "none"
    return "\n".join([
        f"shards: {report['shards']}  good samples: {report['samples']}  bad: {report['bad']} "
        f"({100 * report['bad_fraction']:.2f}%)",
        f"skipped by kind: {skipped}",
        f"repaired to RGB (kept): {repaired}",
        f"caption words: {dist(report['caption_words'])}",
        f"caption chars: {dist(report['caption_chars'])}",
        f"image width:   {dist(report['image_width'])}",
        f"image height:  {dist(report['image_height'])}",
    ])
