"""Evaluation sets: typed sets the protocols read, and the registered sources that load them.

A source is a small class registered with ``@register_eval_set("name")``: its ``kind`` (the protocols
it serves), where it lives under the data root and what marks it complete (``folder``, ``required``),
the one-paragraph ``hint`` for getting it when it is missing, and ``load`` returning a
`ClassificationSet`, `CaptionSet` or `SegmentationSet`. A new set is one registration
(`mugbench.evalsets` holds the built-ins; plugins use the ``mugbench.eval_sets`` entry-point group).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from .data.catalog import DataNotFoundError
from .data.train_batches import GlobalTrainBatches

if TYPE_CHECKING:  # pragma: no cover
    from .config import StudyConfig

# A generic zero-shot prompt for sets that bring none of their own.
DEFAULT_PROMPTS = ("a photo of a {}.",)


@dataclass
class LabelledImages:
    """One split of labelled images: ``image`` ``[N, 3, S, S]`` at the study's resolution (a tensor, or
    a lazy `FolderImages` that loads the slices asked for), ``label`` ``[N]``, ``key`` per image."""

    image: Any
    label: torch.Tensor
    key: list[str]


@dataclass
class CaptionedImages:
    """Images with every reference caption of each (``captions[i]``), their ``key`` and, for generated
    scenes, ``objects`` (the scene description naming what is drawn; None elsewhere)."""

    image: torch.Tensor
    captions: list[list[str]]
    key: list[str]
    objects: list = field(default_factory=list)


@dataclass
class ClassificationSet:
    """Labelled train and val images (k-NN, linear probe, fine-tuning, zero-shot).

    ``classes``: label names by index as stored (folder names, WordNet ids); ``class_names``: the
    words prompts use for them (zero-shot), the classes themselves unless given; ``prompts``: zero-shot
    templates with ``{}`` for the class word. ``train_batches(epoch=, batch_size=, transform=, seed=,
    rank=, world_size=)`` yields augmented ``{"image", "label"}`` batches of the train split, read again
    from its source (protocols that augment, such as fine-tuning): this rank's rows of each global batch
    of ``batch_size``; the batches depend only on seed and epoch (`data.train_batches.GlobalTrainBatches`).
    """

    kind: ClassVar[str] = "classification"
    name: str
    classes: list[str]
    train: LabelledImages
    val: LabelledImages
    train_batches: Callable
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    class_names: list[str] | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def train_count(self) -> int:
        """Images in the train split."""
        return len(self.train.label)

    def prompt_words(self) -> list[str]:
        """The words zero-shot prompts use for each class."""
        return list(self.class_names or self.classes)


@dataclass
class CaptionSet:
    """Images with reference captions (retrieval, captioning, reconstruction): the ``val`` split."""

    kind: ClassVar[str] = "captions"
    name: str
    val: CaptionedImages


@dataclass(frozen=True)
class SegmentationLayout:
    """Where a segmentation set keeps its files under its root, in mmsegmentation's terms: the dataset
    class (``dataset_type``), image and annotation folders per split, and file suffixes."""

    dataset_type: str = "BaseSegDataset"
    train: tuple[str, str] = ("img_dir/train", "ann_dir/train")
    val: tuple[str, str] = ("img_dir/val", "ann_dir/val")
    img_suffix: str = ".png"
    seg_map_suffix: str = ".png"


@dataclass
class SegmentationSet:
    """Images with per-pixel class masks in an mmsegmentation folder layout (semantic segmentation).

    ``classes``: names by mask value (after ``reduce_zero_label``, which maps mask 0 to ``ignore_index``
    and shifts the rest down, as for ADE20K); ``val_batch_size``: images per validation batch, None for
    the harness's ``eval.batch_size`` (1 where images differ in size).
    """

    kind: ClassVar[str] = "segmentation"
    name: str
    root: Path
    classes: list[str]
    layout: SegmentationLayout = field(default_factory=SegmentationLayout)
    reduce_zero_label: bool = False
    ignore_index: int = 255
    val_batch_size: int | None = None


EVAL_SET_TYPES = {cls.kind: cls for cls in (ClassificationSet, CaptionSet, SegmentationSet)}


@dataclass(frozen=True)
class EvalSetContext:
    """What a source needs to load its set: the study (its resolution, toy world, loader workers), the
    cache folder (generated data) and the data root (sets downloaded by the user; None if unset)."""

    cfg: "StudyConfig"
    cache_dir: Path
    data_root: Path | None = None


class EvalSetSource:
    """Base class of a registered evaluation set.

    Subclasses set ``kind`` (``classification``, ``captions`` or ``segmentation``), and for a set read
    from the data root ``folder`` (relative to it), ``required`` (paths under the folder that mark the set
    complete) and ``hint`` (how to get it); sets the harness generates leave ``folder`` None. They
    implement ``load``.
    """

    name: ClassVar[str] = "?"
    kind: ClassVar[str] = "classification"
    folder: ClassVar[str | None] = None
    required: ClassVar[tuple[str, ...]] = ()
    hint: ClassVar[str] = ""

    def load(self, ctx: EvalSetContext) -> Any:
        """The set, loaded at the study's resolution: an instance of the type of ``kind``."""
        raise NotImplementedError

    def prepare(self, ctx: EvalSetContext) -> None:
        """Write what a generated set's ``load`` reads into the cache (`EvalSets` runs it on one rank per
        cache folder before every rank loads). The default loads the set once; a source whose files can be
        written without loading them says how, so that the ranks then load at once."""
        self.load(ctx)

    @classmethod
    def locate(cls, data_root: Path | None) -> Path | None:
        """The set's folder under ``data_root`` (None for a generated set), checked to be complete: a
        one-paragraph `DataNotFoundError` saying where it looked and how to get the set otherwise.
        Cheap (a few stats), so a study checks every set before it trains anything."""
        if cls.folder is None:
            return None
        if data_root is None:
            raise DataNotFoundError(
                f"Evaluation set '{cls.name}' is looked up under a data root, and none is set: pass --data-root DIR "
                f"or set MUGBENCH_DATA=DIR, with the set at DIR/{cls.folder}. {cls.hint}")
        root = Path(data_root) / cls.folder
        missing = [r for r in cls.required if not (root / r).exists()]
        if missing:
            raise DataNotFoundError(
                f"Evaluation set '{cls.name}' was not found: looked in {root} for {', '.join(missing)}. The data "
                f"root comes from --data-root or MUGBENCH_DATA (now {data_root}). {cls.hint}")
        return root


