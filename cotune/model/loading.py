"""Loading a base model from a Hugging Face checkpoint directory: built on `meta`, then the
safetensors weights are assigned. Nothing is ever unpickled."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from cotune.kernels.choice import backend
from cotune.model.config import ModelConfig, ModelConfigError
from cotune.model.llama import PROJECTION_GROUPS, CausalLM
from cotune.model.projection_group import side_by_side
from cotune.model.quantization import check_quantization
from cotune.model.quantized_loading import CheckpointTensors, check_device, quantize_projections

_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards its index names."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / shard for shard in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    pickled = [name for name in _PICKLED_WEIGHTS if (path / name).exists()]
    if pickled:
        raise ModelConfigError(
            f"{path} holds weights only as {pickled[0]} (pickle), which cotune never loads; "
            "accepted: model.safetensors or a sharded model.safetensors.index.json"
        )
    raise ModelConfigError(f"{path} has no model.safetensors or model.safetensors.index.json")


def load_model(path: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", kernels: str | None = None,
               quantize: str | None = None) -> CausalLM:
    """The base model of checkpoint directory `path`, frozen, in `dtype` on `device`, its
    weights stored as the chosen LoRA implementation reads them fastest (see arranged). The
    implementation is chosen here, once: `kernels` (kernels.choice.CHOICES), or where it is
    None $COTUNE_KERNELS, or auto. `quantize` ('int8', 'int4' or None) stores the decoder's
    projections in 8 or 4 bits (quantized_loading)."""
    check_quantization(quantize)
    if quantize is not None:
        check_device(quantize, device)
    path = Path(path)
    config = ModelConfig.from_dir(path)
    with torch.device("meta"):
        model = CausalLM(config)
    tensors = CheckpointTensors(weight_files(path))
    found = tensors.shapes()
    if config.tie_word_embeddings:
        found.pop("lm_head.weight", None)
    expected = model.state_dict()  # meta tensors: names and shapes only
    check_weights(path, config, found, {k: t.shape for k, t in expected.items()})
    ops = backend(device, kernels)
    together = ops.FUSED_SLICES
    if quantize is not None:  # the projections' parameters become quantized weights
        quantize_projections(model, path, tensors, quantize, dtype, together)
    state = {k: tensors.read(k).to(device, dtype) for k in model.state_dict()}
    model.load_state_dict(arranged(state, config, together), assign=True, strict=True)
    for p in model.parameters():
        p.requires_grad_(False)
    model.use_kernels(ops)
    model.decide_fusion()
    return model.eval()


def check_weights(path: Path, config: ModelConfig, found: dict[str, torch.Size],
                  expected: dict[str, torch.Size]) -> None:
    """Raises ModelConfigError unless the checkpoint's weights (`found`, name -> shape) are
    exactly those of the architecture (`expected`)."""
    missing, unexpected = set(expected) - set(found), set(found) - set(expected)
    unexpected = {k for k in unexpected if not k.endswith("rotary_emb.inv_freq")}
    if missing or unexpected:
        raise ModelConfigError(
            f"{path}: weights do not match the {config.model_type} architecture of its "
            f"config.json; missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    # checked here, not left to load_state_dict: its RuntimeError is no ModelConfigError
    wrong_shapes = [f"{k} has shape {tuple(found[k])}, the config expects {tuple(expected[k])}"
                    for k in sorted(expected) if found[k] != expected[k]]
    if wrong_shapes:
        raise ModelConfigError(
            f"{path}: weights do not match the shapes of its config.json; "
            + "; ".join(wrong_shapes[:5])
        )


def arranged(state: dict[str, torch.Tensor], config: ModelConfig,
             together: bool) -> dict[str, torch.Tensor]:
    """The same values stored as the forward pass reads them fastest: every 2-D weight
    column-major, and, when `together` (the LoRA implementation fuses slices), the weights and
    biases of each projection group side by side."""
    grouped = {}
    for i in range(config.num_layers if together else 0):
        for block, members in PROJECTION_GROUPS.items():
            for kind in ("weight", "bias"):
                names = [f"model.layers.{i}.{block}.{m}.{kind}" for m in members]
                if all(n in state for n in names):
                    grouped.update(zip(names, side_by_side([state[n] for n in names])))
    return {k: grouped[k] if k in grouped else _column_major(t) for k, t in state.items()}


def _column_major(tensor: torch.Tensor) -> torch.Tensor:
    """A 2-D weight (out, in) with the same values, stored in-major (strides (1, out)).

    Every 2-D weight here is a projection or the embedding. `F.linear(x, W)` computes
    x @ W.T; with W stored so that W.T is contiguous, that is a plain GEMM, which MKL runs
    2-5x faster for the 8 to 48 rows of a decode step (measured on the CPU: 1536x576 at 32
    rows, 412 us against 950 us; no slower from 64 rows up). The embedding's row lookup gets
    slower (0.3 ms for 32 tokens), far less than its tied output projection gains."""
    if tensor.dim() != 2:
        return tensor
    return tensor.t().contiguous().t()


def checkpoint_fingerprint(path: str | Path) -> str:
    """sha256 over config.json and the names and sizes of the weight files: which base an
    adapter version was trained on, without hashing gigabytes."""
    path = Path(path)
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in weight_files(path):
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return digest.hexdigest()
