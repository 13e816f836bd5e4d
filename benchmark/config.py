"""Study configuration: a YAML preset plus ``--set key=value`` overrides, validated strictly.

A preset fixes everything that must be equal across methods (DESIGN.md "Like-for-like
rules"): encoder, data, optimiser, schedule, budget and evaluation. Only ``methods.<name>``
differs per method; those options are validated by the method itself.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A preset or override that does not fit the configuration schema."""


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: a finite number from ``low`` to ``high`` (each bound
    included unless ``low_open`` / ``high_open``), a whole number where ``integer``. A list, tuple or
    dict setting is checked value by value and, with ``length``, must hold that many values.

    Declared beside each field (``POSITIVE.field(400)``) and checked by `from_dict`, so every entry
    point (run, eval, bench, data prepare) refuses a bad value before any work starts.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    length: int | None = None
    ordered: bool = False  # a [low, high] range setting: its values must not decrease

    def field(self, default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
        """A dataclass field with this range in its metadata."""
        return field(default=default, default_factory=factory, metadata={"range": self})

    def admits(self, x: Any) -> bool:
        """Whether the single value ``x`` is in range."""
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            return False
        if self.integer and not isinstance(x, int):
            return False
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return self.high is None or (x < self.high if self.high_open else x <= self.high)

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        low, high = _number_text(self.low), _number_text(self.high)
        if self.low is not None and self.high is not None:
            return f"{kind} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {high}"
        return kind


def _number_text(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
COUNT = Range(1, integer=True)  # sizes, steps, epochs counted in whole numbers
COUNT0 = Range(0, integer=True)  # where 0 means none (workers, warm-up) or all (zeroshot_images)
FRACTION = Range(0, 1)
BELOW_ONE = Range(0, 1, high_open=True)  # rates where 1 would drop or smooth away everything
DECAY = Range(0, 1, low_open=True)  # layer-wise lr decay: 1 = none, 0 would freeze the early layers
SEED = Range(0, 2**32 - 1, integer=True)  # numpy's legacy seeds stop at 2**32 - 1


def _as_number(x: Any) -> Any:
    """Numbers inside lists and dicts written as text (YAML reads ``3e-2`` as a string) -> numbers."""
    if isinstance(x, str):
        for kind in (int, float):
            try:
                return kind(x)
            except ValueError:
                pass
    return x


def check_range(key: str, value: Any, rng: Range, *, nullable: bool = False, shown: Any = None) -> Any:
    """``value`` if it is in ``rng`` (element-wise for a list, tuple or dict), else a `ConfigError`
    naming the key, the value as written (``shown``) and the allowed range; null passes when ``nullable``."""
    if value is None and nullable:
        return None
    text = shown if isinstance(shown, str) else repr(value if shown is None else shown)
    if isinstance(value, (list, tuple, dict)):
        items = {k: _as_number(v) for k, v in (value.items() if isinstance(value, dict) else enumerate(value))}
        if rng.length is not None and len(items) != rng.length:
            raise ConfigError(f"{key}={text} must hold {rng.length} values, each {rng}.")
        if not all(rng.admits(v) for v in items.values()):
            raise ConfigError(f"{key}={text} is out of range: each must be {rng}.")
        if rng.ordered and list(items.values()) != sorted(items.values()):
            raise ConfigError(f"{key}={text} must be [low, high] with low <= high: it is a range values are "
                              f"drawn from.")
        return items if isinstance(value, dict) else type(value)(items.values())
    if not rng.admits(value):
        raise ConfigError(f"{key}={text} is out of range: it must be {rng}{' or null' if nullable else ''}.")
    return value


@dataclass(frozen=True)
class EncoderSpec:
    """Architecture of the shared ViT; ``timm_name`` is the closest timm model, overridden by the rest."""

    timm_name: str = "vit_base_patch16_224"
    img_size: int = COUNT.field(224)
    patch_size: int = COUNT.field(16)
    embed_dim: int = COUNT.field(768)
    depth: int = COUNT.field(12)
    num_heads: int = COUNT.field(12)
    mlp_ratio: float = POSITIVE.field(4.0)
    drop_path_rate: float = BELOW_ONE.field(0.0)

    def timm_kwargs(self) -> dict:
        """Keyword arguments for ``timm.create_model`` that reproduce this architecture."""
        kw = asdict(self)
        kw.pop("timm_name")
        kw.pop("drop_path_rate")
        return dict(kw, num_classes=0, global_pool="token")

    @property
    def num_patches(self) -> int:
        """Patch tokens per image."""
        return (self.img_size // self.patch_size) ** 2


@dataclass(frozen=True)
class AugmentConfig:
    """The study's one base-view augmentation (``data.augment``), given to every method as view 0.

    Methods differ only in the *extra* views they declare (SimCLR's pair); a method that cannot work
    on this view must declare its own ``base_view`` with a reason, and that is recorded. The default
    is MAE's RandomResizedCrop with area scale 0.2-1 (He et al. 2022), bicubic resampling.
    ``hflip`` null means auto: off for image-text data, because flipping an image whose caption says
    "left" or "right" pairs it with a false caption (every pre-training set here has captions).
    """

    scale: tuple = Range(0, 1, low_open=True, length=2, ordered=True).field((0.2, 1.0))  # crop area fraction range
    hflip: Optional[bool] = None  # null (or auto) = off for captioned data
    interpolation: str = "bicubic"  # bicubic | bilinear | nearest (torchvision's InterpolationMode)

    INTERPOLATIONS = ("bicubic", "bilinear", "nearest")

    def __post_init__(self):
        object.__setattr__(self, "scale", tuple(float(x) for x in self.scale))  # YAML's 1 -> 1.0, as records show it
        if self.interpolation not in self.INTERPOLATIONS:
            raise ConfigError(f"data.augment.interpolation={self.interpolation!r} is not one of "
                              f"{', '.join(self.INTERPOLATIONS)}.")

    def flips(self, captioned: bool = True) -> bool:
        """Whether the base view is flipped: ``hflip`` as set, else (auto) only for data without captions."""
        return (not captioned) if self.hflip is None else self.hflip


@dataclass
class DataConfig:
    """Pre-training data and loading."""

    name: str = "toy"  # toy | cc3m | cc12m | laion400m | a shard pattern
    toy_seed: int = SEED.field(0)
    toy_native_size: int = COUNT.field(64)  # pixels the world is drawn at; views are resized to encoder.img_size
    toy_shard_size: int = COUNT.field(1000)  # samples per shard; every one of data.streams needs a shard
    toy_sizes: dict = COUNT.field(factory=lambda: {"pretrain": 6000, "cls-train": 2000, "cls-val": 1000,
                                                   "caps-val": 200})
    samples_per_epoch: Optional[int] = COUNT.field(None)  # null = counted (stats files or a tar-header pass)
    num_workers: int = COUNT0.field(0)  # DataLoader worker processes per rank (speed only: the same batches)
    pin_memory: bool = True  # page-locked batches for faster host-to-GPU copies (CUDA only)
    prefetch_factor: int = COUNT.field(4)  # batches each worker prepares ahead (with workers only)
    shuffle_buffer: int = COUNT0.field(2000)  # samples in each stream's shuffle buffer; 0 = no sample shuffling
    # The number of virtual sample streams (`data.streams`), a condition of the study: every global batch is
    # made of batch_size / streams samples of each stream, and rank r of W reads streams r*S/W .. (r+1)*S/W-1,
    # so the batches are the same for any number of ranks, loader workers and accumulation steps. Must divide
    # train.batch_size and be a multiple of the world size; each stream needs at least one shard.
    streams: int = COUNT.field(2)
    # open_clip's multi-node recipe: each stream draws shards with replacement and an epoch is
    # samples_per_epoch samples; without it each stream reads its share of the shards once.
    resampled: bool = False
    min_image_size: int = COUNT0.field(32)  # shorter side in pixels; smaller images are skipped as tiny_image
    repair_modes: bool = True  # CMYK/palette/alpha/grey -> RGB (counted); false skips them as wrong_mode
    decode_draft: bool = True  # JPEG reduced-size decode down to what the smallest crop needs
    max_bad_fraction: float = FRACTION.field(0.2)  # stop a run whose skipped fraction exceeds this (after 1,000 samples)
    # The sample filter is the study's, never the method's: with true every method skips samples with a
    # missing or blank caption, so image-only and text methods train on the same stream. False keeps
    # them for image-only studies and is refused when a method of the study reads captions.
    require_caption: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # every method's base view (view 0)

    # How the batches are loaded, never which: a run directory is not keyed by them, so a rerun with more
    # loader workers resumes the same run (workers own whole streams, `data.streams`).
    LOADING_ONLY = ("num_workers", "pin_memory", "prefetch_factor")


@dataclass
class TextConfig:
    """Tokenizer and text-tower size shared by every method that reads captions."""

    context_length: int = Range(2, integer=True).field(32)  # room for the start and end tokens
    vocab: str = "full"  # full = open_clip's BPE; corpus = the BPE ids seen in the training captions
    width: int = COUNT.field(512)
    heads: int = COUNT.field(8)
    layers: int = COUNT.field(12)
    embed_dim: int = COUNT.field(512)


@dataclass
class TrainConfig:
    """The shared optimiser, schedule and budget (MAE's recipe by default)."""

    epochs: float = POSITIVE.field(400)  # fractional epochs are allowed
    batch_size: int = COUNT.field(4096)  # global batch
    blr: float = POSITIVE.field(1.5e-4)  # lr = blr * batch_size / 256 (MAE's scaling rule)
    min_lr: float = NON_NEGATIVE.field(0.0)
    weight_decay: float = NON_NEGATIVE.field(0.05)
    betas: tuple = Range(0, 1, high_open=True, length=2).field((0.9, 0.95))
    warmup_epochs: float = NON_NEGATIVE.field(40)
    grad_clip: Optional[float] = POSITIVE.field(None)  # null = no clipping
    accum_steps: int = COUNT.field(1)
    strategy: str = "ddp"  # ddp (replicated weights) | fsdp (sharded weights, for encoders too large to replicate)
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU; or fp32 | bf16
    device: str = "auto"
    ckpt_every: int = COUNT.field(1000)  # steps
    keep_checkpoints: int = COUNT.field(2)  # newest checkpoint files kept; an unreadable newest one falls back to the next
    log_every: int = COUNT.field(10)
    # Speed and memory only: the same training either way, so a run directory is not keyed by them
    # (`PERFORMANCE_ONLY`) and switching one resumes the same run.
    optimizer_impl: str = "auto"  # auto = fused AdamW on CUDA, foreach elsewhere; or fused | foreach | loop
    grad_checkpointing: bool = False  # recompute block activations in the backward pass: less memory, ~30% slower
    compile: bool = False  # torch.compile the method; a failure to compile falls back to eager with a warning
    compile_backend: str = "inductor"
    # Minutes any collective of a torchrun job may wait before the job stops with an error (the process
    # group's timeout). Every rank works in every phase, so no rank waits through another's work; what
    # this must cover is the slowest rank's share of one step, and one-off preparation (the embedded
    # world, shard counts) on the first rank of each cache. Generous by default: a dead rank is still
    # noticed within the hour, NCCL's own 10-minute default is too short for a first shard count.
    dist_timeout_min: float = POSITIVE.field(60)

    # Speed, memory and job plumbing only: the same training either way, so a run directory is not keyed by them.
    # accum_steps: accumulation is exact (train.loop), so a run may resume with another split of its batch.
    PERFORMANCE_ONLY = ("optimizer_impl", "grad_checkpointing", "compile", "compile_backend", "dist_timeout_min",
                        "accum_steps")

    @property
    def lr(self) -> float:
        """Absolute peak learning rate."""
        return self.blr * self.batch_size / 256


@dataclass
class EvalConfig:
    """The uniform evaluation harness: which protocols run on which sets, the harness-wide read-out and
    inference batch, and each protocol's own options.

    In a study file the options sit under the protocol's name (``eval.linear.lrs``, ``--set
    eval.finetune.epochs=2``), validated by the protocol's ``Options`` (`mugbench.protocol`); here they
    are ``options`` (protocol name -> options object), filled with defaults for every registered protocol.
    """

    protocols: list = field(default_factory=lambda: ["knn", "linear", "finetune", "segmentation", "zeroshot",
                                                     "retrieval", "captioning", "reconstruction"])
    datasets: list = field(default_factory=lambda: ["toy-cls", "toy-caps", "toy-seg"])
    pool: str = "token"  # class token, as in MAE's linear probe
    batch_size: int = COUNT.field(256)  # inference batch of feature extraction and scoring
    options: dict = field(default_factory=dict)  # protocol name -> its Options (from eval.<name>)

    def options_for(self, protocol: str) -> Any:
        """The options of ``protocol``: as the study set them, else the protocol's defaults (not stored:
        reading a config never changes it, nor the hashes taken of it)."""
        if protocol in self.options:
            return self.options[protocol]
        from .registry import get_protocol

        return get_protocol(protocol).Options()


@dataclass
class StudyConfig:
    """A whole study: what every method shares, plus per-method options."""

    preset: str = "custom"
    seed: int = SEED.field(0)
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    text: TextConfig = field(default_factory=TextConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    methods: dict = field(default_factory=dict)  # method name -> {option: value}

    def to_dict(self) -> dict:
        """Plain-data form, as a study file writes it (protocol options under ``eval.<name>``), for
        result records and checkpoints; `from_dict` reads it back."""
        out = dataclasses.asdict(self)
        out["eval"].update(out["eval"].pop("options"))
        return out


_SECTIONS = {"data": DataConfig, "encoder": EncoderSpec, "text": TextConfig, "train": TrainConfig, "eval": EvalConfig}
PRESETS = ("smoke", "toy", "paper")


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the field's type; numbers written as text (YAML reads ``8e-3``
    as a string) are converted, anything else that does not fit is a `ConfigError`."""
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} must not be empty (null).")
    if optional:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    base = typing.get_origin(hint) or hint
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
        elif base is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                return int(value)
        elif base is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                return float(value)
        elif base is str:
            if isinstance(value, str):
                return value
        elif base in (list, tuple):
            if isinstance(value, (list, tuple)):
                return base(value)
        elif base is dict:
            if isinstance(value, dict):
                return value
        else:
            return value
    except ValueError:
        pass
    raise ConfigError(f"{key}={value!r} has the wrong type: expected {getattr(base, '__name__', base)}.")


def build_section(cls, values: dict, where: str):
    """An instance of the dataclass ``cls`` from the mapping ``values`` (a section of a study file at
    ``where``): unknown keys, wrong types and values outside a field's `Range` are `ConfigError`s."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(
                f"Unknown configuration key {where}.{key}. Valid keys of {where!r} are: {', '.join(known)}. "
                f"Check the spelling in the preset or in --set."
            )
    hints = typing.get_type_hints(cls)
    values = {k: _validated(known[k], hints[k], v, f"{where}.{k}") for k, v in values.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except TypeError as exc:
        raise ConfigError(f"Bad value in section {where!r}: {exc}") from None
    except ValueError as exc:  # a dataclass's own check (__post_init__) of values that fit together
        raise ConfigError(str(exc)) from None


def _validated(f: dataclasses.Field, hint: Any, value: Any, key: str) -> Any:
    """``value`` converted to the field's type and checked against its declared range; a nested
    section (``data.augment``) is built from its mapping with the same checks."""
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping with the keys "
                              f"{', '.join(f.name for f in dataclasses.fields(hint))}.")
        if hint is AugmentConfig and value.get("hflip") == "auto":
            value = dict(value, hflip=None)  # "auto" is spelled null in the schema
        return build_section(hint, value, key)
    coerced = coerce(value, hint, key)
    rng = f.metadata.get("range")
    if rng is None:
        return coerced
    nullable = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    return check_range(key, coerced, rng, nullable=nullable, shown=value)


def _build_eval(values: dict) -> EvalConfig:
    """The ``eval`` section: the harness's own keys, and per registered protocol a mapping of its options
    validated by the protocol (every protocol not mentioned gets its defaults)."""
    from .registry import registered_protocols

    if not isinstance(values, dict):
        raise ConfigError(f"eval={values!r} must be a mapping of settings.")
    protocols = registered_protocols()
    own = {f.name for f in dataclasses.fields(EvalConfig)} - {"options"}
    unknown = [k for k in values if k not in own and k not in protocols]
    if unknown:
        raise ConfigError(
            f"Unknown configuration key eval.{unknown[0]}. The keys of 'eval' are {', '.join(sorted(own))} and, "
            f"for a protocol's options, its name: {', '.join(protocols)} (e.g. eval.linear.lrs). "
            f"Check the spelling in the preset or in --set; `mugbench protocols` lists every protocol's options.")
    options = {}
    for name, protocol in protocols.items():
        given = values.get(name) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"eval.{name}={given!r} must be a mapping of the protocol's options, e.g. "
                              f"eval.{name}: {{{next(iter(protocol.option_defaults()), 'option')}: ...}}.")
        options[name] = protocol.parse_options(given)
    cfg = build_section(EvalConfig, {k: v for k, v in values.items() if k in own}, "eval")
    cfg.options = options
    return cfg


def _check_shapes(cfg: StudyConfig) -> None:
    """Settings that are each in range but do not fit together (attention heads, patches)."""
    e, t = cfg.encoder, cfg.text
    for key, size, parts, unit in (("encoder.embed_dim", e.embed_dim, ("encoder.num_heads", e.num_heads), "heads"),
                                   ("text.width", t.width, ("text.heads", t.heads), "heads"),
                                   ("encoder.img_size", e.img_size, ("encoder.patch_size", e.patch_size), "patches")):
        if size % parts[1]:
            raise ConfigError(f"{key}={size} is not divisible by {parts[0]}={parts[1]}: it is split into equal "
                              f"{unit}. Change one of them so that it is.")


def from_dict(raw: dict) -> StudyConfig:
    """Build a `StudyConfig` from nested plain data, rejecting unknown keys and values out of range."""
    top = {f.name: f for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(raw) - set(top))
    if unknown:
        raise ConfigError(f"Unknown configuration section {unknown[0]!r}. Valid top-level keys: {', '.join(sorted(top))}.")
    hints = typing.get_type_hints(StudyConfig)
    kwargs: dict[str, Any] = {k: _validated(top[k], hints[k], raw[k], k) for k in ("preset", "seed") if k in raw}
    for name, cls in _SECTIONS.items():
        if name != "eval":
            kwargs[name] = build_section(cls, raw.get(name) or {}, name)
    kwargs["eval"] = _build_eval(raw.get("eval") or {})
    kwargs["methods"] = {k: dict(v or {}) for k, v in (raw.get("methods") or {}).items()}
    cfg = StudyConfig(**kwargs)
    _check_shapes(cfg)
    return cfg


def preset_path(preset: str) -> Path:
    """A built-in preset name or a YAML path -> the file."""
    if preset in PRESETS:
        return Path(str(resources.files("mugbench") / "presets" / f"{preset}.yaml"))
    path = Path(preset)
    if not path.is_file():
        raise ConfigError(f"Unknown preset {preset!r}: use one of {', '.join(PRESETS)} or a path to a YAML study file.")
    return path


def _is_section(path: list[str]) -> bool:
    """Whether the dotted ``path`` names a section of the schema (``data``, ``data.augment``)."""
    cls: Any = StudyConfig
    for part in path:
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return False
        cls = typing.get_type_hints(cls)[part]
    return dataclasses.is_dataclass(cls)


def apply_override(raw: dict, override: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (``3``, ``[a, b]``, ``null``)."""
    if "=" not in override:
        raise ConfigError(f"Override {override!r} is not of the form key=value (e.g. train.epochs=2).")
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        # methods.<name> and eval.<protocol> are mappings the method or protocol validates.
        if child is None and (parts[0] in ("methods", "eval") and i <= 1 or _is_section(parts[:i + 1])):
            child = node[part] = {}  # a section the preset leaves out (e.g. data.augment) starts empty
        if not isinstance(child, dict):
            raise ConfigError(
                f"Override {override!r}: {'.'.join(parts[:i + 1])!r} is not a configuration section. "
                f"Sections: {', '.join(sorted(k for k, v in raw.items() if isinstance(v, dict)))}."
            )
        node = child
    # Method options may be new keys (validated by the method); everything else must exist in the
    # schema, which `from_dict` checks.
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as exc:  # e.g. a !!python/... tag, which safe_load refuses, or unbalanced brackets
        raise ConfigError(
            f"Override {override!r}: the value of {key.strip()!r} is not a plain YAML value ({_yaml_problem(exc)}). "
            f"Give a number, a string, true/false, null or a [list]; tags such as !!python/... are never "
            f"loaded.") from None


def _yaml_problem(exc: Exception) -> str:
    """The first line of what YAML found wrong, without its source excerpt."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return " ".join(str(problem).split())


def load_config(preset: str = "toy", overrides: list[str] | None = None) -> StudyConfig:
    """Read a preset, apply overrides in order and validate the result."""
    path = preset_path(preset)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"The study file {path} is not plain YAML{where} ({_yaml_problem(exc)}): fix it; tags such "
                          f"as !!python/... are never loaded.") from None
    raw.setdefault("preset", Path(preset).stem if preset not in PRESETS else preset)
    for override in overrides or []:
        apply_override(raw, override)
    return from_dict(raw)
