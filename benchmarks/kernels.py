"""`cotune bench kernels`: the segmented LoRA kernels against their roofline (issue 4).

For each op (shrink, expand, and the weight gradient in its two uses: dA and dB) and each
case (a layer of a 7B- or 70B-class model, a rank, a decode or prefill batch, a number of
distinct adapters), the Triton kernel and the batched torch implementation are timed side by
side and set against the roofline time of the case on this device (see roofline.py). Then
whole-model decode throughput with a thousand adapters against the base alone
(model_decode.py). Targets from issue 4: every kernel >= 70% of its roofline; decode with
1,000 adapters >= 0.9x the base model alone.

Cases mirror the engine: sequence i uses adapter i % adapters (round robin), sequences are
sorted by adapter (as Engine.step sorts chunks by slot) and neighbours on one adapter share
a segment; adapter k sits in slot k of a pool of exactly the distinct adapters; pools have
VirtualizedLinear's transposed layout; segment tensors are CPU int64, as the model passes
them. A case with more adapters than sequences would repeat a smaller one and is left out.

Needs a CUDA device. `--smoke` runs every code path on the CPU with tiny shapes in float32,
the Triton kernels in Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported); its results measure nothing and are never written to benchmarks/results/.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from cotune.bench import model_decode
from cotune.bench.roofline import OPS, Clock, Peaks, measure_peaks, op_cost
from cotune.model.lora_routing import LoraRouting

RESULTS_DIR = Path(__file__).parent / "results"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
KERNEL_TARGET, DECODE_TARGET = 0.70, 0.90


class CannotRun(ValueError):
    """This machine or these options cannot run the benchmark; the message says what would."""


@dataclass(frozen=True)
class Mode:
    """Shapes and repeat counts: the real sweep on a GPU, or tiny ones for --smoke."""

    models: dict[str, tuple[int, int]]  # name -> (hidden, intermediate)
    ranks: tuple[int, ...]
    batches: tuple[tuple[str, int, int], ...]  # (phase, sequences, tokens per sequence)
    adapters: tuple[int, ...]
    warmup: int
    repeats: int
    copy_bytes: int
    matmul_size: int


GPU = Mode(models={"7B": (4096, 11008), "70B": (8192, 28672)}, ranks=(16, 64),
           batches=(("decode", 64, 1), ("decode", 1024, 1), ("prefill", 8, 512),
                    ("prefill", 64, 128)),
           adapters=(1, 64, 1000), warmup=3, repeats=20, copy_bytes=1 << 30, matmul_size=8192)
SMOKE = Mode(models={"tiny": (32, 48)}, ranks=(8,), batches=(("decode", 4, 1), ("prefill", 2, 8)),
             adapters=(1, 3), warmup=1, repeats=2, copy_bytes=8 << 20, matmul_size=256)


@dataclass(frozen=True)
class Case:
    model: str
    layer: str  # q_proj: hidden -> hidden; gate_proj: hidden -> intermediate; down_proj back
    d_in: int
    d_out: int
    rank: int
    phase: str
    sequences: int
    tokens: int  # per sequence
    adapters: int  # distinct adapters in the batch

    @property
    def rows(self) -> int:
        return self.sequences * self.tokens


def cases(mode: Mode) -> list[Case]:
    out = []
    for model, (hidden, inter) in mode.models.items():
        layers = {"q_proj": (hidden, hidden), "gate_proj": (hidden, inter),
                  "down_proj": (inter, hidden)}
        for layer, (d_in, d_out) in layers.items():
            for rank in mode.ranks:
                for phase, sequences, tokens in mode.batches:
                    for adapters in sorted({min(n, sequences) for n in mode.adapters}):
                        out.append(Case(model, layer, d_in, d_out, rank, phase, sequences,
                                        tokens, adapters))
    return out


class Inputs:
    """The tensors of one case, as the model lays them out."""

    def __init__(self, case: Case, dtype: torch.dtype, device: torch.device):
        like = dict(dtype=dtype, device=device)
        n, r, t = case.adapters, case.rank, case.rows
        slots = sorted(i % n for i in range(case.sequences))  # sorted by adapter, as the engine
        routing = LoraRouting.from_sequences([case.tokens] * case.sequences, slots)
        self.batch = routing.batch(routing.slots)  # the segments, as the model passes them
        self.num_slots = n
        self.a_pool = (torch.randn(n, case.d_in, r, **like) / case.d_in ** 0.5).transpose(1, 2)
        self.b_pool = (torch.randn(n, r, case.d_out, **like) * 0.01).transpose(1, 2)
        self.scales = torch.full((n,), 2.0, device=device)
        self.x = torch.randn(t, case.d_in, **like)  # (T, d_in)
        self.h = torch.randn(t, r, **like)  # (T, R): shrink's output, or dh in backward
        self.y = torch.randn(t, case.d_out, **like)  # (T, d_out): expand adds into it
        self.dy = torch.randn(t, case.d_out, **like)  # (T, d_out): the delta's gradient

    def calls(self, ops) -> dict:
        """Each op of `ops` (a cotune.kernels module) on these inputs, with the arguments the
        model passes (segmented_lora.py, virtualized_linear.py)."""
        batch, tables = self.batch, {}
        return {
            "shrink": lambda: ops.sgmv_shrink(self.x, self.a_pool, batch, tables=tables),
            "expand": lambda: ops.sgmv_expand(self.y, self.h, self.b_pool, batch, self.scales,
                                              tables=tables),
            "weight_grad_a": lambda: ops.sgmv_weight_grad(self.h, self.x, batch,
                                                          self.num_slots),
            "weight_grad_b": lambda: ops.sgmv_weight_grad(self.dy, self.h, batch,
                                                          self.num_slots, self.scales),
        }


def measure_case(case: Case, clock: Clock, peaks: Peaks, dtype: torch.dtype,
                 implementations: dict) -> list[dict]:
    """One row per op: each implementation's median time and its share of the roofline."""
    inputs = Inputs(case, dtype, clock.device)
    calls = {name: inputs.calls(ops) for name, ops in implementations.items()}
    rows = []
    for op in OPS:
        nbytes, flops = op_cost(op, case.rows, case.d_in, case.d_out, case.rank, case.adapters,
                                dtype.itemsize)
        roofline = peaks.time(nbytes, flops)
        seconds = {name: clock.median(calls[name][op]) for name in implementations}
        rows.append(dict(asdict(case), op=op, rows=case.rows, bytes=nbytes, flops=flops,
                         roofline_us=roofline * 1e6,
                         **{f"{name}_us": s * 1e6 for name, s in seconds.items()},
                         **{f"{name}_roofline_fraction": roofline / s
                            for name, s in seconds.items()},
                         torch_over_triton=seconds["torch"] / seconds["triton"]))
    return rows


