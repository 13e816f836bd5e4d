"""The embedded procedural world ``toy``.

Images of a few coloured, textured shapes on a cluttered background, with five
varied reference captions, a class label (the shape of the main object) and a
per-pixel mask, all drawn from one seeded generator. ``prepare_toy`` writes the
world once into real webdataset shards (img2dataset layout) so the embedded study
goes through exactly the same loader as CC3M.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from ..files import atomic_write, atomic_write_text

# Bump whenever drawing or captioning changes, so cached shards are regenerated.
GENERATOR_VERSION = 3

# Chosen so that each stays recognisable at 32x32: distinct outlines, holes or
# orientations (a hexagon would be too close to a circle at that resolution).
TOY_CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "diamond", "heart", "ring",
)

# Words a caption may use for each shape; the first one is canonical. Every caption
# names the main object's shape with one of these (the tests rely on it).
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),
    "square": ("square",),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "plus sign"),
    "diamond": ("diamond", "rhombus"),
    "heart": ("heart",),
    "ring": ("ring", "donut"),
}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "pink": (240, 120, 180),
    "cyan": (40, 200, 210),
}

TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted", "outlined")

# Radius ranges as a fraction of the image side. The main object is medium or large
# and other objects are always drawn from a strictly smaller range, so "the main
# object" is unambiguously the largest one.
SIZE_RANGES: dict[str, tuple[float, float]] = {
    "small": (0.08, 0.12),
    "medium": (0.19, 0.24),
    "large": (0.28, 0.36),
}

SPLITS: tuple[str, ...] = ("pretrain", "cls-train", "cls-val", "seg-train", "seg-val", "caps-val")
SEG_SPLITS: frozenset[str] = frozenset({"seg-train", "seg-val"})
OBJECT_CENTRIC_SPLITS: frozenset[str] = frozenset({"cls-train", "cls-val"})
NUM_CAPTIONS = 5


@dataclass
class ToySample:
    """One drawn image with everything the generator knows about it.

    ``mask`` is uint8 [H, W]: 0 for background, ``1 + class index`` on each object's
    pixels (later-drawn objects overwrite earlier ones). ``label`` is the class of the
    main (largest) object. ``objects`` describes every object (main first).
    """

    image: Image.Image
    mask: np.ndarray
    label: int
    captions: list[str]
    objects: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- drawing

def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of radius ``r`` centred at (cx, cy)."""
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
        pts = [(x * 0.85, y * 0.85) for x, y in pts]  # keep the square's area close to a circle's
    elif shape == "diamond":
        pts = [(0.75 * math.cos(k * math.pi / 2), math.sin(k * math.pi / 2)) for k in range(4)]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
        pts = [(x, y + 0.15) for x, y in pts]  # re-centre: the centroid sits below the circumcentre
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "cross":
        w = 0.33
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    elif shape == "heart":
        # The classic parametric heart curve, scaled to unit radius and flipped so it points down.
        pts = []
        for k in range(40):
            t = 2 * math.pi * k / 40
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17.0, -(y + 2.5) / 17.0))
    else:
        raise ValueError(f"not a polygonal shape: {shape}")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _draw_regions(size: int, shape: str, cx: float, cy: float, r: float, angle: float, border: float) -> np.ndarray:
    """Region map of one object: 0 outside, 1 interior, 2 border band of width ``border``."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    w = max(1, int(round(border)))
    if shape in ("circle", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=1, outline=2, width=w)
        if shape == "ring":
            ri = 0.55 * r
            draw.ellipse((cx - ri - w, cy - ri - w, cx + ri + w, cy + ri + w), fill=2)
            draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=1, outline=2, width=w)
    return np.asarray(img)


class _Painter:
    """Paints objects onto a supersampled float canvas; caches coordinate grids."""

    def __init__(self, size: int):
        self.size = size
        self.ys, self.xs = np.mgrid[0:size, 0:size].astype(np.float32)

    def paint(self, canvas: np.ndarray, regions: np.ndarray, colour: np.ndarray, texture: str,
              cx: float, cy: float, r: float, angle: float) -> None:
        """Composite one object (already rasterised into ``regions``) onto ``canvas`` in place."""
        # Work on the object's bounding box only: most of the canvas is untouched.
        y0, x0 = max(0, int(cy - r) - 2), max(0, int(cx - r) - 2)
        y1, x1 = int(cy + r) + 3, int(cx + r) + 3
        canvas, regions = canvas[y0:y1, x0:x1], regions[y0:y1, x0:x1]
        xs, ys = self.xs[y0:y1, x0:x1], self.ys[y0:y1, x0:x1]
        inside = regions > 0
        # Patterned textures alternate the colour with a pale tint of it, so the whole
        # shape stays one region (the mask covers it entirely) while the texture shows.
        tint = (colour + 0.6 * (255.0 - colour)).astype(np.uint8)
        if texture == "solid":
            canvas[inside] = colour.astype(np.uint8)
            return
        if texture == "outlined":
            canvas[regions == 1] = tint
            canvas[regions == 2] = (colour * 0.75).astype(np.uint8)
            return
        period = max(4.0, r / 2.2)
        if texture == "striped":
            proj = xs * math.cos(angle) + ys * math.sin(angle)
            on = (np.floor(proj / (period / 2)) % 2) == 0
        else:  # dotted
            u = np.mod(xs, period) - period / 2
            v = np.mod(ys, period) - period / 2
            on = (u * u + v * v) < (0.3 * period) ** 2
        canvas[inside] = tint
        canvas[inside & on] = colour.astype(np.uint8)


def _position_word(x: float, y: float) -> str:
    """Name of the 3x3 cell that contains the normalised point (x, y)."""
    col = "left" if x < 1 / 3 else ("right" if x > 2 / 3 else "")
    row = "top" if y < 1 / 3 else ("bottom" if y > 2 / 3 else "")
    return f"{row} {col}".strip() or "centre"


# --------------------------------------------------------------------------- captions

_SIZE_SYNONYMS = {"small": ("small", "little", "tiny"), "medium": ("medium-sized", "mid-sized"),
                  "large": ("large", "big", "huge")}
_TEXTURE_ADJ = {"solid": ("solid", "plain", "filled"), "striped": ("striped", "stripy"),
                "dotted": ("dotted", "spotted", "polka-dot"), "outlined": ("outlined",)}
_TEXTURE_WITH = {"solid": ("a solid fill",), "striped": ("stripes", "a striped pattern"),
                 "dotted": ("dots", "spots", "a dotted pattern"), "outlined": ("a thick outline", "a dark border")}
_OPENERS = ("", "a picture of ", "an image of ", "a photo showing ", "this image shows ", "there is ",
            "a drawing of ", "a picture showing ", "here we see ", "a simple rendering of ")
_CENTRE_WORDS = ("centre", "center", "middle")


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    """One of ``options``, uniformly (cheaper than ``rng.choice``, which builds an array)."""
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    """'a' or 'an' for the phrase that follows."""
    return "an" if phrase[:1] in "aeiou" else "a"


def _noun_phrase(rng: np.random.Generator, obj: dict, main: bool) -> str:
    """A varied description of one object, e.g. 'a big red striped circle'."""
    noun = _pick(rng, SHAPE_WORDS[obj["shape"]])
    colour = obj["colour"] if rng.random() < (0.85 if main else 0.7) else None
    size = _pick(rng, _SIZE_SYNONYMS[obj["size"]]) if rng.random() < 0.6 else None
    texture = None
    if rng.random() < (0.3 if obj["texture"] == "solid" else 0.7):
        texture = obj["texture"]
    adjectives = [a for a in (size, colour) if a]
    tail = ""
    if texture:
        style = rng.integers(3)
        if style == 0:
            adjectives.append(_pick(rng, _TEXTURE_ADJ[texture]))
        elif style == 1:
            adjectives.insert(len(adjectives) - (1 if colour else 0), _pick(rng, _TEXTURE_ADJ[texture]))
        else:
            tail = " with " + _pick(rng, _TEXTURE_WITH[texture])
    words = " ".join(adjectives + [noun])
    if colour and not size and not texture and rng.random() < 0.2:
        words, tail = noun, f" coloured {colour}"  # post-nominal colour for variety
    return f"{_article(words)} {words}{tail}"


def _position_phrase(rng: np.random.Generator, pos: str) -> str:
    """' in the top left corner', ' in the middle', ' on the left', ..."""
    if pos == "centre":
        return " " + _pick(rng, ("in the ", "at the ", "near the ")) + _pick(rng, _CENTRE_WORDS)
    if " " in pos:
        return _pick(rng, (f" in the {pos} corner", f" at the {pos}", f" near the {pos}"))
    return _pick(rng, (f" on the {pos}", f" at the {pos}", f" near the {pos}", f" on the {pos} side"))


def _relation(a: dict, b: dict) -> str:
    """Spatial relation of object ``a`` with respect to object ``b``."""
    dx = a["center"][0] - b["center"][0]
    dy = a["center"][1] - b["center"][1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _caption(rng: np.random.Generator, objects: list[dict], background: dict) -> str:
    """One caption describing the main object, maybe its position, others and background."""
    main, others = objects[0], objects[1:]
    opener = _pick(rng, _OPENERS)
    text = opener + _noun_phrase(rng, main, main=True)
    if rng.random() < 0.5:
        text += _position_phrase(rng, main["position"])
    main_noun = SHAPE_WORDS[main["shape"]][0]
    for other in others:
        if rng.random() > 0.75:
            continue
        np_other = _noun_phrase(rng, other, main=False)
        style = rng.integers(5)
        if style == 0:
            text += f", next to {np_other}"
        elif style == 1:
            text += f" {_relation(main, other)} {np_other}"
        elif style == 2:
            ref = f"bigger {main_noun}" if other["shape"] == main["shape"] else main_noun
            text += f". {np_other[0].upper()}{np_other[1:]} is {_relation(other, main)} the {ref}"
        elif style == 3:
            text += f", with {np_other} {_relation(other, main)} it"
        else:
            text += f" and {np_other}{_position_phrase(rng, other['position'])}"
    if rng.random() < 0.3:
        bg = background["word"]
        text += _pick(rng, (f" on a {bg} background", f". The background is {bg}", f", {bg} background"))
    if background["clutter"] and rng.random() < 0.15:
        text += _pick(rng, (", with some lines in the background", " among a few scribbles"))
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.5:
        text += "."
    return text


# --------------------------------------------------------------------------- world

def _split_id(split: str) -> int:
    """A stable integer for a split name (Python's hash() is salted per process)."""
    return zlib.crc32(split.encode("utf-8"))


class ToyWorld:
    """Deterministic generator of toy samples.

    ``sample(split, index)`` depends only on (seed, split, index), never on call order,
    because each sample seeds its own ``numpy.random.Generator`` from that triple.
    """

    def __init__(self, seed: int, native_size: int = 64):
        """Create the world for ``seed`` drawing images of ``native_size`` pixels square."""
        self.seed = int(seed)
        self.native_size = int(native_size)
        # Anti-aliasing by supersampling; 3x is smooth enough and keeps generation fast.
        self.factor = 3 if native_size <= 128 else 2
        self._painter = _Painter(self.native_size * self.factor)

    def sample(self, split: str, index: int) -> ToySample:
        """Draw sample ``index`` of ``split``."""
        rng = np.random.default_rng([self.seed, _split_id(split), int(index)])
        n, big = self.native_size, self.native_size * self.factor
        background = self._background(rng, big)
        canvas = background.pop("canvas")
        objects = self._layout(rng, object_centric=split in OBJECT_CENTRIC_SPLITS)
        coverages = []
        for obj in objects:
            cx, cy = obj["center"][0] * big, obj["center"][1] * big
            r = obj["radius"] * big
            angle = obj.pop("_angle")
            regions = _draw_regions(big, obj["shape"], cx, cy, r, angle, border=max(2.0, 0.22 * r))
            colour = np.asarray(COLOURS[obj["colour"]], dtype=np.float32)
            self._painter.paint(canvas, regions, colour, obj["texture"], cx, cy, r, angle)
            coverages.append(regions > 0)
        # PIL's reduce() is a box filter: the anti-aliasing step of supersampling.
        image = Image.fromarray(canvas, "RGB").reduce(self.factor)
        if background["noise"] > 0:
            noisy = np.asarray(image, dtype=np.float32) + rng.normal(0.0, background["noise"], size=(n, n, 3))
            image = Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8), "RGB")
        mask = np.zeros((n, n), dtype=np.uint8)
        for obj, cov in zip(objects, coverages):
            # A native pixel belongs to an object when it covers at least half of it.
            frac = np.asarray(Image.fromarray(cov.astype(np.uint8) * 255, "L").reduce(self.factor))
            mask[frac >= 128] = TOY_CLASSES.index(obj["shape"]) + 1
        captions: list[str] = []
        for _ in range(50):
            cap = _caption(rng, objects, background)
            if cap not in captions:
                captions.append(cap)
            if len(captions) == NUM_CAPTIONS:
                break
        while len(captions) < NUM_CAPTIONS:  # practically unreachable; keeps the contract
            captions.append(f"{captions[0]} (view {len(captions)})")
        return ToySample(image=image, mask=mask, label=TOY_CLASSES.index(objects[0]["shape"]),
                         captions=captions, objects=objects)

    def _background(self, rng: np.random.Generator, big: int) -> dict:
        """A greyish plain / gradient / noisy background with optional clutter."""
        level = rng.uniform(70, 200)
        base = level + rng.uniform(-20, 20, size=3)
        kind = _pick(rng, ("plain", "gradient", "noisy"))
        fill = tuple(int(v) for v in np.clip(base, 0, 255))
        if kind == "gradient":
            # A linear ramp is smooth, so computing it at native size and upsampling is enough.
            n = self.native_size
            a = rng.uniform(0, 2 * math.pi)
            ys, xs = np.mgrid[0:n, 0:n]
            ramp = (xs * math.cos(a) + ys * math.sin(a)) / n - 0.5
            small = np.clip(base + ramp[..., None] * rng.uniform(30, 60), 0, 255).astype(np.uint8)
            pil = Image.fromarray(small, "RGB").resize((big, big), Image.BILINEAR)
        else:
            pil = Image.new("RGB", (big, big), fill)
        clutter = int(rng.integers(0, 4)) + int(rng.integers(0, 5))
        draw = ImageDraw.Draw(pil)
        for _ in range(clutter):
            shade = tuple(int(v) for v in np.clip(base + rng.uniform(-50, 50), 0, 255))
            x0, y0 = rng.uniform(0, big, size=2)
            if rng.random() < 0.5:
                x1, y1 = rng.uniform(0, big, size=2)
                draw.line((x0, y0, x1, y1), fill=shade, width=max(1, big // 64))
            else:
                d = rng.uniform(1, 2.5) * big / 64
                draw.ellipse((x0 - d, y0 - d, x0 + d, y0 + d), fill=shade)
        canvas = np.array(pil)
        word = "light grey" if level > 150 else ("dark grey" if level < 100 else "grey")
        if kind != "plain":
            word = f"{kind} {word}" if kind == "noisy" else f"{word} gradient"
        noise = rng.uniform(4, 10) if kind == "noisy" else rng.uniform(0, 2)
        return {"canvas": canvas, "kind": kind, "word": word, "clutter": clutter > 0, "noise": float(noise)}

    def _layout(self, rng: np.random.Generator, object_centric: bool = False) -> list[dict]:
        """Main object first (medium or large), then 0-2 small objects placed with little overlap.

        Other objects are always small so that the main shape (the class label) dominates the
        image at 32 px; captions still describe the small objects and their relations.
        Object-centric splits (classification) hold one large object near the centre, as
        ImageNet is object-centric while web pre-training images are scenes."""
        if object_centric:
            return [self._object(rng, "large", [], centre_jitter=0.1)]
        main_size = _pick(rng, ("medium", "large"))
        objects = [self._object(rng, main_size, [])]
        for _ in range(int(rng.integers(0, 3))):
            obj = self._object(rng, "small", objects)
            if obj is not None:
                objects.append(obj)
        return objects

    def _object(self, rng: np.random.Generator, size: str, placed: list[dict],
                centre_jitter: float | None = None) -> dict | None:
        """Sample one object's attributes and a position that avoids ``placed`` objects
        (or, with ``centre_jitter``, lies within that distance of the image centre)."""
        shape = _pick(rng, TOY_CLASSES)
        colour = _pick(rng, tuple(COLOURS))
        texture = _pick(rng, TEXTURES)
        radius = float(rng.uniform(*SIZE_RANGES[size]))
        for _ in range(30):
            if centre_jitter is not None:
                x, y = 0.5 + rng.uniform(-centre_jitter, centre_jitter, size=2)
                break
            x, y = rng.uniform(radius, 1 - radius, size=2)
            if all(math.hypot(x - o["center"][0], y - o["center"][1]) > 0.9 * (radius + o["radius"]) for o in placed):
                break
        else:
            return None
        # Small rotations only: square vs diamond is an orientation difference.
        angle = float(rng.uniform(-0.25, 0.25)) if shape in ("square", "diamond", "heart", "triangle") \
            else float(rng.uniform(0, 2 * math.pi))
        return {"shape": shape, "colour": colour, "size": size, "texture": texture,
                "position": _position_word(x, y), "center": [round(float(x), 4), round(float(y), 4)],
                "radius": round(radius, 4), "_angle": angle}


# --------------------------------------------------------------------------- shards

def toy_cache_dir(cache_root: Path, sizes: dict[str, int], seed: int, native_size: int,
                  shard_size: int = 1000) -> Path:
    """Cache folder for one parameter set: ``cache_root/toy/<hash>``.

    The hash covers the split sizes, seed, native size, shard size and ``GENERATOR_VERSION``,
    so a change to any of them (or to the generator) lands in a fresh folder.
    """
    params = {"sizes": dict(sorted(sizes.items())), "seed": int(seed), "native_size": int(native_size),
              "shard_size": int(shard_size), "generator_version": GENERATOR_VERSION}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_root) / "toy" / digest


def _png_bytes(img: Image.Image) -> bytes:
    """Encode a PIL image as PNG (deterministic for identical pixels)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # speed over size: the shards are small anyway
    return buf.getvalue()


def _write_shard(job: tuple) -> str:
    """Write one shard (a process-pool job) to a temp file, then move it into place."""
    root, split, shard_idx, start, stop, seed, native_size = job
    name = f"{split}-{shard_idx:06d}.tar"

    def write(tmp: str) -> None:
        with open(tmp, "wb") as stream:
            _write_samples(stream, ToyWorld(seed, native_size), split, start, stop)

    atomic_write(Path(root) / name, write)
    return name


def _write_samples(stream, world: "ToyWorld", split: str, start: int, stop: int) -> None:
    """Samples ``start`` to ``stop`` of ``split`` as one webdataset tar into ``stream``."""
    # mtime fixed and encoder disabled: identical parameters give byte-identical tars.
    # (An int mtime: a float one makes tarfile add a PAX header to every member.)
    with wds.TarWriter(stream, encoder=False, mtime=0) as sink:
        for index in range(start, stop):
            s = world.sample(split, index)
            key = f"{split.replace('-', '_')}_{index:08d}"
            meta = {"label": s.label, "captions": s.captions, "objects": s.objects}
            record = {
                "__key__": key,
                "png": _png_bytes(s.image),
                # Pre-training sees one caption per image, rotating with the index.
                "txt": s.captions[index % NUM_CAPTIONS].encode("utf-8"),
                "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
                "cls": str(s.label).encode("utf-8"),
            }
            if split in SEG_SPLITS:
                record["seg.png"] = _png_bytes(Image.fromarray(s.mask, "L"))
            sink.write(record)


def _manifest_params(sizes: dict[str, int], seed: int, native_size: int, shard_size: int) -> dict:
    """The parameters a cached manifest must match to be reused."""
    return {"generator_version": GENERATOR_VERSION, "seed": int(seed), "native_size": int(native_size),
            "shard_size": int(shard_size), "classes": list(TOY_CLASSES),
            "counts": {k: int(v) for k, v in sorted(sizes.items())}}


def _read_manifest(path: Path) -> dict | None:
    """The manifest at ``path``, or None if absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def prepare_toy(root: Path, sizes: dict[str, int], seed: int = 0, native_size: int = 64,
                shard_size: int = 1000, workers: int | None = None, log=None) -> dict:
    """Generate the toy world into webdataset shards under ``root``; return the manifest.

    ``sizes`` maps split names (a subset of ``SPLITS``) to sample counts. Shards are named
    ``{split}-{000000..}.tar`` and hold ``KEY.png``, ``KEY.txt``, ``KEY.json``, ``KEY.cls``
    and, for seg splits, ``KEY.seg.png``. ``manifest.json`` is written last and atomically,
    so its presence means the shards are complete; an existing manifest with identical
    parameters is returned without regenerating. ``workers`` processes write shards in
    parallel (default: one per CPU, at most the number of shards); output does not
    depend on it. ``log`` (e.g. ``print``) gets a line when generation starts and one when it
    ends; a cached world is returned silently.
    """
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown toy split(s) {sorted(unknown)}; known: {', '.join(SPLITS)}")
    root = Path(root)
    manifest_path = root / "manifest.json"
    params = _manifest_params(sizes, seed, native_size, shard_size)
    cached = _read_manifest(manifest_path)
    if cached is not None and cached.get("params") == params:
        return cached

    root.mkdir(parents=True, exist_ok=True)
    jobs, splits = [], {}
    for split in SPLITS:
        if split not in sizes:
            continue
        count = int(sizes[split])
        names = []
        for shard_idx, start in enumerate(range(0, count, shard_size)):
            jobs.append((str(root), split, shard_idx, start, min(start + shard_size, count), seed, native_size))
            names.append(f"{split}-{shard_idx:06d}.tar")
        splits[split] = {"count": count, "shards": names}

    workers = min(workers or os.cpu_count() or 1, len(jobs))
    log = log or (lambda message: None)
    start = time.perf_counter()
    # Generation takes seconds to minutes (about 20 s for the toy preset on two cores): say so, once.
    log(f"toy world: generating {sum(int(n) for n in sizes.values()):,} samples in {len(jobs)} shards with "
        f"{workers} process{'es' if workers > 1 else ''} into {root} (once: later runs read this cache)")
    if workers > 1:
        # Fork where available: "spawn" would re-import the caller's __main__, which breaks
        # scripts without a main guard. The children only use numpy and PIL, never torch.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
            list(pool.map(_write_shard, jobs))
    else:
        for job in jobs:
            _write_shard(job)

    manifest = {"generator_version": GENERATOR_VERSION, "seed": int(seed), "native_size": int(native_size),
                "classes": list(TOY_CLASSES), "shard_size": int(shard_size), "splits": splits, "params": params}
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))
    log(f"toy world: ready in {time.perf_counter() - start:.0f} s")
    return manifest


def prepare_toy_world(data, cache_dir: Path, log=None) -> tuple[Path, dict]:
    """Generate (or find in the cache) the embedded world a study's ``data`` section describes
    (``toy_sizes``, ``toy_seed``, ``toy_native_size``, ``toy_shard_size``): its folder and manifest.
    ``log`` as in `prepare_toy`: lines when it has to generate."""
    root = toy_cache_dir(cache_dir, data.toy_sizes, data.toy_seed, data.toy_native_size, data.toy_shard_size)
    return root, prepare_toy(root, data.toy_sizes, seed=data.toy_seed, native_size=data.toy_native_size,
                             shard_size=data.toy_shard_size, log=log)
