"""Segmented LoRA ops: Triton kernels and their torch reference twins.

`COTUNE_KERNELS` picks the implementation: `reference` (plain torch written for clarity, a
loop over segments), `torch` (batched torch, fast on the CPU), `triton` (fused kernels), or
`auto` (the default: Triton on a CUDA device when its kernels are available, batched torch
otherwise). Every implementation has the same signatures as `cotune.kernels.sgmv_reference`.
"""

from __future__ import annotations

import os
from types import ModuleType

CHOICES = ("reference", "torch", "triton", "auto")


class KernelChoiceError(ValueError):
    """COTUNE_KERNELS names an implementation that cannot run here."""


def backend() -> ModuleType:
    """The module of segmented ops chosen by COTUNE_KERNELS (read at each call)."""
    choice = os.environ.get("COTUNE_KERNELS", "auto")
    if choice not in CHOICES:
        raise KernelChoiceError(f"COTUNE_KERNELS={choice!r} is not accepted; use one of {CHOICES}")
    if choice == "triton":
        raise KernelChoiceError(
            "COTUNE_KERNELS=triton: cotune has no Triton implementation of the segmented LoRA "
            "ops for training yet (sgmv_triton holds the forward kernels only); use "
            "COTUNE_KERNELS=reference or auto"
        )
    if choice == "reference":
        from cotune.kernels import sgmv_reference

        return sgmv_reference
    from cotune.kernels import sgmv_torch

    return sgmv_torch
