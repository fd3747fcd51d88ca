"""Mixed precision: which passes may run in bfloat16, and the one context they run in.

``precision: auto`` runs the VQ-VAE and Transformer training steps and detection's decoding and Transformer passes
under bfloat16 autocast on CUDA and in plain float32 on a CPU (so CPU results stay what they were); ``bfloat16``
asks for autocast on any device (on a CPU it is for tests: most CPUs have no bfloat16 arithmetic and run it
slower); ``float32`` turns it off. Whatever autocast does, the codebook distances and EMA updates (see
:func:`iltm.vqvae.build_vqvae`), the losses, the softmax of the token probabilities, the likelihood threshold test and
the KDE sums are float32.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

PRECISIONS = ("auto", "float32", "bfloat16")


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast runs the marked passes in on ``device``, or None for plain float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: one of {', '.join(PRECISIONS)}")
    if precision == "bfloat16" or (precision == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return None


def autocast(precision: str, device: torch.device):
    """The context a bfloat16-capable pass runs in: autocast to bfloat16, or nothing at all under float32 (not even
    a disabled autocast, so float32 results are bit-for-bit what they were without this module)."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)

