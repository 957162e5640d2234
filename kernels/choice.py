"""Which implementation of the segmented LoRA ops runs: Triton kernels or a torch twin.

This folder is `cotune.kernels`, a package without an `__init__.py` (see "Layout" in the
README): a top-level `kernels` on `sys.path` is the PyPI package's, never this folder.

The choice is made once, when a model is loaded (loading.load_model): `reference` (plain
torch written for clarity, a loop over segments), `torch` (batched torch, fast on the CPU),
`triton` (fused kernels), or `auto` (the default: Triton for tensors on a CUDA device when
Triton is installed, batched torch otherwise); where the loader is not told, from
`COTUNE_KERNELS`. Every implementation has the same signatures as
`cotune.kernels.sgmv_reference`.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch

CHOICES = ("reference", "torch", "triton", "auto")


class KernelChoiceError(ValueError):
    """The chosen implementation cannot run here, or is none of CHOICES."""


def backend(device: torch.device | str = "cpu", choice: str | None = None) -> ModuleType:
    """The module of segmented ops for tensors on `device`: `choice`, or where it is None
    the one COTUNE_KERNELS names (read here, once per model)."""
    choice = choice or os.environ.get("COTUNE_KERNELS", "auto")
    if choice not in CHOICES:
        raise KernelChoiceError(f"kernels {choice!r} (COTUNE_KERNELS or --kernels) is not "
                                f"accepted; use one of {CHOICES}")
    on_cuda = torch.device(device).type == "cuda"
    if choice == "auto":
        choice = "triton" if on_cuda and _triton_installed() else "torch"
    if choice == "reference":
        from cotune.kernels import sgmv_reference

        return sgmv_reference
    if choice == "torch":
        from cotune.kernels import sgmv_torch

        return sgmv_torch
    if not _triton_installed():
        raise KernelChoiceError(
            "COTUNE_KERNELS=triton but Triton is not installed; install cotune[triton], or "
            "use COTUNE_KERNELS=torch or auto")
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise KernelChoiceError(
            f"COTUNE_KERNELS=triton runs on CUDA devices, not {torch.device(device).type}, "
            "unless Triton's interpreter is on (TRITON_INTERPRET=1, set before triton is "
            "imported); use COTUNE_KERNELS=torch or auto")
    from cotune.kernels import sgmv_triton

    return sgmv_triton


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None
