"""The like-for-like fingerprint of a study: every condition of pre-training that must be equal
across the rows of one table (DESIGN.md "Like-for-like rules"), readable and hashed.

`like_for_like` turns a `StudyConfig` into named parts (``data``, ``augment``, ``seed``, ``train``,
``encoder``, ``image_size``, ``text``); `fingerprint` hashes them into a short id that every result
record carries beside the parts, and `mugbench report` marks a row whose id differs from the rest
of its table, naming the parts that differ (`condition_diff`).

Fields are included by default: a field added to a config section (or a new section) changes the
fingerprint unless it is listed in `NOT_CONDITIONS` with the reason it cannot change what is learnt.

`mugbench bench` records carry none: they time steps under exactly the settings left out here
(compile, device, optimizer implementation), and the report never puts them in a table of trained rows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from .config import StudyConfig, TrainConfig

# Whole sections of a study that are not pre-training conditions.
NOT_CONDITION_SECTIONS = {
    "preset": "a name; the values it sets are the conditions",
    "methods": "what the rows of a table differ in by design (heads, losses, extra views)",
    "eval": "evaluation settings, recorded per record in protocol_options; not a condition of pre-training",
}

# Fields that change speed, memory or bookkeeping but never what the encoder learns, by section.
# Everything else, including any field added later, is part of the fingerprint.
NOT_CONDITIONS = {
    "data": {
        "pin_memory": "page-locked host memory: copies faster, the same batches",
        "prefetch_factor": "how far ahead workers prepare batches, not which batches",
        "num_workers": "loader processes own whole sample streams (data.streams) and the global batch is "
                       "assembled in stream order, so every worker count gives the same batches",
        "decode_draft": "JPEG reduced-size decode, never below the resolution the study's base-view crops "
                        "need, the same for every method (study.pretrain_batches)",
    },
    "train": {
        **{name: "speed, memory or job plumbing only (TrainConfig.PERFORMANCE_ONLY): the same training either way"
           for name in TrainConfig.PERFORMANCE_ONLY},
        "device": "where it runs; the numerics it implies are kept as the resolved train.precision",
        "strategy": "ddp and fsdp compute the same update (fsdp shards the weights to save memory)",
        "accum_steps": "accumulation is exact (train.loop): a batch-coupled loss is taken over the whole global "
                       "batch in two passes, means divide by the step's counts, so the update is the same "
                       "(up to float rounding) for any number of micro-batches",
        "ckpt_every": "checkpoint cadence; resuming is exact",
        "keep_checkpoints": "how many checkpoint files stay on disk",
        "log_every": "logging cadence",
    },
}
# Not a setting, not a condition: the number of ranks (GPUs, nodes). Each rank holds whole sample streams and
# its rows of every global batch, masks are cut from one draw per global batch, and losses gather or divide
# over every rank, so 1 or 64 GPUs train the same weights (tests/test_stream_identity_slow.py).
# Kept on purpose (they look like speed settings but are not):
# - data.streams: the global batch is assembled from that many streams of shards; another count reads
#   other samples into each batch.
# - train.precision: bf16 autocast and fp32 give different numerics; "auto" is resolved per device.

# Parts that move out of their section so that a report names them on their own.
_OWN_PARTS = {("data", "augment"): "augment", ("encoder", "img_size"): "image_size"}


def _plain(value: Any) -> Any:
    """JSON's view of ``value`` (tuples become lists), so parts compare equal after a record's round trip."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def like_for_like(cfg: StudyConfig, *, device: Any = None) -> dict[str, Any]:
    """The readable like-for-like conditions of ``cfg``'s pre-training, as plain JSON data.

    ``device`` (a ``torch.device`` or its type name), when known, resolves ``train.precision="auto"``
    to what the trainer runs (bf16 autocast on CUDA, fp32 elsewhere). The number of ranks is not one.
    """
    parts: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.name in NOT_CONDITION_SECTIONS:
            continue
        value = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(value):
            parts[f.name] = value  # the seed (shard order and init), or any plain top-level setting added later
            continue
        skip = NOT_CONDITIONS.get(f.name, {})
        section = {k: v for k, v in dataclasses.asdict(value).items() if k not in skip}
        for (owner, key), part in _OWN_PARTS.items():
            if owner == f.name and key in section:
                parts[part] = section.pop(key)
        parts[f.name] = section
    train = parts["train"]
    train["lr"] = cfg.train.lr  # the absolute peak rate the schedule starts from (blr * batch / 256)
    if train.get("precision") == "auto" and device is not None:
        kind = getattr(device, "type", str(device))
        train["precision"] = "bf16" if kind == "cuda" else "fp32"
    return _plain(parts)


def fingerprint(parts: dict[str, Any]) -> str:
    """A 12-hex-digit SHA-256 of ``parts`` (key order does not matter); ``""`` for no parts (unknown)."""
    if not parts:
        return ""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"epochs": 2}}`` -> ``{"train.epochs": 2}``; lists stay whole values."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key in sorted(value):
            out.update(_flatten(value[key], f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


_ABSENT = object()


def condition_diff(these: dict[str, Any], others: dict[str, Any]) -> list[str]:
    """Each condition where ``these`` differs from ``others``, as ``"train.epochs 4 vs 2"`` (``absent``
    for a condition only one side records), in dotted-path order."""
    a, b = _flatten(_plain(these)), _flatten(_plain(others))
    lines = []
    for path in sorted(set(a) | set(b)):
        mine, theirs = a.get(path, _ABSENT), b.get(path, _ABSENT)
        if mine != theirs:
            lines.append(f"{path} {_show(mine)} vs {_show(theirs)}")
    return lines


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "absent"
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list, str)) or value is None else str(value)


__all__ = ["NOT_CONDITIONS", "NOT_CONDITION_SECTIONS", "condition_diff", "fingerprint", "like_for_like"]
