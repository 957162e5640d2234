"""The 4-bit blocks of a GGUF file's projections, kept as they are for a base served in 4 bits.

GGUF's Q4_0 and Q4_1 blocks (32 weights each) are w = level * scale + minimum, levels in
[0, 15] (Q4_0: minimum = -8 scale), which is the form of cotune's int4 (quantized.Int4Weight).
When a GGUF file is converted (gguf_convert), the levels, scales and minimums of those
projections are also written to INT4_FILE beside the float checkpoint; `--quantize int4` then
serves exactly the file's 4-bit weights, never rounded through float32 again. Other block
types (Q4_K, Q8_0, ...) are quantized from the float checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType
from safetensors import safe_open

# In a folder of its own: readers of the checkpoint (vLLM, say) take every *.safetensors file
# beside config.json for the model's weights.
INT4_FILE = "gguf-int4/blocks.safetensors"
BLOCK = 32
_BLOCK_BYTES = {GGMLQuantizationType.Q4_0: 18, GGMLQuantizationType.Q4_1: 20}


def block_levels(data: np.ndarray, kind: GGMLQuantizationType
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(levels (N, K) uint8, scale (N, K / 32) float16, minimum (N, K / 32) float16) of a
    tensor's raw Q4_0 or Q4_1 blocks (N, K / 32 * block bytes); None for any other type.

    A block is its float16 scale, for Q4_1 its float16 minimum, then 16 bytes whose low
    nibbles are its levels 0-15 and high nibbles its levels 16-31."""
    if kind not in _BLOCK_BYTES:
        return None
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, _BLOCK_BYTES[kind])
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    if kind == GGMLQuantizationType.Q4_1:
        minimum, quants = blocks[..., 2:4].copy().view(np.float16)[..., 0], blocks[..., 4:]
    else:
        minimum, quants = (-8 * scale.astype(np.float32)).astype(np.float16), blocks[..., 2:]
    levels = np.concatenate([quants & 15, quants >> 4], axis=-1)  # (N, K / 32, 32)
    return levels.reshape(rows, -1), scale, minimum


def to_file(levels: np.ndarray, scale: np.ndarray, minimum: np.ndarray, name: str
            ) -> dict[str, np.ndarray]:
    """The INT4_FILE entries of weight `name`: levels two to a byte (even columns in the low
    nibble), scale and minimum as they are."""
    packed = (levels[:, 0::2] | (levels[:, 1::2] << 4)).astype(np.uint8)
    return {f"{name}.levels": np.ascontiguousarray(packed),
            f"{name}.scale": np.ascontiguousarray(scale),
            f"{name}.minimum": np.ascontiguousarray(minimum)}


class Int4File:
    """The 4-bit weights a converted checkpoint keeps (INT4_FILE), read one at a time."""

    def __init__(self, checkpoint: Path):
        path = Path(checkpoint) / INT4_FILE
        self._file = safe_open(path, framework="pt") if path.is_file() else None
        keys = set() if self._file is None else set(self._file.keys())
        self.names = {key.rsplit(".", 1)[0] for key in keys}

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def read(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(levels (N, K) uint8, scale, minimum (N, K / 32) float32) of weight `name`."""
        packed = self._file.get_tensor(f"{name}.levels")
        levels = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
        return (levels, self._file.get_tensor(f"{name}.scale").float(),
                self._file.get_tensor(f"{name}.minimum").float())
