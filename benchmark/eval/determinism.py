"""What a record can promise about repeating its number with the same seed, by device.

On the CPU every protocol repeats bit for bit (tests/test_determinism.py). On CUDA some backward
kernels sum with atomic adds, in an order that varies run to run, and the harness does not force
torch's deterministic mode (several of these kernels have no deterministic version, and it would
slow the rest); a record trained there says so.
"""
from __future__ import annotations

import torch

CUDA_NOTE = ("not bit-for-bit repeatable on CUDA: backward kernels that sum with atomic adds (scaled-dot-product "
             "attention, bilinear upsampling, cuDNN convolution weight gradients) add in a varying order, so the "
             "same seed can give slightly different numbers; compare methods on the mean over seeds")


def determinism_note(device) -> dict[str, str]:
    """``{"determinism": CUDA_NOTE}`` for protocol options of a protocol that trained on CUDA, else ``{}``."""
    return {"determinism": CUDA_NOTE} if torch.device(device).type == "cuda" else {}
