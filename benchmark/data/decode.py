"""Decoding one web image to RGB: reduced-size JPEG decode, mode repair, and the checks
that tell a bad image from a good one.

Web shards hold CMYK JPEGs, palette GIF-style PNGs, logos with alpha, 1-pixel trackers and
files cut off mid-download. ``decode_rgb`` turns each into an RGB PIL image or a
``BadImage`` whose ``kind`` names what was wrong, so the pipeline can count it and move on.
"""
from __future__ import annotations

import io
import math
import warnings
from typing import Iterable

from PIL import Image

# Kinds of image problem (``BadImage.kind``) and of repair (second value of ``decode_rgb``).
UNDECODABLE, TINY, WRONG_MODE = "undecodable_image", "tiny_image", "wrong_mode"
REPAIRS = ("cmyk", "palette", "alpha", "grayscale", "other_mode")


class BadImage(Exception):
    """An image that cannot be used; ``kind`` is one of the module's kind names."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def draft_size(image_size: int, min_crop_scales: Iterable[float]) -> int:
    """The shortest side a JPEG must keep when decoded at reduced size, so that no training
    crop has fewer pixels than the ``image_size`` view it is resized to.

    A RandomResizedCrop of area fraction ``s`` spans about ``sqrt(s)`` of the side, so the
    smallest crop keeps its resolution when the side is at least ``image_size / sqrt(s_min)``
    (501 px for MAE's 0.2 at 224, 792 px for SimCLR's 0.08). A deterministic view counts as
    ``s = 1``.
    """
    smallest = min([1.0, *min_crop_scales])
    return math.ceil(image_size / math.sqrt(smallest))


def _on_white(img: Image.Image) -> Image.Image:
    """Composite an image with transparency onto white: logos and icons keep their shapes
    (a plain RGB conversion would paint transparent pixels with whatever colour they hide)."""
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _repair(img: Image.Image) -> tuple[Image.Image, str | None]:
    """RGB version of ``img`` and the repair it needed (None for RGB input)."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        return _on_white(img), "alpha"
    if mode == "P":
        return img.convert("RGB"), "palette"
    if mode == "CMYK":
        return img.convert("RGB"), "cmyk"
    if mode in ("L", "1"):
        return img.convert("RGB"), "grayscale"
    if mode.startswith("I") or mode == "F":
        # 16/32-bit greyscale: scale to 8 bits first, PIL's direct conversion clips at 255.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() or 1.0
        return Image.fromarray((arr * (255.0 / top)).astype("uint8"), "L").convert("RGB"), "grayscale"
    return img.convert("RGB"), "other_mode"


def decode_rgb(data: bytes, *, min_size: int = 0, draft_to: int | None = None,
               repair_modes: bool = True) -> tuple[Image.Image, str | None]:
    """Decode image bytes to an RGB PIL image; returns ``(image, repair)``.

    ``draft_to``: JPEGs whose shorter side is at least twice this are decoded by libjpeg at
    1/2, 1/4 or 1/8 scale (PIL's draft mode), keeping the shorter side >= ``draft_to``; the
    DCT-domain reduction costs a fraction of a full decode. ``min_size``: images whose
    shorter side is smaller raise ``BadImage(TINY)`` before any pixel is decoded.
    ``repair_modes``: convert CMYK, palette, alpha and greyscale images to RGB (and report
    which); with False they raise ``BadImage(WRONG_MODE)`` instead.
    Raises ``BadImage(UNDECODABLE)`` for anything PIL cannot read in full, truncated files
    included.
    """
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning is an image we should not trust either.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if min(img.size) < min_size:
                raise BadImage(TINY, f"{img.size[0]}x{img.size[1]} < {min_size}")
            if draft_to and img.format == "JPEG" and min(img.size) >= 2 * draft_to:
                img.draft("RGB", (draft_to, draft_to))
            img.load()
    except BadImage:
        raise
    except Exception as exn:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise BadImage(UNDECODABLE, repr(exn)) from exn
    if img.mode != "RGB" and not repair_modes:
        raise BadImage(WRONG_MODE, img.mode)
    return _repair(img)


def decode_mask(data: bytes) -> Image.Image:
    """Decode a segmentation mask PNG keeping its class ids (mode L or P, never RGB)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("L") if img.mode not in ("L", "P") else img.copy()
    except Exception as exn:
        raise BadImage("undecodable_mask", repr(exn)) from exn
