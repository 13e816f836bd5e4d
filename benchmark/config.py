"""Study configuration: a YAML preset plus ``--set key=value`` overrides, validated strictly.

A preset fixes everything that must be equal across methods (DESIGN.md "Like-for-like
rules"): encoder, data, optimiser, schedule, budget and evaluation. Only ``methods.<name>``
differs per method; those options are validated by the method itself.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A preset or override that does not fit the configuration schema."""


@dataclass(frozen=True)
class EncoderSpec:
    """Architecture of the shared ViT; ``timm_name`` is the closest timm model, overridden by the rest."""

    timm_name: str = "vit_base_patch16_224"
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0

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


@dataclass
class DataConfig:
    """Pre-training data and loading."""

    name: str = "toy"  # toy | cc3m | cc12m | laion400m | a shard pattern
    toy_seed: int = 0
    toy_native_size: int = 64  # pixels the world is drawn at; views are resized to encoder.img_size
    toy_shard_size: int = 1000  # samples per shard; ranks x loader workers need a shard each
    toy_sizes: dict = field(default_factory=lambda: {"pretrain": 6000, "cls-train": 2000, "cls-val": 1000,
                                                     "caps-val": 200})
    samples_per_epoch: Optional[int] = None  # needed for shard sets without a manifest
    num_workers: int = 0  # DataLoader worker processes per rank
    pin_memory: bool = True  # page-locked batches for faster host-to-GPU copies (CUDA only)
    prefetch_factor: int = 4  # batches each worker prepares ahead (with workers only)
    shuffle_buffer: int = 2000
    # open_clip's multi-node recipe: each (rank, worker) draws shards with replacement and an epoch is
    # samples_per_epoch samples; without it shards are split across ranks and workers, one pass each.
    resampled: bool = False
    min_image_size: int = 32  # shorter side in pixels; smaller images are skipped as tiny_image
    repair_modes: bool = True  # CMYK/palette/alpha/grey -> RGB (counted); false skips them as wrong_mode
    decode_draft: bool = True  # JPEG reduced-size decode down to what the smallest crop needs
    max_bad_fraction: float = 0.2  # stop a run whose skipped fraction exceeds this (after 1,000 samples)


@dataclass
class TextConfig:
    """Tokenizer and text-tower size shared by every method that reads captions."""

    context_length: int = 32
    vocab: str = "full"  # full = open_clip's BPE; corpus = the BPE ids seen in the training captions
    width: int = 512
    heads: int = 8
    layers: int = 12
    embed_dim: int = 512


@dataclass
class TrainConfig:
    """The shared optimiser, schedule and budget (MAE's recipe by default)."""

    epochs: float = 400
    batch_size: int = 4096  # global batch
    blr: float = 1.5e-4  # lr = blr * batch_size / 256 (MAE's scaling rule)
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.95)
    warmup_epochs: float = 40
    grad_clip: Optional[float] = None
    accum_steps: int = 1
    strategy: str = "ddp"  # ddp (replicated weights) | fsdp (sharded weights, for encoders too large to replicate)
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU; or fp32 | bf16
    device: str = "auto"
    ckpt_every: int = 1000  # steps
    keep_checkpoints: int = 2  # newest checkpoint files kept; an unreadable newest one falls back to the next
    log_every: int = 10
    # Speed and memory only: the same training either way, so a run directory is not keyed by them
    # (`PERFORMANCE_ONLY`) and switching one resumes the same run.
    optimizer_impl: str = "auto"  # auto = fused AdamW on CUDA, foreach elsewhere; or fused | foreach | loop
    grad_checkpointing: bool = False  # recompute block activations in the backward pass: less memory, ~30% slower
    compile: bool = False  # torch.compile the method; a failure to compile falls back to eager with a warning
    compile_backend: str = "inductor"

    PERFORMANCE_ONLY = ("optimizer_impl", "grad_checkpointing", "compile", "compile_backend")

    @property
    def lr(self) -> float:
        """Absolute peak learning rate."""
        return self.blr * self.batch_size / 256


