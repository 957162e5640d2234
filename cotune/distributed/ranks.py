"""Who this process is among the ranks of a sharded base, from torchrun's variables (the
DeepSpeed launcher and the Helm chart's sharded workers set the same ones), and the process
group that DeepSpeed's ZeRO-3 partitions the base over."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class RankSetupError(ValueError):
    """The launcher's variables are missing or inconsistent."""


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @classmethod
    def from_env(cls, env=os.environ) -> RankInfo | None:
        """This process's rank, or None when it was not launched as ranks (no WORLD_SIZE, or
        a world of one: a whole base in one process)."""
        if int(env.get("WORLD_SIZE", "1") or "1") <= 1:
            return None
        missing = [name for name in VARIABLES if not env.get(name)]
        if missing:
            raise RankSetupError(
                f"WORLD_SIZE={env['WORLD_SIZE']} asks for a sharded base, but {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set; launch with torchrun or the "
                f"DeepSpeed launcher, or set all of {', '.join(VARIABLES)}")
        try:
            info = cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]),
                       env["MASTER_ADDR"], int(env["MASTER_PORT"]))
        except ValueError as e:
            raise RankSetupError(f"RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be "
                                 f"integers: {e}") from e
        if not 0 <= info.rank < info.world_size:
            raise RankSetupError(f"RANK={info.rank} is outside [0, WORLD_SIZE={info.world_size})")
        return info


def init_ranks(timeout_s: float) -> None:
    """Joins the process group (gloo on the CPU, NCCL on GPUs) through DeepSpeed. Every
    collective fails after `timeout_s` seconds without its peers, so a rank that died never
    leaves the others waiting forever."""
    import deepspeed
    import torch

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (about 50 s at every
    # fresh start) whenever it counts that op as compatible; gloo's own collectives serve
    # here, so the op is marked incompatible before the backend is made (deepspeed.ops keeps
    # this one dict for the process).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=timedelta(seconds=timeout_s))