def check_can_run(smoke: bool, out_dir: Path | None) -> None:
    """Refuses before anything heavy is imported or allocated."""
    if smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise CannotRun(
                "--smoke runs the Triton kernels in Triton's interpreter on the CPU: set "
                "TRITON_INTERPRET=1 in the environment before starting (Triton reads it when it "
                "is imported)")
        if out_dir is not None and out_dir.resolve() == RESULTS_DIR.resolve():
            raise CannotRun(f"--smoke results measure nothing and never go to {RESULTS_DIR}; "
                            "give another --out or none (a temporary directory)")
        return
    if not torch.cuda.is_available():
        raise CannotRun(
            f"needs a CUDA device; torch {torch.__version__} sees none here. Run it on a GPU "
            "(H100/H200), or pass --smoke to run every code path on the CPU with tiny shapes")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise CannotRun("TRITON_INTERPRET=1 would run the Triton kernels in the interpreter, "
                        "which measures nothing; unset it, or pass --smoke")


def implementations() -> dict:
    """The implementations compared: Triton and batched torch."""
    try:
        from cotune.kernels import sgmv_torch, sgmv_triton
    except ImportError as error:
        raise CannotRun(f"needs Triton ({error}); install cotune[triton]") from error
    return {"triton": sgmv_triton, "torch": sgmv_torch}


def run(dtype_name: str = "bfloat16", smoke: bool = False, out_dir: Path | None = None,
        slots: int = 1000, sequences: int = 1000, layers: int = 8,
        ranks: tuple[int, ...] = GPU.ranks) -> Path:
    """Runs the sweep and the decode comparison; writes kernels-<device>.{json,md} to
    `out_dir` (default: benchmarks/results, or a temporary directory for --smoke) and
    returns their path without the suffix. `ranks` applies to the GPU sweep only."""
    check_can_run(smoke, out_dir)
    decode_setup = model_decode.setup(smoke, slots, sequences, layers)
    if not ranks or min(ranks) < 1:
        raise CannotRun(f"--ranks {ranks} must name one or more ranks >= 1, such as 16,64")
    mode = SMOKE if smoke else replace(GPU, ranks=tuple(ranks))
    dtype = torch.float32 if smoke else DTYPES[dtype_name]  # the interpreter's tl.dot: float32
    device = torch.device("cpu" if smoke else "cuda")
    impls = implementations()
    clock = Clock(device, mode.warmup, mode.repeats)
    peaks = measure_peaks(clock, dtype, mode.copy_bytes, mode.matmul_size)
    kernel_rows, todo = [], cases(mode)
    for i, case in enumerate(todo):
        # a GPU run takes minutes: Triton autotunes each new shape in the warm-up calls
        print(f"kernels: case {i + 1}/{len(todo)}: {case}", file=sys.stderr, flush=True)
        kernel_rows += measure_case(case, clock, peaks, dtype, impls)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the largest pools are gigabytes; the next case needs room
    decode = model_decode.run(decode_setup, peaks, dtype, device)
    result = header(smoke, device, dtype, peaks, clock) | {
        "kernels": kernel_rows, "decode": decode,
        "targets": {"kernel_roofline_fraction": KERNEL_TARGET, "decode_ratio": DECODE_TARGET}}
    if out_dir is None:
        out_dir = Path(tempfile.mkdtemp(prefix="cotune-kernels-smoke-")) if smoke else Path(
            "benchmarks/results")
    return write(result, out_dir)