class EvalSets:
    """The study's evaluation sets, each loaded on first use and kept for the process."""

    def __init__(self, cfg: "StudyConfig", cache_dir: Path, data_root: Path | None = None):
        self.ctx = EvalSetContext(cfg, Path(cache_dir), data_root)
        self._loaded: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        """The set registered as ``name``; a `TypeError` naming the source when it loads the wrong type."""
        if name not in self._loaded:
            from .registry import get_eval_set

            from .train.distributed import once_per_cache

            source = get_eval_set(name)
            if source.folder is None:
                # A generated set is written into the cache on first use: in a torchrun job by one rank per
                # cache folder, before every rank reads it (every rank loads its sets in the same order).
                once_per_cache(self.ctx.cache_dir, lambda: source().prepare(self.ctx))
            data = source().load(self.ctx)
            expected = EVAL_SET_TYPES[source.kind]
            if not isinstance(data, expected):
                raise TypeError(f"evaluation set {name!r} ({source.__module__}) is of kind {source.kind!r} but "
                                f"loaded a {type(data).__name__}, not a {expected.__name__}")
            self._loaded[name] = data
        return self._loaded[name]


class ShardTrainBatches(GlobalTrainBatches):
    """Augmented, shuffled training batches of a labelled shard split small enough to keep decoded in memory
    (the toy world's ``cls-train``: 2,000 images of 64 px), read once on first use (`GlobalTrainBatches`)."""

    def __init__(self, urls: list[str], count: int):
        self.urls, self.count = list(urls), int(count)
        self._items: list | None = None

    def __len__(self) -> int:
        return len(self._read())

    def load(self, index: int):
        """The decoded image at ``index`` (shard order), its label and its key."""
        return self._read()[index]

    def _read(self) -> list:
        if self._items is None:
            from .data.pipeline import read_labelled_images

            self._items = read_labelled_images(self.urls)
        return self._items
