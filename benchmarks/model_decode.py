"""Whole-model decode with a thousand adapters against the base alone (issue 4's target:
>= 0.9x the base's tokens/s), part of `cotune bench kernels`.

The base: Llama-2-7B's shapes (hidden 4096, intermediate 11008, 32 heads, vocab 32000) with
random weights, built on the device in the layout load_model gives (loading.arranged), but
with `layers` of its 32 decoder layers, so that the adapters' pools fit
beside it: rank 16 on all seven projections is 2.5 MB per adapter and layer in bfloat16,
20 GB for 1,000 adapters over 8 layers, 80 GB over 32. Each layer costs what it would in the
whole model; the embedding and lm_head (base-only work) weigh more beside 8 layers than
beside 32 (lm_head is 8% of the projections' FLOPs beside 8 layers, 2% beside 32), which
flatters the ratio by that much at most.

A decode step: `sequences` sequences of CONTEXT cached tokens, one new token each, sequence i
on slot i % slots, sorted by slot as Engine.step sorts its chunks. The adapters are resident
through ResidentAdapters, as the engine makes them. Timed: the model's forward over a
ForwardBatch (paged KV cache view and LoraRouting, as step_batch builds them, built once
outside the clock) and the logits of every row: a decode step less scheduling and sampling.
Systems, interleaved over rounds: the base alone (no LoRA routing), and the same batch with
adapters through the Triton kernels and through batched torch (COTUNE_KERNELS).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

from cotune.adapters.residency import ResidentAdapters
from cotune.adapters.synthetic import random_adapter
from cotune.bench.roofline import Peaks, op_cost
from cotune.engine.kv_cache import PagedBatch, PagedKVCache
from cotune.kernels.choice import backend
from cotune.model.config import ModelConfig
from cotune.model.llama import LORA_TARGETS, CausalLM, ForwardBatch
from cotune.model.loading import arranged
from cotune.model.lora_routing import LoraRouting

RANK, BLOCK_SIZE = 16, 16
LLAMA_7B = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128)
TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8)


@dataclass(frozen=True)
class Setup:
    config: ModelConfig
    name: str
    slots: int
    sequences: int
    context: int  # cached tokens per sequence
    warmup: int  # untimed steps before each timing
    steps: int  # steps per timing
    rounds: int  # timings per system, interleaved


def setup(smoke: bool, slots: int, sequences: int, layers: int) -> Setup:
    """The decode setup, checked before anything runs."""
    if smoke:  # --slots, --sequences and --layers do not apply: tiny and fixed
        return Setup(TINY, "tiny random Llama (smoke)", slots=3, sequences=4, context=8,
                     warmup=1, steps=1, rounds=1)
    if min(slots, sequences, layers) < 1:
        raise ValueError(f"--slots {slots}, --sequences {sequences} and --layers {layers} must "
                         "each be at least 1")
    return Setup(replace(LLAMA_7B, num_layers=layers),
                 f"7B-class (Llama-2-7B shapes), {layers} of its {LLAMA_7B.num_layers} "
                 "layers, random weights", slots, sequences, context=128, warmup=2, steps=5,
                 rounds=3)


def random_model(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """The base with random weights, frozen, stored as load_model stores them (arranged):
    built on `meta`, then weights assigned."""
    with torch.device("meta"):
        model = CausalLM(config)
    state = {name: _random_weight(t.shape, dtype, device)
             for name, t in model.state_dict().items()}
    ops = backend(device)  # as load_model decides it
    model.load_state_dict(arranged(state, config, ops.FUSED_SLICES), assign=True, strict=True)
    for p in model.parameters():
        p.requires_grad_(False)
    model.use_kernels(ops)
    model.decide_fusion()
    return model.eval()


def _random_weight(shape: torch.Size, dtype, device) -> torch.Tensor:
    if len(shape) == 1:  # a norm's weight
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.randn(shape, dtype=dtype, device=device) / shape[1] ** 0.5


def load_adapters(model: CausalLM, slots: int, device: torch.device) -> None:
    """`slots` random rank-16 adapters on all seven projections, resident in slots 0..n-1."""
    resident = ResidentAdapters(model, slots, RANK)
    for k in range(slots):
        resident.place(f"bench-{k}", random_adapter(resident.base_modules, RANK,
                                                    list(LORA_TARGETS), seed=k, b_std=0.01,
                                                    device=device))


def decode_batches(model: CausalLM, s: Setup, dtype, device) -> tuple[ForwardBatch, ForwardBatch]:
    """(base batch, batch with adapters): one new token for each sequence, sorted by slot."""
    blocks_each = -(-(s.context + 1) // BLOCK_SIZE)
    cache = PagedKVCache(model.config, s.sequences * blocks_each, BLOCK_SIZE, dtype, device)
    order = sorted(range(s.sequences), key=lambda i: i % s.slots)
    for i in order:
        cache.reserve(i, s.context + 1)
        cache.commit(i, s.context)  # the cached keys are zeros: attention costs the same
    seq_lens = [1] * s.sequences
    paged = PagedBatch(cache, order, seq_lens)
    tokens = torch.randint(model.config.vocab_size, (s.sequences,))  # (B,)
    lora = LoraRouting.from_sequences(seq_lens, [i % s.slots for i in order])
    return (ForwardBatch(tokens, seq_lens, kv=paged),
            ForwardBatch(tokens, seq_lens, kv=paged, lora=lora))


@torch.no_grad()
def step_seconds(model: CausalLM, batch: ForwardBatch, s: Setup, device) -> float:
    """Seconds per decode step (forward and logits), over s.steps steps after s.warmup."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(s.warmup):
        model.logits(model(batch))
    sync()
    started = time.perf_counter()
    for _ in range(s.steps):
        model.logits(model(batch))
    sync()
    return (time.perf_counter() - started) / s.steps


