"""The embedded world's evaluation sets, generated with the study's toy world (`mugbench.data.toy`)."""
from __future__ import annotations

from ..data.pipeline import load_split_tensors
from ..data.toy import prepare_toy_world
from ..data.transforms import build_eval_transform
from ..evalset import (CaptionedImages, CaptionSet, ClassificationSet, EvalSetContext, EvalSetSource,
                       LabelledImages, SegmentationSet, ShardTrainBatches)
from ..registry import register_eval_set


def _split(ctx: EvalSetContext, split: str, root, manifest: dict) -> tuple[dict, list[str], int]:
    """One split of the toy world under ``root`` as tensors at the study's resolution, its shard paths and count."""
    urls = [str(root / s) for s in manifest["splits"][split]["shards"]]
    return load_split_tensors(urls, build_eval_transform(ctx.cfg.encoder.img_size)), urls, \
        manifest["splits"][split]["count"]


@register_eval_set("toy-cls")
class ToyClassification(EvalSetSource):
    """Labelled toy scenes (``cls-train`` / ``cls-val``), one main object per image; the prompts follow
    the openers of the world's captions."""

    kind = "classification"

    def prepare(self, ctx: EvalSetContext) -> None:
        """The toy world's shards in the cache."""
        prepare_toy_world(ctx.cfg.data, ctx.cache_dir)

    def load(self, ctx: EvalSetContext) -> ClassificationSet:
        """Both splits in memory; fine-tuning reads the train shards again with its augmentation."""
        root, manifest = prepare_toy_world(ctx.cfg.data, ctx.cache_dir)
        (train, urls, count), (val, _, _) = (_split(ctx, split, root, manifest) for split in ("cls-train", "cls-val"))
        return ClassificationSet(
            name=self.name, classes=list(manifest["classes"]),
            train=LabelledImages(train["image"], train["label"], train["key"]),
            val=LabelledImages(val["image"], val["label"], val["key"]),
            train_batches=ShardTrainBatches(urls, count),
            prompts=("a {}.", "a picture of a {}.", "an image of a {}.", "there is a {}.", "a drawing of a {}."))


@register_eval_set("toy-caps")
class ToyCaptions(EvalSetSource):
    """Toy scenes with their reference captions and scene descriptions (``caps-val``)."""

    kind = "captions"
    prepare = ToyClassification.prepare

    def load(self, ctx: EvalSetContext) -> CaptionSet:
        """The validation split in memory."""
        val, _, _ = _split(ctx, "caps-val", *prepare_toy_world(ctx.cfg.data, ctx.cache_dir))
        return CaptionSet(self.name, CaptionedImages(val["image"], val["captions"], val["key"], val["objects"]))


@register_eval_set("toy-seg")
class ToySegmentation(EvalSetSource):
    """Toy scenes with per-pixel masks (``seg-train`` / ``seg-val``): background plus one class per shape,
    written once in mmsegmentation's folder layout under the cache."""

    kind = "segmentation"

    def load(self, ctx: EvalSetContext) -> SegmentationSet:
        """The mmseg folders (built on first use)."""
        from ..data.toy_seg import prepare_toy_seg

        root, manifest = prepare_toy_world(ctx.cfg.data, ctx.cache_dir)
        seg_root = prepare_toy_seg(root, manifest, ctx.cache_dir / "seg" / root.name)
        return SegmentationSet(self.name, seg_root, ["background", *manifest["classes"]])
