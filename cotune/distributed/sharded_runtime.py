"""A Runtime over a base sharded across the ranks that torchrun (or the DeepSpeed launcher, or
the Helm chart's sharded workers) started: every rank serves its own requests and trains its
own jobs, in lockstep with the others."""

from __future__ import annotations

from pathlib import Path

import torch

from cotune.distributed.ranks import RankInfo, init_ranks
from cotune.distributed.sharded_model import load_sharded_model
from cotune.distributed.zero_config import zero3_config
from cotune.engine.engine import Engine, EngineConfig
from cotune.engine.runtime import Runtime
from cotune.model.default_model import resolve_model_path
from cotune.model.tokenizer import load_tokenizer, stop_token_ids


def load_sharded_runtime(model: str | Path, rank: RankInfo, *, dtype: str = "float32",
                         zero_offload: str = "none", nvme_path: Path | None = None,
                         timeout_s: float = 120.0, **engine_options) -> Runtime:
    """Joins the ranks and loads `model` partitioned over them (ZeRO-3); options as in
    Runtime.load. Every collective fails after `timeout_s` without its peers."""
    config = zero3_config(dtype, zero_offload, nvme_path)  # bad options fail before joining
    if zero_offload == "nvme":
        check_nvme_offload()
    if torch.cuda.is_available():
        torch.cuda.set_device(rank.local_rank)
    path = resolve_model_path(model)
    init_ranks(timeout_s)
    base = load_sharded_model(path, config)
    tokenizer = load_tokenizer(path)
    engine = Engine(base, tokenizer, stop_token_ids(path, tokenizer),
                    EngineConfig(**engine_options), step_sync=base.lockstep)
    return Runtime(engine, path)


def check_nvme_offload() -> None:
    """NVMe offload reads and writes through DeepSpeed's async_io op, built against libaio."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible():
        raise ValueError("--zero-offload nvme needs DeepSpeed's async_io op, which builds "
                         "only with libaio (apt install libaio-dev); install it or use "
                         "--zero-offload cpu")