def lora_roofline(model: CausalLM, peaks: Peaks, rows: int, adapters: int, itemsize: int) -> float:
    """Seconds the LoRA ops of one step take at least: a shrink and an expand on every
    projection, each at its roofline."""
    return sum(peaks.time(*op_cost(op, rows, m.in_features, m.out_features, RANK, adapters,
                                   itemsize))
               for m in model.lora_modules().values() for op in ("shrink", "expand"))


def run(s: Setup, peaks: Peaks, dtype: torch.dtype, device: torch.device) -> dict:
    try:
        model = random_model(s.config, dtype, device)
        load_adapters(model, s.slots, device)
        base, with_lora = decode_batches(model, s, dtype, device)
    except torch.cuda.OutOfMemoryError as error:
        raise ValueError(f"the decode model does not fit: {s.name}, {s.slots} adapter slots, "
                         f"{s.sequences} sequences of {s.context} tokens; lower --slots, "
                         "--sequences or --layers") from error
    print(f"kernels: decode, {s.name}, {s.slots} adapters resident", file=sys.stderr,
          flush=True)
    systems = {"base": (base, "auto"), "lora-triton": (with_lora, "triton"),
               "lora-torch": (with_lora, "torch")}
    runs = {name: [] for name in systems}
    for _ in range(s.rounds):  # interleaved: drift on the machine hits every system alike
        for name, (batch, choice) in systems.items():
            model.use_kernels(backend(device, choice))
            runs[name].append(step_seconds(model, batch, s, device))
    step = {name: statistics.median(values) for name, values in runs.items()}
    distinct = min(s.slots, s.sequences)
    roofline = lora_roofline(model, peaks, s.sequences, distinct, dtype.itemsize)
    return {
        "model": s.name, "config": asdict(s.config), "slots": s.slots,
        "sequences": s.sequences, "distinct_adapters": distinct, "rank": RANK,
        "context": s.context, "steps": s.steps, "rounds": s.rounds,
        "what_is_timed": "forward and logits of one decode step, median of rounds; batch "
                         "building, scheduling and sampling are not timed",
        "step_ms": {name: seconds * 1e3 for name, seconds in step.items()},
        "tokens_per_s": {name: s.sequences / seconds for name, seconds in step.items()},
        "ratios": {name: step["base"] / seconds for name, seconds in step.items()
                   if name != "base"},
        "lora_roofline_ms": roofline * 1e3,
        "ratio_bound": step["base"] / (step["base"] + roofline),
    }
