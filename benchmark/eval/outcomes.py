"""Per-example outcomes of the classification protocols (k-NN, linear probe, zero-shot, fine-tuning):
whether each val example was right, and the accuracy in percent counted exactly from those flags, so a
record's accuracy equals the mean of the per-example outcomes it keeps for paired comparisons.

timm's ``accuracy`` gives only the batch's float32 percentages, not the per-example flags."""
from __future__ import annotations

import torch


def topk_outcomes(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per example (a CPU bool tensor each): whether its label scores highest (``"top1"``) and, with
    more than 10 classes, whether it is among the five highest (``"top5"``)."""
    outcomes = {"top1": (scores.argmax(1) == labels).cpu()}
    if scores.shape[1] > 10:
        outcomes["top5"] = (scores.topk(5, 1).indices == labels[:, None]).any(1).cpu()
    return outcomes


def percent_right(flags: torch.Tensor) -> float:
    """The share of true flags in percent, counted exactly (an integer count over the total, 0 for
    none), so a record's accuracy equals the mean of its per-example outcomes."""
    return 100.0 * int(flags.sum()) / max(1, len(flags))


def percent(outcomes: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each metric's `percent_right` of its per-example flags."""
    return {metric: percent_right(flags) for metric, flags in outcomes.items()}
