"""Compatibility of mmsegmentation 1.x with mmcv-lite.

* mmcv-lite ships ``mmcv/ops`` without the compiled ``mmcv._ext``, so ``import mmcv.ops``
  fails, and mmseg imports ``point_sample`` (PointRend / mask-classification helpers) and
  ``sigmoid_focal_loss`` from it at module level: ``import mmseg.models`` fails although UperNet
  needs no compiled op. `ensure_mmseg_importable` registers a small stand-in ``mmcv.ops`` with a
  pure-PyTorch `point_sample` (a ``grid_sample`` wrapper) -- only when the compiled ops are
  absent; with full mmcv it does nothing.

(mmengine's resume, which unpickles fully, is not used: the segmentation protocol saves its
checkpoints as plain data and reads them with ``weights_only=True`` itself.)
"""
from __future__ import annotations

import importlib.util
import sys
import types

import torch
import torch.nn.functional as F

_SHIM_FLAG = "__mugbench_shim__"


def has_compiled_mmcv_ops() -> bool:
    """Whether mmcv's compiled extension is installed (full mmcv rather than mmcv-lite)."""
    try:
        return importlib.util.find_spec("mmcv._ext") is not None
    except ModuleNotFoundError:  # no mmcv at all
        return False


def point_sample(input: torch.Tensor, points: torch.Tensor, align_corners: bool = False,
                 **kwargs) -> torch.Tensor:
    """Bilinearly sample ``input`` [N, C, H, W] at ``points`` given in [0, 1] x [0, 1] (x, y).

    ``points`` is [N, P, 2] (returns [N, C, P]) or [N, Hg, Wg, 2] (returns [N, C, Hg, Wg]); the
    signature and semantics are mmcv's ``point_sample``. ``grid_sample`` expects [-1, 1], hence
    the affine map; extra keyword arguments (``mode``, ``padding_mode``) go to ``grid_sample``.
    """
    flat = points.dim() == 3
    grid = points.unsqueeze(2) if flat else points
    out = F.grid_sample(input, 2.0 * grid - 1.0, align_corners=align_corners, **kwargs)
    return out.squeeze(3) if flat else out


def sigmoid_focal_loss(*args, **kwargs):
    """Placeholder for mmcv's CUDA focal loss: only imported by mmseg at module level.

    mmseg's ``FocalLoss`` calls it only for CUDA tensors; no protocol here uses that loss.
    """
    raise NotImplementedError("sigmoid_focal_loss needs mmcv's compiled ops (install full mmcv); "
                              "mmcv-lite only provides the pure-PyTorch point_sample stand-in")


def _missing_op(name: str):
    """Module ``__getattr__`` of the stand-in: any other op is reported as not installed.

    mmseg guards its optional ops with ``except ModuleNotFoundError`` (``CrissCrossAttention``,
    ``PSAMask``), so that is what a missing name raises; private and dunder names raise
    AttributeError, which is what ``hasattr`` and the import machinery expect.
    """
    if name.startswith("_"):
        raise AttributeError(name)
    raise ModuleNotFoundError(f"mmcv.ops.{name} needs mmcv's compiled ops; mmcv-lite is installed",
                              name="mmcv._ext")


def ensure_mmseg_importable() -> bool:
    """Make ``import mmseg.models`` work on mmcv-lite; return True if the stand-in is in use.

    Without ``mmcv._ext`` a module ``mmcv.ops`` holding `point_sample` and `sigmoid_focal_loss`
    is put into ``sys.modules`` (and as ``mmcv.ops``); any other op raises ModuleNotFoundError
    (see `_missing_op`). It is deliberately not a package, so optional imports such as
    ``mmcv.ops.multi_scale_deform_attn`` keep failing with the ImportError their callers
    already handle. With full mmcv nothing is changed.
    """
    if has_compiled_mmcv_ops():
        return False
    current = sys.modules.get("mmcv.ops")
    if current is not None and getattr(current, _SHIM_FLAG, False):
        return True
    import mmcv

    shim = types.ModuleType("mmcv.ops", "mugbench stand-in for mmcv.ops (mmcv-lite has no compiled ops).")
    shim.point_sample = point_sample
    shim.sigmoid_focal_loss = sigmoid_focal_loss
    shim.__getattr__ = _missing_op
    setattr(shim, _SHIM_FLAG, True)
    sys.modules["mmcv.ops"] = shim
    mmcv.ops = shim
    return True
