"""Loading a base whose decoder projections are stored in 8 or 4 bits (`--quantize`).

The checkpoint is read one tensor at a time: each projection group's float weights (q, k and
v; gate and up; or each projection alone) are read, quantized and dropped before the next, so
no float copy of the whole base ever exists. A group is quantized as one store, its rows side
by side, and each projection's weight is its rows of it (quantized.QuantizedRows): the group
runs one GEMM (projection_group.joint_weight). A checkpoint converted from GGUF that kept its
4-bit blocks (gguf_int4) gives int4 exactly those weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from cotune.model.gguf_int4 import Int4File
from cotune.model.llama import PROJECTION_GROUPS, CausalLM
from cotune.model.quantization import QuantizationError
from cotune.model.quantized import Int4Weight, quantize_weight
from cotune.model.virtualized_linear import VirtualizedLinear


class CheckpointTensors:
    """The tensors of a checkpoint's safetensors files, by name, read one at a time."""

    def __init__(self, files: list[Path]):
        self._files = [safe_open(file, framework="pt") for file in files]
        self._where = {key: f for f in self._files for key in f.keys()}

    def shapes(self) -> dict[str, torch.Size]:
        return {key: torch.Size(f.get_slice(key).get_shape()) for key, f in self._where.items()}

    def read(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)


def check_device(quantize: str, device: str | torch.device) -> None:
    if torch.device(device).type != "cpu":
        raise QuantizationError(
            f"--quantize {quantize} stores the base for PyTorch's packed CPU matmuls; device "
            f"{device} is not supported yet; accepted: --device cpu, or no --quantize")


def quantize_projections(model: CausalLM, path: Path, tensors: CheckpointTensors,
                         quantize: str, dtype: torch.dtype, together: bool) -> None:
    """Stores every decoder projection's weight of `model` quantized, group by group (each
    projection alone unless `together`): they leave the model's parameters."""
    int4 = Int4File(path) if quantize == "int4" else None
    for layer in model.model.layers:
        for group in _groups(layer, together):
            names = [f"{module.name}.weight" for module in group]
            store = _quantized(names, tensors, int4, quantize, dtype)
            start = 0
            for module in group:
                del module.weight  # the float parameter, still on meta
                module.weight = store.rows(start, start + module.out_features)
                start += module.out_features


def _groups(layer, together: bool) -> list[list[VirtualizedLinear]]:
    blocks = {"self_attn": layer.self_attn, "mlp": layer.mlp}
    groups = []
    for block, members in PROJECTION_GROUPS.items():
        modules = [getattr(blocks[block], member) for member in members]
        groups += [modules] if together else [[m] for m in modules]
    return groups + [[layer.self_attn.o_proj], [layer.mlp.down_proj]]


def _quantized(names: list[str], tensors: CheckpointTensors, int4: Int4File | None,
               quantize: str, dtype: torch.dtype):
    if int4 is not None and all(name in int4 for name in names):
        levels, scale, minimum = (torch.cat(parts) for parts in zip(*map(int4.read, names)))
        return Int4Weight.from_levels(levels, scale, minimum, dtype)
    weight = torch.cat([tensors.read(name) for name in names])
    return quantize_weight(weight, quantize, dtype)
