"""The contract every pre-training method satisfies (DESIGN.md "Method interface").

A method owns its heads and its loss; the trainer and the evaluation harness know it only
through this class: ``encoder`` (the shared timm ViT), ``forward(batch) -> {"loss": ...}``,
``after_step()`` (called after every optimizer step), the declared ``extra_views`` and ``needs_text``,
and optional capabilities found by name. The first view (``batch["image"]``) is the study's, not the
method's (`data.transforms.method_view_specs`).

How a method's loss meets the global batch decides how the trainer accumulates it exactly
(``train.accum_steps``), so that four micro-batches train the same weights as one batch of four times
the size, on any number of ranks:

- **Per-sample losses** (MAE, captioning) implement ``forward``: the mean of per-row terms. The trainer
  averages the micro-batches' losses (plain accumulation). A mean whose count varies per micro-batch
  (caption tokens) divides by the step's count instead: the method declares it in ``loss_counts(batch)``
  and divides with `mugbench.models.global_batch.global_mean`.
- **Batch-coupled losses** (contrastive terms, batch statistics) implement ``features(batch)`` (per-row
  tensors, no coupling) and ``loss(features)`` (the coupling, over every row the rank holds) instead of
  ``forward``. Accumulating, the trainer computes every micro-batch's features without gradients, takes
  the loss of their concatenation once, then re-forwards each micro-batch with its share of the
  gradient (open_clip's ``--accum-freq``, GradCache), drawing the same random numbers both times.
"""
from __future__ import annotations

import contextlib
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from .config import coerce
from .data.transforms import ViewSpec
from .models.global_batch import loss_stage

# Optional capabilities the harness looks for; a method has one if it defines the method.
CAPABILITIES = ("encode_image", "encode_text", "caption", "score_text", "reconstruct")

# The paper's grouping of pre-training methods (its benchmark compares one of each: SimCLR, MAE, CLIP, MUG);
# reports group their rows by it.
PARADIGMS = ("single-modal discriminative", "single-modal generative",
             "multi-modal discriminative", "multi-modal generative")
# The reference rows of every study (`mugbench.methods.baselines`: ``random``, ``supervised``): registered
# methods like the others, but no pre-training paradigm, so reports can set them apart (never ranked).
BASELINE = "baseline"
# Every paradigm a method may declare.
METHOD_PARADIGMS = PARADIGMS + (BASELINE,)


@dataclass(frozen=True)
class TextSpec:
    """What a method is told about the study's data: the tokenizer's ids, the text towers' size and the
    class count of the pre-training labels (`mugbench.data.pretrain.text_spec` fills it)."""

    vocab_size: int
    context_length: int
    sot_id: int
    eot_id: int
    pad_id: int
    width: int = 128
    heads: int = 4
    layers: int = 2
    embed_dim: int = 128  # joint image-text embedding size of contrastive methods
    # Classes of the pre-training samples' labels (``.cls``), for methods that declare ``needs_labels``;
    # 0: the pre-training set has none (web image-text shards).
    num_classes: int = 0


class MethodOptionError(ValueError):
    """An unknown or out-of-range option for a method."""


@dataclass
class NoOptions:
    """Options of a method that has none."""


