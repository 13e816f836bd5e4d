"""Image-caption evaluation sets in the Karpathy-split JSON layout (COCO, Flickr30k).

Karpathy & Fei-Fei (2015) published one JSON per set (``dataset_coco.json``,
``dataset_flickr30k.json``) that every retrieval and captioning paper since uses for its splits:
``{"images": [{"filepath"?, "filename", "split": "train|val|test|restval", "sentences":
[{"raw": ...}, ...]}, ...]}``. Images live beside it: ``<root>/<filepath>/<filename>`` for COCO
(``val2014/...``), ``<root>/flickr30k-images/<filename>`` for Flickr30k, which has no filepath.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

_DEFAULT_IMAGE_FOLDER = {"flickr30k": "flickr30k-images"}


def load_karpathy_split(root: Path, json_name: str, transform: Callable, *, split: str = "test",
                        limit: int = 0) -> dict:
    """One split of a Karpathy JSON as the tensors the caption protocols read.

    Returns ``image`` [N, 3, S, S], ``captions`` (every reference of each image), ``key``,
    ``label`` (-1: no class) and ``objects`` (None: no scene description). ``limit`` > 0 keeps
    the first ``limit`` images. A listed image that is missing on disk is an error naming it.
    """
    root = Path(root)
    entries = [e for e in json.loads((root / json_name).read_text())["images"] if e.get("split") == split]
    if limit:
        entries = entries[:limit]
    if not entries:
        raise ValueError(f"{root / json_name} lists no images in split {split!r}")
    folder = _DEFAULT_IMAGE_FOLDER.get(Path(json_name).stem.removeprefix("dataset_"), "")
    images, captions, keys = [], [], []
    for entry in entries:
        path = root / (entry.get("filepath") or folder) / entry["filename"]
        if not path.is_file():
            raise FileNotFoundError(f"{root / json_name} lists {path}, which does not exist: the images must sit "
                                    f"beside the JSON as <root>/<filepath>/<filename>.")
        with Image.open(path) as img:
            images.append(transform(img.convert("RGB")))
        captions.append([s["raw"].strip() for s in entry.get("sentences", []) if s.get("raw", "").strip()])
        keys.append(Path(entry["filename"]).stem)
    return {"image": torch.stack(images), "captions": captions, "key": keys,
            "label": torch.full((len(keys),), -1, dtype=torch.long), "objects": [None] * len(keys)}
