"""ADE20K (the MIT Scene Parsing benchmark, 150 classes) in mmsegmentation's layout."""
from __future__ import annotations

from ..evalset import EvalSetContext, EvalSetSource, SegmentationLayout, SegmentationSet
from ..registry import register_eval_set


@register_eval_set("ade20k")
class ADE20K(EvalSetSource):
    """ADEChallengeData2016 as mmseg's ``ADE20KDataset`` reads it (configs/_base_/datasets/ade20k.py): mask
    0 is "other" and ignored, the 150 classes shift down by one; validated one image at a time, as the
    images differ in size."""

    kind = "segmentation"
    folder = "ade20k/ADEChallengeData2016"
    required = ("images/training", "images/validation", "annotations/training", "annotations/validation")
    hint = ("Download ADEChallengeData2016.zip (the MIT Scene Parsing benchmark, 20,210 training and 2,000 "
            "validation images with 150-class annotations, as mmsegmentation's dataset guide describes) and "
            "unzip it so that DIR/ade20k/ADEChallengeData2016/images/{training,validation} and "
            "annotations/{training,validation} exist.")

    def load(self, ctx: EvalSetContext) -> SegmentationSet:
        """The folder; mmseg's dataset class supplies the 150 class names."""
        layout = SegmentationLayout("ADE20KDataset", ("images/training", "annotations/training"),
                                    ("images/validation", "annotations/validation"), ".jpg", ".png")
        return SegmentationSet(self.name, self.locate(ctx.data_root), [], layout, reduce_zero_label=True,
                               val_batch_size=1)
