"""`cotune plan`: the bytes per rank of a sharded deployment (cotune.distributed.plan)."""

from __future__ import annotations

import json
from dataclasses import asdict


def add_plan_command(commands) -> None:
    from cotune.distributed.architecture import presets
    from cotune.distributed.plan import Workload

    plan = commands.add_parser(
        "plan", help="print a placement of a base over GPUs: bytes per rank, largest batch "
                     "and adapter count that fit")
    plan.add_argument("--model", required=True,
                      help=f"a config.json, a checkpoint directory, or a preset: "
                           f"{', '.join(presets())}")
    plan.add_argument("--gpus", type=_positive(int), required=True, help="GPUs per node")
    plan.add_argument("--gpu-mem", type=_positive(float), required=True,
                      help="memory of each GPU, GiB")
    plan.add_argument("--nodes", type=_positive(int), default=1,
                      help="nodes of --gpus GPUs each")
    plan.add_argument("--dtype", default=Workload.dtype, help="bfloat16, float16 or float32")
    plan.add_argument("--offload", default=Workload.offload,
                      help="ZeRO offload of the base: none, cpu or nvme")
    for flag, field, text in (("--max-rank", "max_rank", "LoRA rank of the slot pools"),
                              ("--slots", "slots", "adapter slots per GPU"),
                              ("--context", "context", "tokens per sequence"),
                              ("--batch", "batch", "sequences per GPU"),
                              ("--jobs", "jobs", "fine-tuning jobs per GPU"),
                              ("--train-rank", "train_rank", "LoRA rank of those jobs")):
        plan.add_argument(flag, type=int, default=getattr(Workload, field), help=text)
    plan.add_argument("--link-gbs", type=_positive(float),
                      help="GB/s a rank receives while gathering (default: 450 within one "
                           "node, 50 across nodes)")
    plan.add_argument("--json", action="store_true", help="the plan as JSON")
    plan.set_defaults(run=_plan)


def _plan(args) -> int:
    from cotune.distributed.architecture import load_architecture
    from cotune.distributed.plan import Cluster, GiB, Workload, make_plan, render

    cluster = Cluster(args.gpus, args.nodes, int(args.gpu_mem * GiB),
                      None if args.link_gbs is None else args.link_gbs * 1e9)
    workload = Workload(dtype=args.dtype, offload=args.offload, max_rank=args.max_rank,
                        slots=args.slots, context=args.context, batch=args.batch,
                        jobs=args.jobs, train_rank=args.train_rank)
    plan = make_plan(load_architecture(args.model), cluster, workload)
    if args.json:
        print(json.dumps({**asdict(plan), "total_params": plan.arch.total_params,
                          "device_total": plan.device_total, "fits": plan.fits,
                          "gather_seconds_per_step": plan.gather_seconds_per_step,
                          "offload_seconds_per_step": plan.offload_seconds_per_step}, indent=2))
    else:
        print(render(plan))
    return 0


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise ValueError
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse
