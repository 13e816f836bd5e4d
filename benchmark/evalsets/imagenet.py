"""ImageNet-1k (ILSVRC 2012) as torchvision's ImageFolder layout under the data root."""
from __future__ import annotations

import re

from ..data.catalog import DataNotFoundError
from ..data.transforms import build_eval_transform
from ..evalset import ClassificationSet, EvalSetContext, EvalSetSource, LabelledImages
from ..registry import register_eval_set

_WORDNET_ID = re.compile(r"^n\d{8}$")


@register_eval_set("imagenet")
class ImageNet(EvalSetSource):
    """ImageNet-1k train and val, one folder per class, read lazily; zero-shot uses CLIP's class names
    and its seven-prompt ensemble as open_clip ships them (Radford et al., 2021)."""

    kind = "classification"
    folder = "imagenet"
    required = ("train", "val")
    hint = ("Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org and lay them out "
            "as torchvision's ImageFolder expects, one folder per class: DIR/imagenet/train/n01440764/*.JPEG and "
            "DIR/imagenet/val/n01440764/*.JPEG (the validation images sorted into class folders with the "
            "devkit's ground truth, e.g. by the widely used valprep.sh script).")

    def load(self, ctx: EvalSetContext) -> ClassificationSet:
        """Both splits as lazy `FolderImages`; fine-tuning reads augmented batches of the train folder."""
        from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

        from ..data.image_folder import FolderTrainBatches, load_folder_split

        root, size = self.locate(ctx.data_root), ctx.cfg.encoder.img_size
        threads = max(2, ctx.cfg.data.num_workers)
        splits = {role: load_folder_split(root / role, build_eval_transform(size), size, threads)
                  for role in ("train", "val")}
        classes = splits["train"]["classes"]
        if classes != splits["val"]["classes"]:
            raise DataNotFoundError(
                f"Evaluation set '{self.name}' at {root}: train/ and val/ hold different class folders "
                f"({len(classes)} and {len(splits['val']['classes'])}); both need the same ones.")
        train, val = (LabelledImages(s["image"], s["label"], s["key"]) for s in (splits["train"], splits["val"]))
        return ClassificationSet(
            name=self.name, classes=classes, train=train, val=val,
            train_batches=FolderTrainBatches(train.image.samples, ctx.cfg.data.num_workers),
            prompts=tuple(template("{}") for template in SIMPLE_IMAGENET_TEMPLATES), class_names=class_words(classes))


def class_words(classes: list[str]) -> list[str] | None:
    """CLIP's class names for ImageNet's 1000 WordNet-id folders (``n01440764``), which no caption contains:
    sorted (ImageFolder's order, the standard class index) they map one to one onto open_clip's list. None
    (use the folder names) for any other set of folders: a subset, unsorted, or not WordNet ids."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    if len(classes) == len(IMAGENET_CLASSNAMES) and all(_WORDNET_ID.match(c) for c in classes) \
            and list(classes) == sorted(classes):
        return list(IMAGENET_CLASSNAMES)
    return None
