"""The contract every pre-training method satisfies (DESIGN.md "Method interface").

A method owns its heads and its loss; the trainer and the evaluation harness know it only
through this class: ``encoder`` (the shared timm ViT), ``forward(batch) -> {"loss": ...}``,
the declared ``views`` and ``needs_text``, and optional capabilities found by name.
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

# Optional capabilities the harness looks for; a method has one if it defines the method.
CAPABILITIES = ("encode_image", "encode_text", "caption", "score_text", "reconstruct")

# The paper's grouping of pre-training methods (its benchmark compares one of each: SimCLR, MAE, CLIP, MUG);
# reports group their rows by it.
PARADIGMS = ("single-modal discriminative", "single-modal generative",
             "multi-modal discriminative", "multi-modal generative")


@dataclass(frozen=True)
class TextSpec:
    """What a method needs to know about text: the tokenizer's ids and the text towers' size."""

    vocab_size: int
    context_length: int
    sot_id: int
    eot_id: int
    pad_id: int
    width: int = 128
    heads: int = 4
    layers: int = 2
    embed_dim: int = 128  # joint image-text embedding size of contrastive methods


class MethodOptionError(ValueError):
    """An unknown or out-of-range option for a method."""


@dataclass
class NoOptions:
    """Options of a method that has none."""


class Method(nn.Module):
    """Base class of a pre-training method: the shared encoder plus the method's own heads.

    Subclasses set ``Options`` (a dataclass whose ``__post_init__`` raises ValueError on an
    out-of-range value), ``views``, ``needs_text`` and ``paradigm`` (one of `PARADIGMS`), and
    implement ``forward``.
    """

    name: ClassVar[str] = "?"
    paradigm: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    views: ClassVar[tuple[ViewSpec, ...]] = (ViewSpec(),)
    needs_text: ClassVar[bool] = False

    def __init__(self, encoder: nn.Module, text: TextSpec, options: Any):
        super().__init__()
        self.encoder = encoder
        self.text_spec = text
        self.options = options

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Return ``{"loss": scalar, <part>: scalar, ...}`` for one batch."""
        raise NotImplementedError

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
