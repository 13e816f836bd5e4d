"""Image transforms: augmented training views, the deterministic eval transform, and
reproducible per-sample augmentation seeding.

Which views a method trains on is decided in one place, `method_view_specs`: view 0 is the
study's base view (``data.augment``, the same for every method) unless the method declares an
override with a reason; the method's declared ``extra_views`` follow. `augmentation_record` is
what a result record says about it.

Everything is built from ``torchvision.transforms.v2``, which draws its randomness from
torch's global RNG; ``apply_views`` seeds that RNG per sample so augmentations depend
only on (run seed, epoch, sample key), never on worker count or iteration order.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from torchvision.transforms import v2

if TYPE_CHECKING:
    from ..config import AugmentConfig

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "ViewSpec", "ViewDeclarationError", "base_view_spec", "method_view_specs",
    "augmentation_record", "build_view_transform", "build_eval_transform", "sample_seed", "apply_views",
]


@dataclass(frozen=True)
class ViewSpec:
    """Recipe for one augmented view.

    The default is the MAE recipe: ``RandomResizedCrop(scale=(0.2, 1.0))`` plus a
    horizontal flip, nothing else. SimCLR-style views (SimCLR, SLIP's image branch) add
    colour jitter (``color_jitter`` is the strength s: brightness/contrast/saturation
    0.8*s, hue 0.2*s, applied with p=0.8), random grayscale (``grayscale`` is its
    probability) and Gaussian blur (``blur`` is its probability); typically
    ``ViewSpec(scale=(0.08, 1.0), color_jitter=1.0, grayscale=0.2, blur=0.5)``.
    A value of 0 disables the corresponding step. ``interpolation`` is the crop's resampling
    (a torchvision ``InterpolationMode`` value: bicubic, bilinear, nearest).
    """

    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    color_jitter: float = 0.0
    grayscale: float = 0.0
    blur: float = 0.0
    interpolation: str = "bicubic"


class ViewDeclarationError(TypeError):
    """A method class whose declared views cannot be used (an old ``views`` tuple, or a base-view
    override without a reason)."""


def base_view_spec(augment: "AugmentConfig") -> ViewSpec:
    """The study's base view from its ``data.augment`` policy, for captioned pre-training data (every
    set mugbench reads has captions), which turns an ``auto`` flip off."""
    return ViewSpec(scale=tuple(augment.scale), hflip=augment.flips(captioned=True), interpolation=augment.interpolation)


def _check_declaration(method_cls: type) -> None:
    name = getattr(method_cls, "name", method_cls.__name__)
    if hasattr(method_cls, "views"):
        raise ViewDeclarationError(
            f"Method {name!r} declares `views`, which mugbench no longer reads: every method's first view is "
            f"the study's base view (data.augment), so that methods differ only in their objective. Declare "
            f"only the views you add as `extra_views = (ViewSpec(...), ...)`; a method that cannot train on the "
            f"base view declares `base_view = ViewSpec(...)` and `base_view_reason = '...'` (recorded).")
    if getattr(method_cls, "base_view", None) is not None and not str(getattr(method_cls, "base_view_reason", "")).strip():
        raise ViewDeclarationError(
            f"Method {name!r} overrides the study's base view (`base_view`) without saying why: set "
            f"`base_view_reason` to a sentence; it is written into every result record of the method.")


def method_view_specs(method_cls: type, augment: "AugmentConfig") -> list[ViewSpec]:
    """Every view ``method_cls`` trains on, in batch order: view 0 (``batch["image"]``) is the study's
    base view, or the method's declared ``base_view`` override; then its ``extra_views``.

    The one function the trainer, the bench, the tests and ``mugbench methods`` build views with."""
    _check_declaration(method_cls)
    base = getattr(method_cls, "base_view", None) or base_view_spec(augment)
    return [base, *getattr(method_cls, "extra_views", ())]


def augmentation_record(method_cls: type, augment: "AugmentConfig") -> dict[str, Any]:
    """What a result record says about a method's augmentation: the views actually applied (as
    `method_view_specs` gives them), where view 0 came from and why, and the study's policy."""
    views = method_view_specs(method_cls, augment)
    override = getattr(method_cls, "base_view", None) is not None
    return {
        "policy": asdict(augment),
        "base_view": asdict(views[0]),
        "base_view_source": "method override" if override else "study policy (data.augment)",
        "base_view_reason": str(getattr(method_cls, "base_view_reason", "")) if override else "",
        "extra_views": [asdict(v) for v in views[1:]],
    }


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    """PIL -> float tensor in [0, 1] -> normalised; the common tail of every transform."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def build_view_transform(spec: ViewSpec, image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD) -> Callable:
    """A random training view: PIL image -> float tensor [3, image_size, image_size]."""
    steps: list = [v2.RandomResizedCrop(image_size, scale=spec.scale, ratio=spec.ratio,
                                        interpolation=v2.InterpolationMode(spec.interpolation), antialias=True)]
    if spec.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if spec.color_jitter > 0:
        s = spec.color_jitter
        steps.append(v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8))
    if spec.grayscale > 0:
        steps.append(v2.RandomGrayscale(p=spec.grayscale))
    if spec.blur > 0:
        # SimCLR uses a kernel of about 10% of the image side; it must be odd.
        kernel = max(3, (image_size // 10) | 1)
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=spec.blur))
    return v2.Compose(steps + _to_normalised_tensor(mean, std))


def build_eval_transform(image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD) -> Callable:
    """Deterministic transform: resize the shorter side to ``image_size``, centre-crop,
    normalise. Segmentation uses it so that image and (separately resized) mask align."""
    return v2.Compose([
        v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(image_size),
        *_to_normalised_tensor(mean, std),
    ])


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """A 63-bit integer derived from (run seed, epoch, sample key).

    A cryptographic hash, not Python's ``hash()``, because the latter is salted per
    process and would differ between workers and runs.
    """
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def apply_views(image, transforms: Sequence[Callable], seed: int) -> list[torch.Tensor]:
    """Apply each view transform to ``image`` with torch's RNG seeded from ``seed``.

    ``torch.random.fork_rng`` restores the caller's RNG state afterwards, so seeding here
    does not disturb anything else (model init, dropout) in the same process.
    """
    with torch.random.fork_rng(devices=[]):
        # Seed only the CPU generator (what v2 transforms draw from): torch.manual_seed
        # would also queue lazy CUDA seeding, capturing a stack trace per call (slow).
        torch.random.default_generator.manual_seed(seed)
        return [t(image) for t in transforms]
