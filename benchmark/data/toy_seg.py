"""The toy world's segmentation splits in mmsegmentation's folder layout.

mmseg's ``BaseSegDataset`` reads images and label maps from two parallel folders; the toy
world stores them as webdataset shards (``KEY.png`` and ``KEY.seg.png``). `prepare_toy_seg`
copies the PNG bytes out once (no re-encoding, so the pixels are exactly the generator's):

    out_dir/img_dir/{train,val}/KEY.png   RGB image
    out_dir/ann_dir/{train,val}/KEY.png   uint8 labels: 0 background, 1 + class index on objects
    out_dir/.done                         the parameters the folder was written from
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

# Bump when the folder layout changes, so cached folders are rewritten.
LAYOUT_VERSION = 1
SPLIT_DIRS = {"seg-train": "train", "seg-val": "val"}
DONE_MARKER = ".done"


def prepare_toy_seg(toy_root: Path, manifest: dict, out_dir: Path) -> Path:
    """Write the ``seg-train`` / ``seg-val`` shards under ``toy_root`` into ``out_dir`` (mmseg layout).

    ``manifest`` is what `mugbench.data.toy.prepare_toy` returned for ``toy_root``. The folder
    is built under a temporary name and renamed into place, then marked done with the
    manifest's parameters; a folder whose marker matches is reused as is, any other is rebuilt.
    Returns ``out_dir``.
    """
    toy_root, out_dir = Path(toy_root), Path(out_dir)
    missing = [s for s in SPLIT_DIRS if s not in manifest.get("splits", {})]
    if missing:
        raise ValueError(f"the toy world under {toy_root} has no {', '.join(missing)} split; "
                         f"add them to data.toy_sizes (e.g. seg-train: 1000, seg-val: 200)")
    stamp = {"layout_version": LAYOUT_VERSION, "params": manifest.get("params"),
             "splits": {s: manifest["splits"][s] for s in SPLIT_DIRS}}
    if _read_stamp(out_dir) == stamp:
        return out_dir

    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, sub in SPLIT_DIRS.items():
        img_dir, ann_dir = tmp / "img_dir" / sub, tmp / "ann_dir" / sub
        img_dir.mkdir(parents=True)
        ann_dir.mkdir(parents=True)
        written = 0
        for shard in manifest["splits"][split]["shards"]:
            for key, image, mask in _read_shard(toy_root / shard):
                (img_dir / f"{key}.png").write_bytes(image)
                (ann_dir / f"{key}.png").write_bytes(mask)
                written += 1
        if written != manifest["splits"][split]["count"]:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(f"{split}: found {written} image/mask pairs in the shards under {toy_root}, "
                             f"the manifest says {manifest['splits'][split]['count']}")
    (tmp / DONE_MARKER).write_text(json.dumps(stamp, sort_keys=True))
    # A stale or half-written folder from an older run is replaced; if another process finished
    # the same folder meanwhile, keep theirs (identical content) and drop ours.
    if out_dir.exists():
        if _read_stamp(out_dir) == stamp:
            shutil.rmtree(tmp, ignore_errors=True)
            return out_dir
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if _read_stamp(out_dir) != stamp:
            raise
    return out_dir


def _read_stamp(out_dir: Path) -> dict | None:
    """The done-marker's content, or None if the folder is absent or incomplete."""
    try:
        return json.loads((out_dir / DONE_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _read_shard(path: Path):
    """Yield ``(key, image PNG bytes, mask PNG bytes)`` for every sample of one shard, in tar order."""
    images, masks = {}, {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if ext == "png":
                images[key] = tar.extractfile(member).read()
            elif ext == "seg.png":
                masks[key] = tar.extractfile(member).read()
    for key in images:
        if key not in masks:
            raise ValueError(f"{path}: sample {key} has no .seg.png mask")
        yield key, images[key], masks[key]
