"""The shapes of a base model's parameters, read from a Hugging Face `config.json`, for the
planner: dense Llama-family bases and mixture-of-experts bases (Mixtral, DeepSeek-style routed
plus shared experts, Qwen-MoE), with grouped-query attention. Nothing is allocated."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cotune.model.targets import ATTENTION_TARGETS, MLP_TARGETS

PRESETS_DIR = Path(__file__).resolve().parent.parent / "data" / "configs"


class ArchitectureError(ValueError):
    """A config the planner cannot read; the message says what is accepted."""


@dataclass(frozen=True)
class Tensors:
    """`count` parameter tensors of `numel` elements each, under one name."""

    name: str
    numel: int
    count: int = 1


@dataclass(frozen=True)
class Architecture:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # of the dense MLPs
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    # mixture of experts: 0 routed experts means a dense base
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    num_shared_experts: int = 0
    first_dense_layers: int = 0  # the first layers keep a dense MLP

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers if self.is_moe else 0

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def head_tensors(self) -> list[Tensors]:
        """The embeddings, the final norm and the LM head (tied: the embeddings)."""
        h = self.hidden_size
        head = [Tensors("embed_tokens", self.vocab_size * h), Tensors("norm", h)]
        if not self.tie_word_embeddings:
            head.append(Tensors("lm_head", self.vocab_size * h))
        return head

    def layer_tensors(self, moe: bool) -> list[Tensors]:
        """One decoder layer: attention, its two norms, and a dense MLP or the experts; the
        names follow cotune's CausalLM."""
        h = self.hidden_size
        tensors = [Tensors("q_proj", h * self.q_dim), Tensors("k_proj", h * self.kv_dim),
                   Tensors("v_proj", h * self.kv_dim), Tensors("o_proj", self.q_dim * h),
                   Tensors("layernorms", h, 2)]
        if self.qkv_bias:
            tensors += [Tensors("q_proj.bias", self.q_dim), Tensors("kv_proj.bias", self.kv_dim, 2)]
        size, count = self.intermediate_size, 1
        if moe:
            size, count = self.expert_intermediate_size, self.num_experts + self.num_shared_experts
            tensors.append(Tensors("router", self.num_experts * h))
        return tensors + [Tensors("gate_proj", h * size, count),
                          Tensors("up_proj", h * size, count),
                          Tensors("down_proj", size * h, count)]

    def tensors(self) -> list[Tensors]:
        """Every parameter tensor, grouped by shape."""
        groups = self.head_tensors()
        for moe, layers in ((False, self.num_layers - self.moe_layers), (True, self.moe_layers)):
            if layers:
                groups += [Tensors(t.name, t.numel, t.count * layers)
                           for t in self.layer_tensors(moe)]
        return groups

    @property
    def head_params(self) -> int:
        return sum(t.numel * t.count for t in self.head_tensors())

    @property
    def largest_layer(self) -> int:
        """Elements of the largest decoder layer: what a sharded step gathers at once beside
        the head."""
        kinds = [moe for moe, layers in ((False, self.num_layers - self.moe_layers),
                                         (True, self.moe_layers)) if layers]
        return max(sum(t.numel * t.count for t in self.layer_tensors(moe)) for moe in kinds)

    @property
    def total_params(self) -> int:
        return sum(t.numel * t.count for t in self.tensors())

    @property
    def largest_tensor(self) -> int:
        """Elements of the largest single parameter (DeepSpeed's largest "layer", and what
        each of its NVMe offload buffers must hold)."""
        return max(t.numel for t in self.tensors())

    @property
    def active_params(self) -> int:
        """Parameters one token reads: every routed expert it is not sent to is left out."""
        unused = (self.num_experts - self.experts_per_token) * self.moe_layers
        return self.total_params - unused * 3 * self.hidden_size * self.expert_intermediate_size

    def lora_params(self, rank: int) -> int:
        """Elements of one adapter of `rank` on cotune's targets (attention, and the dense and
        shared-expert MLPs; routed experts carry no LoRA)."""
        h = self.hidden_size
        per_layer = rank * (h + self.q_dim) * 2 + rank * (h + self.kv_dim) * 2
        mlp = rank * (h + self.intermediate_size) * 3
        shared = rank * (h + self.expert_intermediate_size) * 3 * self.num_shared_experts
        return (per_layer * self.num_layers + mlp * (self.num_layers - self.moe_layers)
                + shared * self.moe_layers)

    @property
    def lora_targets(self) -> int:
        """Projections that carry a LoRA pool (for the per-slot scales)."""
        mlp = len(MLP_TARGETS)
        return (len(ATTENTION_TARGETS) * self.num_layers + mlp * (self.num_layers - self.moe_layers)
                + mlp * self.num_shared_experts * self.moe_layers)

    def kv_elements_per_token(self) -> int:
        return self.num_layers * 2 * self.kv_dim

    @classmethod
    def from_hf(cls, hf: dict, name: str = "model") -> Architecture:
        if "kv_lora_rank" in hf:
            raise ArchitectureError(
                f"{name}: multi-head latent attention (kv_lora_rank) is not modelled; accepted: "
                "grouped-query attention (num_attention_heads, num_key_value_heads)")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise ArchitectureError(f"{name}: config.json lacks {', '.join(missing)}; expected "
                                    "a Hugging Face causal LM config")
        heads = hf["num_attention_heads"]
        experts = hf.get("num_local_experts") or hf.get("n_routed_experts") \
            or hf.get("num_experts") or 0
        moe = {}
        if experts:
            # Mixtral sizes its experts by intermediate_size; DeepSeek and Qwen-MoE say so
            moe = dict(num_experts=experts, experts_per_token=hf.get("num_experts_per_tok", 2),
                       expert_intermediate_size=hf.get("moe_intermediate_size")
                       or hf["intermediate_size"],
                       num_shared_experts=hf.get("n_shared_experts") or 0,
                       first_dense_layers=hf.get("first_k_dense_replace") or 0)
        return cls(
            name=name, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf.get("intermediate_size", 4 * hf["hidden_size"]),
            num_layers=hf["num_hidden_layers"], num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=hf.get("model_type") == "qwen2" or bool(hf.get("attention_bias", False)),
            **moe)


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_architecture(model: str) -> Architecture:
    """`model`: a preset name (`cotune plan --help` lists them), a config.json, or a
    checkpoint directory holding one."""
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        preset = PRESETS_DIR / f"{model}.json"
        if not preset.is_file():
            raise ArchitectureError(
                f"{model!r} is neither a config.json, a checkpoint directory nor a preset; "
                f"presets: {', '.join(presets())}")
        path = preset
    try:
        hf = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArchitectureError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(hf, dict):
        raise ArchitectureError(f"{path}: expected a JSON object, as config.json holds")
    return Architecture.from_hf(hf, name=path.stem if path.name != "config.json"
                                else path.parent.name)
