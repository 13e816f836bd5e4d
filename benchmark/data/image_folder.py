"""ImageNet-style evaluation sets: ``ROOT/{train,val}/CLASS/IMAGE`` folders (torchvision's
ImageFolder layout), read lazily so that 1.28M training images never sit in memory.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from torchvision.datasets import ImageFolder

from .decode import BadImage, decode_rgb
from .train_batches import GlobalTrainBatches


def _load_rgb(path: str):
    """An RGB PIL image of ``path``; CMYK and greyscale files (ImageNet has a few) are converted."""
    try:
        return decode_rgb(Path(path).read_bytes())[0]
    except BadImage as bad:
        raise OSError(f"{path} cannot be read as an image ({bad}); evaluation sets must be complete, "
                      f"so replace or remove the file") from bad


class FolderImages:
    """The images of an ImageFolder split as a lazy ``[N, 3, S, S]`` tensor.

    Slicing (``images[i:j]``) decodes and transforms just those files, in a thread pool
    (JPEG decoding releases the GIL), so evaluation code written for in-memory tensors,
    feature extraction and top-1 alike, streams the set instead.
    """

    def __init__(self, samples: list[tuple[str, int]], transform: Callable, image_size: int, threads: int = 8):
        self.samples, self.transform, self.image_size = samples, transform, image_size
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads))

    def __len__(self) -> int:
        """Number of images."""
        return len(self.samples)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(N, 3, S, S)``, as the tensor would have."""
        return (len(self.samples), 3, self.image_size, self.image_size)

    def _one(self, index: int) -> torch.Tensor:
        return self.transform(_load_rgb(self.samples[index][0]))

    def __getitem__(self, index: slice) -> torch.Tensor:
        """The transformed images of a slice, stacked."""
        if not isinstance(index, slice):
            raise TypeError("FolderImages supports slices only, e.g. images[0:256]")
        return torch.stack(list(self._pool.map(self._one, range(*index.indices(len(self.samples))))))


def load_folder_split(root: Path, transform: Callable, image_size: int, threads: int = 8) -> dict:
    """One split as the evaluation harness expects it: ``image`` (`FolderImages`), ``label``,
    ``key`` (paths relative to ``root``), ``classes`` (folder names, sorted as ImageFolder does)."""
    folder = ImageFolder(str(root), loader=_load_rgb)
    return {"image": FolderImages(folder.samples, transform, image_size, threads),
            "label": torch.tensor(folder.targets, dtype=torch.long),
            "key": [str(Path(path).relative_to(root)) for path, _ in folder.samples],
            "classes": list(folder.classes), "skipped": {}}


class FolderTrainBatches(GlobalTrainBatches):
    """Augmented, shuffled training batches of an ImageFolder split (`GlobalTrainBatches`): the images are
    decoded from their files as the batches are loaded, in ``num_workers`` loader processes."""

    def __init__(self, samples: list[tuple[str, int]], num_workers: int = 0):
        self.samples, self.num_workers = samples, num_workers

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int):
        """The image at ``index``, its label, and its path as the key its augmentation is seeded by."""
        path, label = self.samples[index]
        return _load_rgb(path), label, path
