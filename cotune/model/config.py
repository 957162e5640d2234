"""The architecture of a Llama-family base, read from a Hugging Face `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# model_type -> (q/k/v carry a bias, o carries a bias) when config.json does not say.
_FAMILY_BIASES = {
    "llama": (False, False),
    "mistral": (False, False),
    "qwen2": (True, False),
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILY_BIASES)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ModelConfigError(ValueError):
    """A base model configuration that cotune cannot run; the message says what is accepted."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    # llama3 rope scaling (Llama 3.1+): frequencies below/above these bands are rescaled.
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelConfigError(
                f"rope scaling type {self.rope_type!r} is not supported; "
                f"accepted: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        """Reads the fields of a transformers Llama/Mistral/Qwen2 config dict."""
        model_type = hf.get("model_type", "llama")
        if model_type not in _FAMILY_BIASES:
            raise ModelConfigError(
                f"model_type {model_type!r} is not supported; "
                f"accepted: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(
                f"hidden_act {hf['hidden_act']!r} is not supported; accepted: silu")
        qkv_bias, o_bias = _FAMILY_BIASES[model_type]
        # Llama's flag biases q, k, v and o alike; transformers' Mistral and Qwen2 ignore it
        if model_type == "llama" and "attention_bias" in hf:
            qkv_bias = o_bias = bool(hf["attention_bias"])
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        rope = _rope_fields(hf)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=_sliding_window(hf, model_type),
            model_type=model_type,
            **rope,
        )

    @classmethod
    def from_dir(cls, path: Path) -> ModelConfig:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise ModelConfigError(f"{path} has no config.json; expected a Hugging Face checkpoint")
        return cls.from_hf(json.loads(config_file.read_text()))


def _rope_fields(hf: dict) -> dict:
    # transformers 5 writes `rope_parameters` (theta inside); 4.x writes rope_theta + rope_scaling.
    params = dict(hf.get("rope_parameters") or {})
    params.update(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    fields = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        fields["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        fields["rope_low_freq_factor"] = float(params["low_freq_factor"])
        fields["rope_high_freq_factor"] = float(params["high_freq_factor"])
        fields["rope_original_max_positions"] = int(params["original_max_position_embeddings"])
    return fields


def _sliding_window(hf: dict, model_type: str) -> int | None:
    if model_type == "qwen2":
        if hf.get("use_sliding_window", False):
            raise ModelConfigError(
                "Qwen2 with use_sliding_window=true (per-layer windows) is not supported; "
                "accepted: use_sliding_window=false"
            )
        return None
    return hf.get("sliding_window") or None
