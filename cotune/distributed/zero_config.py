"""The DeepSpeed ZeRO-3 configuration of a sharded base: partitioned parameters, optionally
offloaded to CPU memory or NVMe."""

from __future__ import annotations

from pathlib import Path

OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def zero3_config(dtype: str = "float32", offload: str = "none",
                 nvme_path: str | Path | None = None) -> dict:
    """DeepSpeed's config dict for `deepspeed.zero.Init`: stage 3 in `dtype` ("float32" or
    "bfloat16"), and with `offload` "cpu" or "nvme" the base's partitions kept there between
    uses (`nvme_path` only with "nvme")."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype {dtype!r} is not supported; accepted: float32, bfloat16")
    if offload not in OFFLOAD_DEVICES:
        raise ValueError(f"ZeRO offload {offload!r} is not supported; accepted: "
                         f"{', '.join(OFFLOAD_DEVICES)}")
    if offload == "nvme" and nvme_path is None:
        raise ValueError("--zero-offload nvme needs --nvme-path, a directory on the NVMe drive")
    if offload != "nvme" and nvme_path is not None:
        raise ValueError(f"--nvme-path goes only with --zero-offload nvme (not {offload!r})")
    zero: dict = {"stage": 3}
    if offload == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    elif offload == "nvme":
        path = Path(nvme_path)
        if not path.is_dir():
            raise ValueError(f"--nvme-path {path} is not a directory")
        zero["offload_param"] = {"device": "nvme", "nvme_path": str(path), "pin_memory": False}
    # The dtype goes in the config: zero.Init's own dtype argument is ignored on accelerators
    # without float16 (the CPU's), where it always picks bfloat16. DeepSpeed asks for a batch
    # size even where it runs no training engine of its own.
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
            "bf16": {"enabled": dtype == "bfloat16"}}


def check_sharding(sharded: bool, offload: str, device: str) -> None:
    """The options of `cotune serve` that depend on whether it runs as ranks."""
    if not sharded and offload != "none":
        raise ValueError(
            f"--zero-offload {offload} offloads a base sharded over ranks, and this server runs "
            "as one process; launch it as ranks (torchrun --nproc-per-node N -m cotune.cli "
            "serve ..., or WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set) or "
            "leave --zero-offload at none")
    if sharded and device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: each rank of a sharded base runs on its own "
                         "device (cuda:LOCAL_RANK, or the CPU); give cpu or cuda")
