"""COCO and Flickr30k captions: the test split of Karpathy's JSON files (`mugbench.data.caption_sets`)."""
from __future__ import annotations

from ..data.caption_sets import load_karpathy_split
from ..data.transforms import build_eval_transform
from ..evalset import CaptionedImages, CaptionSet, EvalSetContext, EvalSetSource
from ..registry import register_eval_set


class KarpathyCaptions(EvalSetSource):
    """A Karpathy-split caption set: ``json_name`` in the set's folder, images beside it."""

    kind = "captions"
    json_name = ""

    def load(self, ctx: EvalSetContext) -> CaptionSet:
        """The test split's images (every reference caption of each)."""
        val = load_karpathy_split(self.locate(ctx.data_root), self.json_name,
                                  build_eval_transform(ctx.cfg.encoder.img_size))
        return CaptionSet(self.name, CaptionedImages(val["image"], val["captions"], val["key"], val["objects"]))


@register_eval_set("coco-caps")
class COCOCaptions(KarpathyCaptions):
    """COCO captions, Karpathy's 5,000-image test split."""

    folder = "coco"
    required = ("dataset_coco.json",)
    json_name = "dataset_coco.json"
    hint = ("Put Karpathy's dataset_coco.json (the split file of 'Deep Visual-Semantic Alignments', 2015) in "
            "DIR/coco/ and the COCO 2014 images beside it as DIR/coco/val2014/*.jpg and DIR/coco/train2014/*.jpg; "
            "the 5,000-image test split is evaluated.")


@register_eval_set("flickr30k")
class Flickr30k(KarpathyCaptions):
    """Flickr30k captions, Karpathy's 1,000-image test split."""

    folder = "flickr30k"
    required = ("dataset_flickr30k.json", "flickr30k-images")
    json_name = "dataset_flickr30k.json"
    hint = ("Put Karpathy's dataset_flickr30k.json in DIR/flickr30k/ and the Flickr30k images in "
            "DIR/flickr30k/flickr30k-images/; the 1,000-image test split is evaluated.")
