"""`cotune plan`: where the bytes of a sharded deployment go, per rank, before anything runs.

The base is partitioned over every rank with ZeRO-3: each parameter is split into
ceil(numel / ranks) elements per rank (DeepSpeed pads each one to a multiple of the ranks).
A step of cotune's sharded engine (cotune.distributed.lockstep) holds the head (embeddings,
final norm, LM head) gathered for the whole step and one decoder layer at a time on top.
Everything else is rank-local and whole: the KV cache of the rank's own sequences, the
adapter slot pools at max rank, and the float32 LoRA weights, gradients and AdamW moments of
the rank's jobs.

    plan = make_plan(load_architecture("dense-1t"), Cluster(gpus_per_node=8, nodes=16,
                     gpu_bytes=80 * GiB), Workload())
    print(render(plan))
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

from cotune.distributed.architecture import Architecture

GiB = 1 << 30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
OFFLOADS = ("none", "cpu", "nvme")
# float32 LoRA weight, its gradient, and AdamW's two moments
TRAINABLE_BYTES_PER_PARAM = 16
# DeepSpeed's offload_param default: 5 host buffers, each at least the largest parameter
NVME_BUFFER_COUNT = 5
# bytes per second a rank reads its offloaded shard at: PCIe 4 x16 from pinned host memory,
# one NVMe drive per GPU
OFFLOAD_READ_BYTES_PER_S = {"cpu": 25e9, "nvme": 6e9}


@dataclass(frozen=True)
class Cluster:
    gpus_per_node: int
    nodes: int
    gpu_bytes: int
    # bytes per second one rank receives while gathering: NVLink within a node, the
    # network across nodes (the slowest link paces a ring all-gather)
    link_bytes_per_s: float | None = None

    @property
    def ranks(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def link(self) -> float:
        if self.link_bytes_per_s is not None:
            return self.link_bytes_per_s
        return 450e9 if self.nodes == 1 else 50e9  # H100 NVLink per direction; 400 Gb/s NIC


@dataclass(frozen=True)
class Workload:
    dtype: str = "bfloat16"
    offload: str = "none"
    max_rank: int = 16  # of the slot pools (`cotune serve --max-rank`)
    slots: int = 16  # adapters resident on the device
    context: int = 4096  # tokens a sequence may hold
    batch: int = 16  # sequences each rank runs at once
    jobs: int = 1  # fine-tuning jobs each rank trains at once
    train_rank: int = 16
    step_tokens: int = 512  # tokens a step computes (EngineConfig.max_batched_tokens)
    train_tokens: int = 128  # of which training rows, whose activations backward keeps
    reserve_bytes: int = 2 * GiB  # CUDA context, communication buffers, fragmentation
    host_cache_bytes: int = 8 * GiB  # the host tier of adapters, per rank

    def __post_init__(self):
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; accepted: "
                             f"{', '.join(DTYPE_BYTES)}")
        if self.offload not in OFFLOADS:
            raise ValueError(f"offload {self.offload!r} is not supported; accepted: "
                             f"{', '.join(OFFLOADS)}")
        may_be_zero = ("jobs", "train_tokens", "reserve_bytes", "host_cache_bytes")
        bad = [f"{k}={v}" for k, v in vars(self).items()
               if isinstance(v, int) and v < (0 if k in may_be_zero else 1)]
        if bad:
            raise ValueError(f"{', '.join(bad)}: must be at least 1 ({', '.join(may_be_zero)} "
                             "may be 0)")


@dataclass
class Plan:
    arch: Architecture
    cluster: Cluster
    workload: Workload
    # bytes on each GPU
    device: dict[str, int] = field(default_factory=dict)
    # bytes outside the GPUs, per node
    host_per_node: int = 0
    nvme_per_node: int = 0
    max_batch: int = 0  # sequences of `context` tokens that fit beside `slots` adapters
    max_slots: int = 0  # adapters that fit beside `batch` sequences
    gather_bytes_per_step: int = 0  # what each rank receives to run one step
    offload_read_bytes_per_step: int = 0  # what each rank reads of its offloaded shard
    deepspeed_partition_bytes: int | None = None  # DeepSpeed's estimator, same inputs

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def fits(self) -> bool:
        return self.device_total <= self.cluster.gpu_bytes

    @property
    def gather_seconds_per_step(self) -> float:
        return self.gather_bytes_per_step / self.cluster.link

    @property
    def offload_seconds_per_step(self) -> float:
        rate = OFFLOAD_READ_BYTES_PER_S.get(self.workload.offload)
        return 0.0 if rate is None else self.offload_read_bytes_per_step / rate


def base_shard_bytes(arch: Architecture, ranks: int, dtype_bytes: int) -> int:
    """Bytes of one rank's ZeRO-3 partition of the base (each tensor padded to the ranks)."""
    return sum(t.count * -(-t.numel // ranks) for t in arch.tensors()) * dtype_bytes


def slot_bytes(arch: Architecture, max_rank: int, dtype_bytes: int) -> int:
    """One adapter slot: A and B of every target at max_rank, plus its float32 scale."""
    return arch.lora_params(max_rank) * dtype_bytes + arch.lora_targets * 4


def kv_bytes_per_token(arch: Architecture, dtype_bytes: int) -> int:
    return arch.kv_elements_per_token() * dtype_bytes


def optimizer_bytes(arch: Architecture, train_rank: int) -> int:
    """One job's float32 LoRA weights, gradients and AdamW moments."""
    return arch.lora_params(train_rank) * TRAINABLE_BYTES_PER_PARAM


def activation_bytes(arch: Architecture, w: Workload, dtype_bytes: int) -> int:
    """An estimate, not measured: one layer's transients over a step's rows, the float32
    logits of every row, and what backward keeps of each training row in every layer (the
    inputs of the projections, attention's output, the MLP's gate and up)."""
    mlp = (arch.experts_per_token + arch.num_shared_experts) * arch.expert_intermediate_size \
        if arch.is_moe else arch.intermediate_size
    transient = w.step_tokens * (2 * arch.hidden_size + arch.q_dim + 2 * arch.kv_dim + 2 * mlp)
    logits = w.step_tokens * arch.vocab_size * 4
    kept = w.train_tokens * arch.num_layers * (
        4 * arch.hidden_size + arch.q_dim + 2 * arch.kv_dim + 3 * mlp)
    return (transient + kept) * dtype_bytes + logits


def make_plan(arch: Architecture, cluster: Cluster, w: Workload) -> Plan:
    b = DTYPE_BYTES[w.dtype]
    plan = Plan(arch, cluster, w)
    shard = base_shard_bytes(arch, cluster.ranks, b)
    per_slot, per_token = slot_bytes(arch, w.max_rank, b), kv_bytes_per_token(arch, b)
    plan.device = {
        "base shard": shard if w.offload == "none" else 0,
        "gathered head+layer": (arch.head_params + arch.largest_layer) * b,
        "KV cache": w.batch * w.context * per_token,
        "adapter slots": w.slots * per_slot,
        "optimizer state": w.jobs * optimizer_bytes(arch, w.train_rank),
        "activations (est.)": activation_bytes(arch, w, b),
        "reserve": w.reserve_bytes,
    }
    fixed = plan.device_total - plan.device["KV cache"] - plan.device["adapter slots"]
    room = cluster.gpu_bytes - fixed
    plan.max_batch = max(0, (room - w.slots * per_slot) // (w.context * per_token))
    plan.max_slots = max(0, (room - w.batch * w.context * per_token) // per_slot)
    offloaded = shard * cluster.gpus_per_node
    buffers = NVME_BUFFER_COUNT * arch.largest_tensor * b * cluster.gpus_per_node
    plan.host_per_node = w.host_cache_bytes * cluster.gpus_per_node + {
        "none": 0, "cpu": offloaded, "nvme": buffers}[w.offload]
    plan.nvme_per_node = offloaded if w.offload == "nvme" else 0
    # a ring all-gather hands each rank every partition but its own, every step
    plan.gather_bytes_per_step = (cluster.ranks - 1) * shard
    plan.offload_read_bytes_per_step = 0 if w.offload == "none" else shard
    plan.deepspeed_partition_bytes = deepspeed_partition_estimate(arch, cluster)
    return plan


def deepspeed_partition_estimate(arch: Architecture, cluster: Cluster) -> int:
    """DeepSpeed's own ZeRO-3 estimator on the same base and cluster: the 16-bit partition of
    the parameters per GPU, read as the difference its estimates make between keeping the
    parameters on the GPUs and offloading them (its other terms are of full training: the
    optimizer, which cotune's frozen base has none of)."""
    # DeepSpeed's logger writes to the stdout of its first import: send it to stderr, so
    # that `cotune plan --json` prints JSON alone
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    def gpu_bytes(offload_params: bool) -> int:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            arch.total_params, arch.largest_tensor, num_gpus_per_node=cluster.gpus_per_node,
            num_nodes=cluster.nodes, cpu_offload=True, cpu_offload_params=offload_params)
        return gpu

    return gpu_bytes(False) - gpu_bytes(True)


def render(plan: Plan) -> str:
    a, c, w = plan.arch, plan.cluster, plan.workload
    kind = (f"mixture of experts, {a.num_experts} routed + {a.num_shared_experts} shared, "
            f"top-{a.experts_per_token}" if a.is_moe else "dense")
    lines = [
        f"base        {a.name}: {_count(a.total_params)} parameters ({kind}), "
        f"{_count(a.active_params)} read per token",
        f"cluster     {c.nodes} node(s) x {c.gpus_per_node} GPU(s) = {c.ranks} ranks of "
        f"{_gib(c.gpu_bytes)}; ZeRO-3 over all ranks, {w.dtype}, offload {w.offload}",
        f"workload    per rank: {w.batch} sequences x {w.context} tokens, {w.slots} adapter "
        f"slots at rank {w.max_rank}, {w.jobs} job(s) at rank {w.train_rank}",
        "",
        "per GPU",
    ]
    lines += [f"  {name:<20}{_gib(size):>12}" for name, size in plan.device.items()]
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines += [f"  {'total':<20}{_gib(plan.device_total):>12}  of {_gib(c.gpu_bytes)}: {verdict}",
              "",
              f"largest batch  {plan.max_batch} sequences of {w.context} tokens beside "
              f"{w.slots} adapter slots",
              f"most adapters  {plan.max_slots} slots beside {w.batch} sequences",
              f"host per node  {_gib(plan.host_per_node)} (host adapter tier"
              + {"none": ")", "cpu": " + offloaded shards)", "nvme": " + NVMe buffers)"}[w.offload],
              ]
    if plan.nvme_per_node:
        lines.append(f"NVMe per node  {_gib(plan.nvme_per_node)} of offloaded shards")
    lines += [
        f"gather/step    {_gib(plan.gather_bytes_per_step)} received per rank: >= "
        f"{plan.gather_seconds_per_step:.2f} s a step at {c.link / 1e9:.0f} GB/s",
    ]
    if plan.offload_read_bytes_per_step:
        rate = OFFLOAD_READ_BYTES_PER_S[w.offload]
        lines.append(f"offload/step   {_gib(plan.offload_read_bytes_per_step)} read from "
                     f"{w.offload} per rank: >= {plan.offload_seconds_per_step:.2f} s a step at "
                     f"{rate / 1e9:.0f} GB/s")
    lines += [
        f"DeepSpeed      estimate_zero3_model_states_mem_needs: a 16-bit partition of "
        f"{_gib(plan.deepspeed_partition_bytes)} per GPU; here: "
        f"{_gib(base_shard_bytes(a, c.ranks, 2))} in 16 bits",
    ]
    return "\n".join(lines)


def _gib(n: int | float) -> str:
    return f"{n / GiB:.2f} GiB"


def _count(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