def header(smoke: bool, device: torch.device, dtype: torch.dtype, peaks: Peaks,
           clock: Clock) -> dict:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"benchmark": "kernels", "smoke": smoke, "device": name, "torch": torch.__version__,
            "triton": triton.__version__, "dtype": str(dtype).removeprefix("torch."),
            "peaks": peaks.as_dict(), "clock": clock.name, "warmup": clock.warmup,
            "repeats": clock.repeats}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write(result: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"kernels-{slug(result['device'])}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    return stem


def markdown(result: dict) -> str:
    peaks = result["peaks"]
    lines = [f"# LoRA kernels against their roofline: {result['device']}", "",
             f"torch {result['torch']}, triton {result['triton']}, {result['dtype']}; "
             f"{result['clock']}, median of {result['repeats']} after {result['warmup']} "
             "warm-up calls." + (" SMOKE RUN (CPU, Triton interpreter): measures nothing."
                                 if result["smoke"] else ""), "",
             f"Measured peaks: memory {peaks['bytes_per_s'] / 1e9:.0f} GB/s (a "
             f"{peaks['copy_bytes'] >> 20} MiB copy, read + written), matmul "
             f"{peaks['flops_per_s'] / 1e12:.3g} TFLOP/s ({peaks['matmul_size']}^3).", "",
             *kernel_summary(result), "", *decode_table(result["decode"]), "",
             *kernel_table(result["kernels"]), ""]
    return "\n".join(lines)


def kernel_summary(result: dict) -> list[str]:
    rows, target = result["kernels"], result["targets"]["kernel_roofline_fraction"]
    met = sum(r["triton_roofline_fraction"] >= target for r in rows)
    worst = min(rows, key=lambda r: r["triton_roofline_fraction"])
    return [f"Triton kernels at >= {target:.0%} of roofline (the target): {met} of {len(rows)} "
            f"cases. Worst: {worst['op']} {worst['model']} {worst['layer']} rank {worst['rank']}, "
            f"{worst['sequences']}x{worst['tokens']} rows, {worst['adapters']} adapters, at "
            f"{worst['triton_roofline_fraction']:.0%}."]


def kernel_table(rows: list[dict]) -> list[str]:
    lines = ["| op | model | layer | rank | batch | adapters | triton us | torch us | "
             "torch / triton | roofline us | triton % of roofline | torch % of roofline |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['model']} | {r['layer']} ({r['d_in']}->{r['d_out']}) | "
            f"{r['rank']} | {r['phase']} {r['sequences']}x{r['tokens']} | {r['adapters']} | "
            f"{r['triton_us']:.1f} | {r['torch_us']:.1f} | {r['torch_over_triton']:.2f}x | "
            f"{r['roofline_us']:.1f} | {r['triton_roofline_fraction']:.0%} | "
            f"{r['torch_roofline_fraction']:.0%} |")
    return lines


def decode_table(decode: dict) -> list[str]:
    lines = [f"Whole-model decode: {decode['model']}, {decode['sequences']} sequences of "
             f"{decode['context']} cached tokens, each on adapter i % {decode['slots']} "
             f"({decode['distinct_adapters']} distinct, rank {decode['rank']}, all seven "
             f"projections); {decode['what_is_timed']}", "",
             "| system | step ms | tokens/s | / base | target |", "|---|---|---|---|---|"]
    for name, tokens_per_s in decode["tokens_per_s"].items():
        ratio = decode["ratios"].get(name)
        verdict = "" if ratio is None else ("met" if ratio >= DECODE_TARGET else "missed")
        lines.append(f"| {name} | {decode['step_ms'][name]:.2f} | {tokens_per_s:.0f} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} | "
                     f"{'' if ratio is None else f'>= {DECODE_TARGET}x: {verdict}'} |")
    lines += ["", f"LoRA ops' roofline per step: {decode['lora_roofline_ms']:.2f} ms; the best "
              f"ratio any LoRA implementation could reach beside this base step: "
              f"{decode['ratio_bound']:.2f}x."]
    return lines
