"""The contract every evaluation protocol satisfies, as `method.py` is the methods'.

A protocol is a small class registered with ``@register_protocol("name")``: what it reads (frozen
features, a trainable copy of the encoder, or the whole method's capabilities), the kind of evaluation
set it runs on, its validated ``Options`` (``eval.<name>.<option>`` in a study), the metrics a paper's
table shows and their label, and ``run``. The harness (`mugbench.eval.harness`) and the report know a
protocol only through this class, so a new protocol is one file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .data.tokenizer import TextTokenizer

# What a protocol reads: the encoder's frozen features of a classification set (one extraction pass
# shared by every such protocol), a copy of the encoder it trains end to end, or the pre-training
# method itself, for protocols that need a capability only some methods have (`Method.capabilities`).
READS = ("features", "encoder", "method")
# Kinds of evaluation set (`mugbench.evalset`): labelled images, images with reference captions,
# images with per-pixel class masks.
SET_KINDS = ("classification", "captions", "segmentation")


@dataclass
class NoOptions:
    """Options of a protocol that has none."""


@dataclass(frozen=True)
class Features:
    """Frozen features ``[N, D]`` of one encoder on the train and val splits of a classification set,
    read out with ``eval.pool``."""

    train: torch.Tensor
    val: torch.Tensor


@dataclass(frozen=True)
class EvalContext:
    """What the harness hands every protocol run besides its subject, set and options.

    ``workdir``: this (protocol, set)'s own folder for checkpoints and logs (resumable protocols keep
    their progress there); ``artifact``: the path stem, without suffix, for figures beside the result
    record; ``tokenizer``: the study's, for protocols that read or write text; ``pool`` and
    ``batch_size``: the harness-wide read-out (``eval.pool``) and inference batch (``eval.batch_size``).
    """

    seed: int
    device: torch.device
    workdir: Path
    artifact: Path
    pool: str = "token"
    batch_size: int = 256
    tokenizer: "TextTokenizer | None" = None


@dataclass
class ProtocolResult:
    """One protocol's outcome on one set: ``metrics`` (name -> number), the ``options`` that produced
    them as the record keeps them (``protocol_options``), optional ``examples`` (a few generated
    captions, figure columns) for the report, and optional ``per_example`` outcomes (metric -> one
    boolean per evaluation example, in the set's order, e.g. whether each val image was classified
    right), which let the report compare two methods example by example (a paired bootstrap)."""

    metrics: dict[str, float]
    options: dict[str, Any]
    examples: list = field(default_factory=list)
    per_example: dict[str, Any] = field(default_factory=dict)


class Protocol:
    """Base class of an evaluation protocol.

    Subclasses set ``reads`` (one of `READS`), ``set_kind`` (one of `SET_KINDS`), ``label`` (the
    column title in reports), ``headline`` (the metrics a main table shows), ``transfer`` (True when the
    protocol measures the encoder's representation, so the report ranks methods on it; False for
    capability protocols), ``order`` (display position; the paper's protocols take 10-80),
    ``needs`` (capabilities, any one of which makes the protocol apply to a method; protocols that read
    the method only), ``Options`` (a dataclass; `mugbench.config.Range` fields are range-checked), and
    implement ``run``; they may extend ``method_problems``.
    """

    name: ClassVar[str] = "?"
    reads: ClassVar[str] = "features"
    set_kind: ClassVar[str] = "classification"
    label: ClassVar[str] = ""
    headline: ClassVar[tuple[str, ...]] = ()
    transfer: ClassVar[bool] = True
    order: ClassVar[int] = 1000
    needs: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = NoOptions

    def run(self, subject: Any, data: Any, options: Any, ctx: EvalContext) -> ProtocolResult:
        """Evaluate ``subject`` on ``data`` and return metrics and recorded options.

        ``subject`` is a `Features` (``reads="features"``), the encoder (``"encoder"``: train a copy,
        never the original) or the `Method` (``"method"``); ``data`` an evaluation set of
        ``set_kind`` (`mugbench.evalset`); ``options`` an instance of ``Options``.
        """
        raise NotImplementedError

    @classmethod
    def display_label(cls) -> str:
        """``label``, else the registered name."""
        return cls.label or cls.name

    @classmethod
    def applies_to(cls, method: Any) -> bool:
        """Whether the protocol evaluates ``method`` (a `Method` or its class): always for protocols
        that read features or the encoder; for method-reading ones, when it has a capability of
        ``needs`` (methods without one get no record, not a zero)."""
        if cls.reads != "method" or not cls.needs:
            return True
        return any(callable(getattr(method, c, None)) for c in cls.needs)

    @classmethod
    def method_problems(cls, method_cls: type) -> list[str]:
        """What ``method_cls`` lacks that this protocol's ``run`` will need, found before any training
        (empty when nothing is missing or the protocol does not apply). The base protocol needs nothing
        beyond ``needs``, which `applies_to` already checks; subclasses add their own (reconstruction
        needs a mask ratio)."""
        return []

    @classmethod
    def world_problems(cls, options: Any, world_size: int) -> list[str]:
        """What keeps ``options`` from running over ``world_size`` ranks of a torchrun job (a global batch
        that does not split evenly over them), found before any training; empty when nothing does."""
        return []

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """The protocol's options with their default values."""
        return dataclasses.asdict(cls.Options())

    @classmethod
    def parse_options(cls, options: dict[str, Any] | None, where: str | None = None) -> Any:
        """``options`` validated against ``Options`` (types and declared ranges); a `ConfigError` that
        names ``eval.<protocol>.<option>`` otherwise."""
        from .config import build_section

        return build_section(cls.Options, dict(options or {}), where or f"eval.{cls.name}")


def problems_of(protocol: type[Protocol]) -> list[str]:
    """What is wrong with a protocol class itself (an unknown ``reads`` or ``set_kind``, no ``run``,
    options that do not build with their defaults): checked by `mugbench.testing`."""
    problems = []
    if protocol.reads not in READS:
        problems.append(f"reads={protocol.reads!r} is not one of {', '.join(READS)}")
    if protocol.set_kind not in SET_KINDS:
        problems.append(f"set_kind={protocol.set_kind!r} is not one of {', '.join(SET_KINDS)}")
    if protocol.run is Protocol.run:
        problems.append("run() is not implemented")
    if not dataclasses.is_dataclass(protocol.Options):
        problems.append("Options is not a dataclass")
    else:
        try:
            protocol.Options()
        except Exception as exc:  # noqa: BLE001 - any failure of the defaults is the finding
            problems.append(f"Options() fails with its defaults: {exc}")
    if protocol.reads == "method" and not protocol.needs:
        problems.append("reads the method but declares no capability in needs")
    return problems