@dataclass
class EvalConfig:
    """The uniform evaluation harness's protocols and their options."""

    protocols: list = field(default_factory=lambda: ["knn", "linear", "finetune", "segmentation", "zeroshot",
                                                     "retrieval", "captioning", "reconstruction"])
    datasets: list = field(default_factory=lambda: ["toy-cls", "toy-caps", "toy-seg"])
    pool: str = "token"  # class token, as in MAE's linear probe
    batch_size: int = 256
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_standardize: bool = False  # DINO's k-NN uses raw L2-normalised features
    linear_epochs: int = 100
    linear_lr: float = 0.1
    linear_batch_size: int = 256
    linear_weight_decay: float = 0.0
    linear_solver: str = "sgd"  # sgd (momentum, the fast path) | lars (MAE's paper protocol)
    linear_lrs: list = field(default_factory=list)  # base-lr grid trained in one pass; empty = [linear_lr]
    linear_warmup_epochs: int = 0  # MAE's probe: 10 of 90 epochs
    # End-to-end fine-tuning (MAE's ViT-B recipe, He et al. 2022, Table 9); built from timm's utilities.
    finetune_epochs: int = 100
    finetune_batch_size: int = 1024
    finetune_blr: float = 5.0e-4  # lr = blr * batch / 256
    finetune_layer_decay: float = 0.65
    finetune_weight_decay: float = 0.05
    finetune_drop_path: float = 0.1
    finetune_warmup_epochs: int = 5
    finetune_mixup: float = 0.8
    finetune_cutmix: float = 1.0
    finetune_label_smoothing: float = 0.1
    finetune_randaug: Optional[str] = "rand-m9-mstd0.5-inc1"  # timm auto_augment string; null = none
    finetune_reprob: float = 0.25
    # Semantic segmentation: UperNet on four ViT blocks (BEiT / MAE's ADE20K setting, mmseg defaults).
    seg_iters: int = 160000
    seg_batch_size: int = 16
    seg_crop: int = 512
    seg_lr: float = 1.0e-4
    seg_weight_decay: float = 0.05
    seg_layer_decay: float = 0.65
    seg_warmup_iters: int = 1500
    seg_channels: int = 512  # UPerHead width
    seg_aux_weight: float = 0.4  # auxiliary FCNHead loss weight
    zeroshot_images: int = 0  # 0 = every validation image; likelihood scoring costs classes x prompts per image
    caption_beam: int = 1  # greedy decoding
    caption_max_len: int = 24
    figure_images: int = 8


@dataclass
class StudyConfig:
    """A whole study: what every method shares, plus per-method options."""

    preset: str = "custom"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    text: TextConfig = field(default_factory=TextConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    methods: dict = field(default_factory=dict)  # method name -> {option: value}

    def to_dict(self) -> dict:
        """Plain-data form, for result records and checkpoints."""
        return dataclasses.asdict(self)


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


def _build(cls, values: dict, where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(
                f"Unknown configuration key {where}.{key}. Valid keys of {where!r} are: {', '.join(known)}. "
                f"Check the spelling in the preset or in --set."
            )
    hints = typing.get_type_hints(cls)
    values = {k: coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"Bad value in section {where!r}: {exc}") from None


def from_dict(raw: dict) -> StudyConfig:
    """Build a `StudyConfig` from nested plain data, rejecting unknown keys."""
    top = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ConfigError(f"Unknown configuration section {unknown[0]!r}. Valid top-level keys: {', '.join(sorted(top))}.")
    kwargs: dict[str, Any] = {k: raw[k] for k in ("preset", "seed") if k in raw}
    for name, cls in _SECTIONS.items():
        kwargs[name] = _build(cls, raw.get(name) or {}, name)
    kwargs["methods"] = {k: dict(v or {}) for k, v in (raw.get("methods") or {}).items()}
    return StudyConfig(**kwargs)


def preset_path(preset: str) -> Path:
    """A built-in preset name or a YAML path -> the file."""
    if preset in PRESETS:
        return Path(str(resources.files("mugbench") / "presets" / f"{preset}.yaml"))
    path = Path(preset)
    if not path.is_file():
        raise ConfigError(f"Unknown preset {preset!r}: use one of {', '.join(PRESETS)} or a path to a YAML study file.")
    return path


def apply_override(raw: dict, override: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (``3``, ``[a, b]``, ``null``)."""
    if "=" not in override:
        raise ConfigError(f"Override {override!r} is not of the form key=value (e.g. train.epochs=2).")
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None and parts[0] == "methods" and i <= 1:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(
                f"Override {override!r}: {'.'.join(parts[:i + 1])!r} is not a configuration section. "
                f"Sections: {', '.join(sorted(k for k, v in raw.items() if isinstance(v, dict)))}."
            )
        node = child
    # Method options may be new keys (validated by the method); everything else must exist in the
    # schema, which `from_dict` checks.
    node[parts[-1]] = yaml.safe_load(value)


def load_config(preset: str = "toy", overrides: list[str] | None = None) -> StudyConfig:
    """Read a preset, apply overrides in order and validate the result."""
    raw = yaml.safe_load(preset_path(preset).read_text()) or {}
    raw.setdefault("preset", Path(preset).stem if preset not in PRESETS else preset)
    for override in overrides or []:
        apply_override(raw, override)
    return from_dict(raw)
