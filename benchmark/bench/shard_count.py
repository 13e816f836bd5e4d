"""Shard-count benchmark: how long counting a shard set's samples takes without
``data.samples_per_epoch`` (`mugbench.data.shard_count`): the header pass on a cold cache, the
cached call, and img2dataset's stats files.

    python -m mugbench.bench.shard_count --shards 100 --samples 10000 --workdir /tmp/shard-bench

writes ``--shards`` webdataset tars of ``--samples`` samples each (a tiny JPEG, a caption and a JSON
per sample, as img2dataset lays them out) under ``--workdir``, times the counts and prints
shards/s and samples/s. Payloads are tiny, so the files sit in the page cache: the figures are the
per-header cost of the pass; on a network file system each shard adds its seek latency. The shards
are removed afterwards unless ``--keep`` (a later run with the same sizes reuses kept ones).
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image

from ..data.shard_count import count_samples, stats_file
from ..files import atomic_write_text


def _members(shard: int, samples: int, image: bytes) -> list[tuple[str, bytes]]:
    members = []
    for i in range(samples):
        key = f"{shard:05d}{i:04d}"
        meta = json.dumps({"url": f"http://example.com/{key}.jpg", "key": key, "status": "success"}).encode()
        members += [(f"{key}.jpg", image), (f"{key}.txt", f"sample {key}".encode()), (f"{key}.json", meta)]
    return members


def write_shards(folder: Path, shards: int, samples: int) -> list[str]:
    """``shards`` tars of ``samples`` samples each in ``folder`` (kept ones of the same sizes are reused),
    each with img2dataset's stats file beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "sizes.json"
    paths = [folder / f"{i:05d}.tar" for i in range(shards)]
    if marker.is_file() and json.loads(marker.read_text()) == [shards, samples] and all(p.is_file() for p in paths):
        return [str(p) for p in paths]
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(buf, "JPEG")
    with tarfile.open(paths[0], "w") as tar:  # the pass never looks inside: one image, one shard
        for name, data in _members(0, samples, buf.getvalue()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    for path in paths:  # the others are copies (their keys repeat, which counting per shard ignores)
        if path != paths[0]:
            shutil.copyfile(paths[0], path)
        stats_file(path).write_text(json.dumps({"count": samples, "successes": samples}))
    marker.write_text(json.dumps([shards, samples]))
    return [str(p) for p in paths]


def _timed(label: str, urls: list[str], cache: Path, expected: int) -> dict:
    start = time.perf_counter()
    total, source = count_samples(urls, cache, log=lambda msg: None)
    seconds = time.perf_counter() - start
    if total != expected:
        raise RuntimeError(f"{label}: counted {total:,} samples, expected {expected:,}")
    return {"case": label, "source": source, "samples": total, "seconds": seconds,
            "shards_per_s": len(urls) / seconds, "samples_per_s": total / seconds}


def run(shards: int, samples: int, workdir: Path, keep: bool = False) -> list[dict]:
    """Generate (or reuse) the shards, time the three ways of counting them, return one row per way."""
    folder = workdir / f"shards-{shards}x{samples}"
    t0 = time.perf_counter()
    urls = write_shards(folder, shards, samples)
    print(f"{shards} shards x {samples:,} samples ready in {time.perf_counter() - t0:.1f} s ({folder})")
    expected = shards * samples
    try:
        with tempfile.TemporaryDirectory(prefix="mugbench-count-", dir=workdir) as cache:
            rows = [_timed("stats files", urls, Path(cache), expected)]
            for url in urls:  # hide the stats files: from here on the headers are counted
                stats_file(url).rename(stats_file(url).with_suffix(".hidden"))
            try:
                rows.append(_timed("header pass, cold cache", urls, Path(cache), expected))
                rows.append(_timed("header pass, cached", urls, Path(cache), expected))
            finally:
                for url in urls:
                    stats_file(url).with_suffix(".hidden").rename(stats_file(url))
    finally:
        if not keep:
            shutil.rmtree(folder)
    return rows


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of `run`'s rows."""
    lines = [f"{'case':26s} {'samples':>12s} {'seconds':>9s} {'shards/s':>11s} {'samples/s':>13s}"]
    lines += [f"{r['case']:26s} {r['samples']:>12,} {r['seconds']:>9.3f} {r['shards_per_s']:>11,.0f} "
              f"{r['samples_per_s']:>13,.0f}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m mugbench.bench.shard_count --shards N --samples M --workdir DIR``."""
    parser = argparse.ArgumentParser(prog="python -m mugbench.bench.shard_count", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=100, help="shards to write (default: 100)")
    parser.add_argument("--samples", type=int, default=10_000, help="samples per shard (default: 10,000)")
    parser.add_argument("--workdir", type=Path, required=True, help="where the shards and the cache go")
    parser.add_argument("--keep", action="store_true", help="keep the shards for a later run")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.shards < 1 or args.samples < 1:
        parser.error("--shards and --samples must be at least 1")
    rows = run(args.shards, args.samples, args.workdir, keep=args.keep)
    print(format_rows(rows))
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
