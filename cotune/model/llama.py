"""A compact Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over a flat token batch.

Module and parameter names mirror Hugging Face's LlamaForCausalLM, so checkpoints load by
name and PEFT adapter keys map one to one onto VirtualizedLinear modules.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn
from torch.nn import functional as F

from cotune.model.attention import attend_one
from cotune.model.config import ModelConfig
from cotune.model.kv import CachedAttention
from cotune.model.layer_checkpoint import CheckpointedLayer
from cotune.model.lora_routing import LoraRouting
from cotune.model.projection_group import joint_weight, project_groups
from cotune.model.rope import apply_rotary, inverse_frequencies, rotary_cos_sin
from cotune.model.row_groups import RowGroup, apart
from cotune.model.targets import LORA_TARGETS
from cotune.model.training_rows import TrainingRows
from cotune.model.virtualized_linear import VirtualizedLinear

# Projections of a layer that read the same input, computed together (projection_group).
PROJECTION_GROUPS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


@dataclass
class ForwardBatch:
    """A flat batch: the new tokens of several sequences, one after another; the served
    sequences first, then the pieces of training examples (if any).

    token_ids: (T,) with T = sum(seq_lens)
    kv:        the KV cache's view of the served sequences in this pass (it attends and
               caches their new keys and values); None when each attends only within its
               given tokens
    lora:      the adapter of every row; None for the base model alone
    training:  the rows being trained; their pass keeps autograd state for them alone
    """

    token_ids: torch.Tensor
    seq_lens: list[int]
    kv: CachedAttention | None = None
    lora: LoraRouting | None = None
    training: TrainingRows | None = None

    @property
    def served_sequences(self) -> int:
        return len(self.seq_lens) - (0 if self.training is None else len(self.training.pieces))

    @property
    def first_training_row(self) -> int:
        return sum(self.seq_lens[:self.served_sequences])

    def past_lengths(self) -> list[int]:
        served = self.served_sequences
        past = [0] * served if self.kv is None else list(self.kv.past_lengths)
        return past + ([] if self.training is None else self.training.past_lengths)

    def positions(self) -> torch.Tensor:
        """(T,) absolute position of every row."""
        return torch.cat([torch.arange(p, p + n) for p, n in
                          zip(self.past_lengths(), self.seq_lens)])

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  window: int | None) -> torch.Tensor:
        """q (T, H, D), k, v (T, Hkv, D) of this pass -> (T, H, D), causal within each
        sequence (over its cached past, for served sequences and later training pieces)."""
        first = self.first_training_row
        out = []
        if first:
            out.append(self._served_attention(layer, q[:first], k[:first], v[:first], window))
        if self.training is not None:
            out.append(self.training.attention(layer, q[first:], k[first:], v[first:], window))
        return out[0] if len(out) == 1 else torch.cat(out)

    def _served_attention(self, layer, q, k, v, window) -> torch.Tensor:
        if self.kv is not None:  # the cache attends, and writes this pass's keys and values
            return self.kv.attention(layer, q, k, v, window)
        lens = self.seq_lens[:self.served_sequences]
        return torch.cat([  # each sequence attends only to itself
            attend_one(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1),
                       window).transpose(0, 1)
            for qi, ki, vi in zip(q.split(lens), k.split(lens), v.split(lens))])

    def served_only(self) -> ForwardBatch:
        """The served rows alone (the first ones), with the cache's view."""
        first = self.first_training_row
        return ForwardBatch(self.token_ids[:first], self.seq_lens[:self.served_sequences],
                            kv=self.kv, lora=None if self.lora is None
                            else self.lora.first_rows(first))

    def training_only(self, rows: TrainingRows) -> ForwardBatch:
        """The training rows alone, as `rows` (this pass's, or a recomputation's)."""
        return ForwardBatch(self.token_ids[self.first_training_row:], rows.lengths,
                            lora=rows.routing(), training=rows)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str):
        super().__init__()
        c = config
        self.config = c
        q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.q_proj = VirtualizedLinear(c.hidden_size, q_out, c.qkv_bias, f"{prefix}.q_proj")
        self.k_proj = VirtualizedLinear(c.hidden_size, kv_out, c.qkv_bias, f"{prefix}.k_proj")
        self.v_proj = VirtualizedLinear(c.hidden_size, kv_out, c.qkv_bias, f"{prefix}.v_proj")
        self.o_proj = VirtualizedLinear(q_out, c.hidden_size, c.o_bias, f"{prefix}.o_proj")
        self.qkv_joint = self.o_joint = None  # decide_fusion

    def decide_fusion(self) -> None:
        self.qkv_joint = joint_weight([self.q_proj, self.k_proj, self.v_proj])
        self.o_joint = joint_weight([self.o_proj])

    def forward(self, hs: list[torch.Tensor], groups: list[RowGroup], layer: int
                ) -> list[torch.Tensor]:
        qkv = project_groups([self.q_proj, self.k_proj, self.v_proj], hs, groups,
                             self.qkv_joint)
        outs = apart(groups, lambda g, q_k_v: self._attend(g, *q_k_v, layer), groups, qkv)
        return [o for (o,) in project_groups([self.o_proj], outs, groups, self.o_joint)]

    def _attend(self, group: RowGroup, q, k, v, layer: int) -> torch.Tensor:
        c, T = self.config, q.shape[0]
        q = q.view(T, c.num_heads, c.head_dim)
        k, v = k.view(T, c.num_kv_heads, c.head_dim), v.view(T, c.num_kv_heads, c.head_dim)
        q, k = apply_rotary(q, group.cos, group.sin), apply_rotary(k, group.cos, group.sin)
        out = group.batch.attention(layer, q, k, v, c.sliding_window)
        return out.reshape(T, c.num_heads * c.head_dim)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str):
        super().__init__()
        c = config
        self.gate_proj = VirtualizedLinear(c.hidden_size, c.intermediate_size, c.mlp_bias,
                                           f"{prefix}.gate_proj")
        self.up_proj = VirtualizedLinear(c.hidden_size, c.intermediate_size, c.mlp_bias,
                                         f"{prefix}.up_proj")
        self.down_proj = VirtualizedLinear(c.intermediate_size, c.hidden_size, c.mlp_bias,
                                           f"{prefix}.down_proj")
        self.gate_up_joint = self.down_joint = None  # decide_fusion

    def decide_fusion(self) -> None:
        self.gate_up_joint = joint_weight([self.gate_proj, self.up_proj])
        self.down_joint = joint_weight([self.down_proj])

    def forward(self, hs: list[torch.Tensor], groups: list[RowGroup]) -> list[torch.Tensor]:
        gate_up = project_groups([self.gate_proj, self.up_proj], hs, groups,
                                 self.gate_up_joint)
        acts = apart(groups, lambda g_u: F.silu(g_u[0]) * g_u[1], gate_up)
        return [y for (y,) in project_groups([self.down_proj], acts, groups, self.down_joint)]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        prefix = f"model.layers.{index}"
        self.index = index
        self.self_attn = Attention(config, f"{prefix}.self_attn")
        self.mlp = MLP(config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, batch: ForwardBatch) -> torch.Tensor:
        """Every row of `batch` alike."""
        return self.forward_groups([x], [RowGroup(batch, cos, sin, torch.is_grad_enabled())])[0]

    def forward_groups(self, xs: list[torch.Tensor], groups: list[RowGroup]
                       ) -> list[torch.Tensor]:
        """Each group's rows (xs[g]) through the layer apart, but for the projections' GEMMs
        (see row_groups)."""
        h = apart(groups, self.input_layernorm, xs)
        xs = apart(groups, torch.add, xs, self.self_attn(h, groups, self.index))
        h = apart(groups, self.post_attention_layernorm, xs)
        return apart(groups, torch.add, xs, self.mlp(h, groups))


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """The shared base. forward() gives final hidden states; logits() projects chosen rows."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.lm_head.weight.requires_grad_(False)
        self._inv_freq: torch.Tensor | None = None

    def use_kernels(self, ops: ModuleType) -> None:
        """Every projection runs its segmented LoRA ops with `ops` (kernels.choice.backend)."""
        for module in self.modules():
            if isinstance(module, VirtualizedLinear):
                module.ops = ops

    def decide_fusion(self) -> None:
        """Each layer's projections that read one input run as one GEMM where their weights
        lie side by side (projection_group): decided once, after the weights are loaded."""
        for layer in self.model.layers:
            layer.self_attn.decide_fusion()
            layer.mlp.decide_fusion()

    def lora_modules(self, targets=LORA_TARGETS) -> dict[str, VirtualizedLinear]:
        """The projections that can carry LoRA, by full module path, restricted to `targets`."""
        return {name: m for name, m in self.named_modules()
                if isinstance(m, VirtualizedLinear) and name.rsplit(".", 1)[-1] in targets}

    # A sharded base releases each layer's weights after its forward: backward then
    # recomputes the layer on the training rows, with the weights gathered again.
    recomputes_training = False

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """(T, hidden_size) final hidden states of every row. With training rows (and grad
        enabled) only those rows are differentiable, and only their activations are kept:
        backward from their loss goes through `batch.training.backward`."""
        x = self.model.embed_tokens(batch.token_ids.to(self.device))
        cos, sin = rotary_cos_sin(self._frequencies(), batch.positions().to(self.device), x.dtype)
        if batch.training is None or not torch.is_grad_enabled():
            for index, layer in enumerate(self.model.layers):
                with self.layer_weights(index):
                    x = layer(x, cos, sin, batch)
            return self.model.norm(x)
        first = batch.first_training_row
        if self.recomputes_training:
            params = batch.training.parameters()
            for index in range(len(self.model.layers)):
                x = CheckpointedLayer.apply(x, (self, index, batch, cos, sin), *params)
            served, trained = x[:first].detach(), x[first:]
        else:  # the served rows without autograd, the training rows apart (row_groups)
            training = RowGroup(batch.training_only(batch.training), cos[first:], sin[first:],
                                grad=True)
            serving = RowGroup(batch.served_only(), cos[:first], sin[:first], grad=False)
            groups = [serving, training] if first else [training]
            xs = [x[:first], x[first:]] if first else [x]
            started = time.perf_counter()
            for layer in self.model.layers:
                xs = layer.forward_groups(xs, groups)
            # timed apart for the step-time model (all of it when nothing is served)
            batch.training.forward_seconds = training.seconds if first else (
                time.perf_counter() - started)
            served, trained = (xs[0], xs[1]) if first else (x[:0], xs[0])
        # the final norm of the served rows outside autograd: it would keep their input
        with torch.no_grad():
            served = self.model.norm(served)
        return torch.cat([served, self.model.norm(trained)])

    def layer_weights(self, index: int):
        """A context in which decoder layer `index` holds its weights (always, here; a
        sharded base gathers them)."""
        return nullcontext()

    def before_layer_backward(self, index: int) -> None:
        """Called as backward reaches decoder layer `index` (a sharded base starts a round
        of its lockstep there)."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(rows, vocab_size) float32 logits of the given hidden rows."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Of the activations (and of every weight stored unquantized)."""
        return self.model.embed_tokens.weight.dtype

    def _frequencies(self) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != self.device:
            self._inv_freq = inverse_frequencies(self.config).to(self.device)
        return self._inv_freq
