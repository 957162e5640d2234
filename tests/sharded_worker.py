"""One rank of the sharded-base test, launched by torchrun from tests/test_sharded.py: a
Runtime over the base partitioned with ZeRO-3 serves its share of the requests while a job of
its own (rank 0) and a job spanning both ranks train, and writes what it computed to
OUT/rank-R.json. The test runs the same work in one process and compares."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

from cotune import FinetuneSpec, LoraSettings, OptimizerSettings, Request
from cotune.distributed.lockstep import BACKWARD, FORWARD
from cotune.distributed.memory import allocated_bytes
from cotune.distributed.ranks import RankInfo
from cotune.distributed.sharded_runtime import load_sharded_runtime

ENGINE = dict(max_rank=8, num_slots=4, kv_cache_tokens=2048, num_threads=1)
PROMPTS = ["The cat sat on", "Where is the capital", "Hello there, my friend",
           "Forty two is the answer to", "A country has", "Tell me about the mat"]
ADAPTERS = ["a0", "a1", None]
IDLE_S = 1.0  # how long the idle ranks are watched


def requests() -> list[Request]:
    """Every request of the test; rank r serves those with index % world_size == r."""
    return [Request(prompt=p, adapter=ADAPTERS[i % 3], max_tokens=6 + i, ignore_eos=True,
                    request_id=f"r{i}") for i, p in enumerate(PROMPTS)]


def job_specs(data: str, output_dir: Path) -> dict[str, FinetuneSpec]:
    """'local' trains on rank 0 alone; 'span' spans both ranks (4 examples a micro-batch,
    two per rank, two micro-batches a step)."""
    lora = LoraSettings(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    return {
        "local": FinetuneSpec("local", data, output_dir, lora=lora, batch_size=2, max_steps=3,
                              optimizer=OptimizerSettings(lr=1e-2), seed=1),
        "span": FinetuneSpec("span", data, output_dir, lora=lora, batch_size=4, max_steps=3,
                             grad_accumulation=2, optimizer=OptimizerSettings(lr=1e-2), seed=2),
    }


def count_gathers(model) -> tuple[Counter, Counter]:
    """(gathers of each layer, rounds of each kind) on this rank from now on."""
    gathers, rounds = Counter(), Counter()
    layer_parameters, join = model.layer_parameters, model.lockstep._join

    def counted_layer(index):
        gathers[index] += 1
        return layer_parameters(index)

    def counted_join(op):
        counts = join(op)
        rounds["forward"] += bool(counts[FORWARD])
        rounds["backward"] += bool(counts[BACKWARD])
        return counts

    model.layer_parameters, model.lockstep._join = counted_layer, counted_join
    return gathers, rounds


def count_agreements(lockstep) -> list[int]:
    """[agreements between steps] on this rank from now on."""
    count, agree = [0], lockstep.agree

    def counted(*args):
        count[0] += 1
        return agree(*args)

    lockstep.agree = counted
    return count


def main(model: str, data: str, out: Path, adapters: list[str]) -> None:
    rank = RankInfo.from_env()
    runtime = load_sharded_runtime(model, rank, **ENGINE)
    at_rest = allocated_bytes(runtime.engine).as_dict()
    gathers, rounds = count_gathers(runtime.engine.model)
    mixed = []
    runtime.engine.on_step = lambda report: mixed.append(
        report.training_tokens > 0 and report.decode_tokens + report.prefill_tokens > 0)
    for name, path in zip(ADAPTERS, adapters):
        runtime.register_adapter(name, path)
    specs = job_specs(data, out / f"rank-{rank.rank}")
    jobs = {"span": runtime.finetune(specs["span"], span_ranks=True)}
    if rank.rank == 0:
        jobs["local"] = runtime.finetune(specs["local"])
    mine = [r for i, r in enumerate(requests()) if i % rank.world_size == rank.rank]
    completions = runtime.generate(mine)
    for job in jobs.values():
        job.wait(timeout=300)
    # the counts are read once every rank is done: a rank joins the others' rounds till then
    _barrier(out, "done", rank)
    agreements = count_agreements(runtime.engine.step_sync)
    time.sleep(IDLE_S)
    result = {"bytes_at_rest": at_rest, "mixed_steps": sum(mixed), "rounds": rounds,
              "idle_agreements_per_s": agreements[0] / IDLE_S,
              "layer_gathers": [gathers[i] for i in range(len(runtime.engine.model.model.layers))],
              "tokens": {c.request_id: c.token_ids for c in completions},
              "final": {name: str(specs[name].adapter_dir / f"v{job.trainer.versions[-1]}")
                        for name, job in jobs.items()}}
    (out / f"rank-{rank.rank}.json").write_text(json.dumps(result))
    _barrier(out, "rank", rank)  # one rank closing stops them all
    runtime.close()


def _barrier(out: Path, name: str, rank: RankInfo) -> None:
    """Waits until every rank has written OUT/{name}-{rank}.json (files: the process group
    belongs to the runtime's thread)."""
    path = out / f"{name}-{rank.rank}.json"
    if not path.exists():
        path.write_text("{}")
    while len(list(out.glob(f"{name}-*.json"))) < rank.world_size:
        time.sleep(0.05)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4:])
