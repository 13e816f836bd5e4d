"""A miniature data root in the real layouts the `paper` preset reads, for end-to-end tests.

`build_paper_world` writes, under one root, every set `mugbench run --preset paper` needs, each in the
layout of the real download so that the code paths are those of a real run, only shorter:

- ``cc3m/00000.tar ...``: webdataset shards as ``img2dataset --output_format webdataset`` writes them
  (per sample ``KEY.jpg``, ``KEY.txt``, ``KEY.json`` with img2dataset's fields; nine-digit keys of shard
  and position; ``NNNNN_stats.json`` beside each shard with its ``successes``);
- ``imagenet/{train,val}/<wnid>/*.JPEG``: torchvision's ImageFolder with ImageNet's first WordNet ids;
- ``ade20k/ADEChallengeData2016/{images,annotations}/{training,validation}``: ADE20K as mmseg reads it
  (``ADE_train_00000001.jpg`` beside ``ADE_train_00000001.png``, mask 0 = "other", classes 1..150);
- ``coco/dataset_coco.json`` with ``coco/val2014/*.jpg`` (and one ``train2014`` image): Karpathy's split
  file, whose ``test`` images the caption protocols read.

Images are coloured shapes on a coloured background drawn with PIL from one seeded RNG, so the same
arguments give the same bytes (tar members carry a fixed time). Small on purpose: the default world is
under 1 MB and written in well under a second.
"""
from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "yellow": (230, 210, 40),
           "purple": (130, 50, 160), "orange": (240, 140, 30), "white": (235, 235, 235), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
# ImageNet's first WordNet ids in the standard (sorted) class order: tench, goldfish, great white shark,
# tiger shark, hammerhead, electric ray.
WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331")
ADE_CLASSES = 150  # mask values 1..150; 0 is "other" (ignored after reduce_zero_label)
_MTIME = 1_700_000_000  # every tar member's time: the shards are the same bytes on every build


def _draw_scene(rng: random.Random, size: tuple[int, int], shape: str | None = None,
                colour: str | None = None, mask_value: int | None = None) -> tuple[Image.Image, str, Image.Image]:
    """One scene: a background colour, pixel noise, and a main shape. Returns the RGB image, its caption
    and a mask (mode ``L``) holding ``mask_value`` under the shape and 0 elsewhere."""
    shape = shape or rng.choice(SHAPES)
    colour = colour or rng.choice(list(COLOURS))
    background = rng.choice([c for c in COLOURS if c != colour])
    w, h = size
    image = Image.new("RGB", size, COLOURS[background])
    mask = Image.new("L", size, 0)
    # Sparse noise: real photos are not flat, and JPEG then has something to encode.
    pixels = image.load()
    for _ in range(w * h // 20):
        x, y = rng.randrange(w), rng.randrange(h)
        pixels[x, y] = tuple(min(255, max(0, c + rng.randint(-40, 40))) for c in COLOURS[background])
    side = rng.randint(min(w, h) // 3, min(w, h) * 2 // 3)
    x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
    box = (x0, y0, x0 + side, y0 + side)
    for target, fill in ((ImageDraw.Draw(image), COLOURS[colour]), (ImageDraw.Draw(mask), mask_value or 0)):
        if shape == "circle":
            target.ellipse(box, fill=fill)
        elif shape == "square":
            target.rectangle(box, fill=fill)
        else:
            target.polygon([(x0, y0 + side), (x0 + side // 2, y0), (x0 + side, y0 + side)], fill=fill)
    where = "left" if x0 + side / 2 < w / 2 else "right"
    caption = f"a photo of a {colour} {shape} on the {where} of a {background} background"
    return image, caption, mask


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), _MTIME, 0o644
    tar.addfile(info, io.BytesIO(payload))


def write_cc3m_shards(folder: Path, rng: random.Random, *, shards: int, per_shard: int,
                      size: tuple[int, int]) -> list[Path]:
    """img2dataset's webdataset output for ``shards`` x ``per_shard`` successful downloads: the tars and
    their ``NNNNN_stats.json``. Keys are img2dataset's: shard number then position, nine digits."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(shards):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"
                image, caption, _ = _draw_scene(rng, size)
                payload = _jpeg(image)
                meta = {"url": f"http://images.example.com/cc3m/{key}.jpg", "caption": caption, "key": key,
                        "status": "success", "error_message": None, "width": size[0], "height": size[1],
                        "original_width": size[0] * 2, "original_height": size[1] * 2, "exif": "{}",
                        "sha256": None}
                _add(tar, f"{key}.jpg", payload)
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({
            "count": per_shard, "successes": per_shard, "failed_to_download": 0, "failed_to_resize": 0,
            "duration": 1.0, "start_time": float(_MTIME), "end_time": float(_MTIME + 1),
            "status_dict": {"success": per_shard}}, indent=4))
        paths.append(path)
    return paths


def write_imagenet(folder: Path, rng: random.Random, *, classes: int, train: int, val: int,
                   size: tuple[int, int]) -> None:
    """ImageNet's ImageFolder layout: ``classes`` WordNet-id folders in train/ and val/. Each class is one
    shape in one colour (so a probe has something to learn), its images named as ImageNet's are."""
    if classes > len(WNIDS):
        raise ValueError(f"at most {len(WNIDS)} classes")
    pairs = [(s, c) for c in COLOURS for s in SHAPES]
    for index, wnid in enumerate(WNIDS[:classes]):
        shape, colour = pairs[index * 5 % len(pairs)]
        for split, count in (("train", train), ("val", val)):
            (folder / split / wnid).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image, _, _ = _draw_scene(rng, size, shape, colour)
                # ImageNet's own names: n01440764_10026.JPEG in train, ILSVRC2012_val_00000293.JPEG in val.
                number = index * count + i + 1
                name = f"{wnid}_{number}.JPEG" if split == "train" else f"ILSVRC2012_val_{number:08d}.JPEG"
                (folder / split / wnid / name).write_bytes(_jpeg(image))


def write_ade20k(folder: Path, rng: random.Random, *, train: int, val: int, size: tuple[int, int]) -> None:
    """ADEChallengeData2016: JPEG images and PNG annotations of the same stem, mask 0 ("other") around
    one shape of a class in 1..150."""
    for split, prefix, count in (("training", "ADE_train", train), ("validation", "ADE_val", val)):
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        (folder / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, _, mask = _draw_scene(rng, size, mask_value=rng.randint(1, ADE_CLASSES))
            stem = f"{prefix}_{i + 1:08d}"
            (folder / "images" / split / f"{stem}.jpg").write_bytes(_jpeg(image))
            mask.save(folder / "annotations" / split / f"{stem}.png")


def write_coco(folder: Path, rng: random.Random, *, test: int, size: tuple[int, int]) -> None:
    """Karpathy's ``dataset_coco.json``: ``test`` images in ``val2014/`` with five captions each, and one
    ``train`` image in ``train2014/`` (listed, never read by the test-split protocols)."""
    images, sent = [], 0
    entries = [("test", "val2014")] * test + [("train", "train2014")]
    for imgid, (split, filepath) in enumerate(entries):
        cocoid = 100000 + imgid
        filename = f"COCO_{filepath}_{cocoid:012d}.jpg"
        image, caption, _ = _draw_scene(rng, size)
        (folder / filepath).mkdir(parents=True, exist_ok=True)
        (folder / filepath / filename).write_bytes(_jpeg(image))
        words = caption.split()
        variants = [caption, caption.replace("a photo of ", "").capitalize() + ".", " ".join(words[3:5]) + " shape",
                    f"there is a {words[4]} {words[5]} in this picture", caption.replace("photo", "picture")]
        sentences = []
        for raw in variants:
            sentences.append({"tokens": raw.lower().rstrip(".").split(), "raw": raw, "imgid": imgid, "sentid": sent})
            sent += 1
        images.append({"filepath": filepath, "sentids": [s["sentid"] for s in sentences], "filename": filename,
                       "imgid": imgid, "split": split, "sentences": sentences, "cocoid": cocoid})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))


def build_paper_world(root: Path, *, shards: int = 2, per_shard: int = 4, classes: int = 4, train_per_class: int = 2,
                      val_per_class: int = 1, ade_train: int = 2, ade_val: int = 1, coco_test: int = 2,
                      seed: int = 0) -> dict:
    """Write the miniature world under ``root`` and return what a test needs: ``pattern`` (the cc3m shards
    as a brace pattern), ``samples`` (pre-training samples) and ``root``.

    The defaults are the least that runs every protocol of the `paper` preset once at its real
    architecture: a pre-training batch of 4 per shard (the test's 2 streams read a shard each),
    8 ImageNet training images (one fine-tuning batch, even for Mixup), 2 ADE20K training images (one
    batch of 2 crops: UperNet's BatchNorm needs more than one) and one validation image, whose every
    pass costs a 512 x 512 UperNet forward. Pre-training, ImageNet and COCO images are 192 x 160 JPEGs
    (landscape, as most photos; upsampled to 224 as a small download's are); ADE20K's are square, so
    mmseg's test resize makes one 512 x 512 slide window per image.
    """
    root = Path(root)
    rng = random.Random(seed)
    write_cc3m_shards(root / "cc3m", rng, shards=shards, per_shard=per_shard, size=(192, 160))
    write_imagenet(root / "imagenet", rng, classes=classes, train=train_per_class, val=val_per_class, size=(192, 160))
    write_ade20k(root / "ade20k" / "ADEChallengeData2016", rng, train=ade_train, val=ade_val, size=(192, 192))
    write_coco(root / "coco", rng, test=coco_test, size=(192, 160))
    return {"root": root, "pattern": str(root / "cc3m" / f"{{00000..{shards - 1:05d}}}.tar"),
            "samples": shards * per_shard}