class Method(nn.Module):
    """Base class of a pre-training method: the shared encoder plus the method's own heads.

    Subclasses set ``Options`` (a dataclass whose ``__post_init__`` raises ValueError on an
    out-of-range value), ``needs_text``, ``paradigm`` (one of `METHOD_PARADIGMS`) and, where it uses more
    than the study's base view, ``extra_views`` (``batch["image_views"][1:]``), and
    implement ``forward``; they may override ``after_step`` (a no-op here). Baselines set ``pretrains``
    or ``needs_labels``.
    """

    name: ClassVar[str] = "?"
    paradigm: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # View 0 (batch["image"]) is the study's data.augment for every method, so that methods differ in
    # their objective only. A method that cannot train on it declares `base_view` with a
    # `base_view_reason`; both go into every result record of the method.
    extra_views: ClassVar[tuple[ViewSpec, ...]] = ()
    base_view: ClassVar[ViewSpec | None] = None  # None: the study's base view
    base_view_reason: ClassVar[str] = ""  # required with a base_view override
    needs_text: ClassVar[bool] = False
    # False: the trainer runs no step; the encoder is exported and evaluated exactly as initialised
    # (the ``random`` baseline). ``forward`` is then never called.
    pretrains: ClassVar[bool] = True
    # True: pre-training batches carry ``label`` (LongTensor [B], the sample's class from the shard's ``.cls``,
    # ``text_spec.num_classes`` classes); a study whose pre-training set has no labels skips the method.
    needs_labels: ClassVar[bool] = False

    def __init__(self, encoder: nn.Module, text: TextSpec, options: Any):
        super().__init__()
        self.encoder = encoder
        self.text_spec = text
        self.options = options

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Return ``{"loss": scalar, <part>: scalar, ...}`` for one batch; every part is a mean over the
        batch's rows (the trainer averages parts over micro-batches and ranks). A batch-coupled method
        (`couples_rows`) does not override it: its forward is ``loss(features(batch))``."""
        if not type(self).couples_rows():
            raise NotImplementedError(f"method {self.name!r} implements neither forward(batch) nor "
                                      f"features(batch) and loss(features)")
        features = self.features(batch)
        with loss_stage():
            return self.loss(features)

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        """A batch-coupled method's per-row tensors (rows first, each row from its own sample only: no
        batch statistics, no contrast), computed per micro-batch; everything that couples rows belongs
        in `loss`."""
        raise NotImplementedError

    def loss(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch-coupled method's loss (as ``forward`` returns it) from `features` of every row this
        rank holds of the global batch (a cross-rank gather, where wanted, happens here)."""
        raise NotImplementedError

    @classmethod
    def couples_rows(cls) -> bool:
        """Whether the loss couples the rows of a batch, declared by a features / loss split: the trainer
        then accumulates it in two passes (`features` without, then with gradients)."""
        return cls.features is not Method.features

    def loss_counts(self, batch: dict) -> dict[str, torch.Tensor]:
        """Counts (0-d tensors, from the batch alone) that the loss divides a sum by through
        `mugbench.models.global_batch.global_mean`; the trainer sums each over the step's micro-batches
        and ranks first. None by default: a mean over rows needs no count."""
        return {}

    def after_step(self) -> None:
        """Called by the trainer (and the bench's loops) right after every optimizer step, on the
        method itself (never on a DDP / FSDP / compiled wrapper): the place for constraints on the
        parameters, such as CLIP's cap on the logit scale. The default does nothing."""

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay: tokens and position embeddings of every
        sub-module that declares them (norms and biases are exempt by shape in the optimizer)."""
        names = set()
        for prefix, module in self.named_modules():
            if module is not self and hasattr(module, "no_weight_decay"):
                names |= {f"{prefix}.{n}" for n in module.no_weight_decay()}
        return names

    @classmethod
    def capabilities(cls) -> list[str]:
        """The optional capabilities this method implements."""
        return [c for c in CAPABILITIES if callable(getattr(cls, c, None))]

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """The method's options with their default values."""
        return dataclasses.asdict(cls.Options())

    @classmethod
    def parse_options(cls, options: dict[str, Any] | None) -> Any:
        """Validate ``options`` against ``Options``; errors name the method and the option."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise MethodOptionError(
                f"Method {cls.name!r} has no option {unknown[0]!r}. Its options are: "
                f"{', '.join(sorted(known)) or '(none)'}. Set them with --set methods.{cls.name}.OPTION=VALUE."
            )
        hints = typing.get_type_hints(cls.Options)
        try:
            options = {k: coerce(v, hints[k], f"methods.{cls.name}.{k}") for k, v in options.items()}
            return cls.Options(**options)
        except (TypeError, ValueError) as exc:
            raise MethodOptionError(f"Method {cls.name!r}: invalid option value: {exc}") from None

    @classmethod
    def build(cls, encoder: nn.Module, text: TextSpec, options: dict[str, Any] | None = None) -> "Method":
        """Build the method around ``encoder`` after validating ``options``."""
        return cls(encoder, text, cls.parse_options(options))


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the block and restore every sub-module's own mode after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def check_range(method: str, name: str, value: float, low: float, high: float) -> None:
    """Raise ValueError unless ``low <= value <= high`` (for ``Options.__post_init__``)."""
    if not (low <= value <= high):
        raise ValueError(f"{method}.{name}={value!r} is out of range [{low}, {high}]")
