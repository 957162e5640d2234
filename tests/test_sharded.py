"""The base sharded over two ranks (DeepSpeed ZeRO-3 on gloo, launched by torchrun): the same
tokens and the same trained LoRA weights as one process, each rank holding half the base; and
`cotune serve` as ranks, where a rank that dies takes the others down with a clear message."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_tokenizer
from safetensors import safe_open
from safetensors.torch import load_file
from server_helpers import start_server, tiny_adapter_dir, tiny_model_dir
from sharded_worker import ADAPTERS, ENGINE, job_specs, requests
from test_finetune import FACTS

from cotune import Runtime
from cotune.client import Client
from cotune.distributed.architecture import Architecture
from cotune.distributed.memory import allocated_bytes, gathered_bytes
from cotune.distributed.plan import Cluster, Workload, make_plan
from cotune.distributed.ranks import RankInfo, RankSetupError
from cotune.distributed.zero_config import check_sharding, zero3_config
from cotune.engine.runtime import SYNC_POLL_S
from cotune.engine.trainer import Trainer
from cotune.model.loading import load_model, weight_files

RUN_TIMEOUT_S = 300
LORA_ATOL = 1e-6  # float32: the ranks sum partial gradients in another order than one process


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The model, adapters and training data both runs use."""
    root = tmp_path_factory.mktemp("sharded")
    data = root / "facts.jsonl"
    data.write_text("".join(json.dumps({"prompt": q + " ", "completion": a}) + "\n"
                            for q, a in FACTS))
    adapters = [tiny_adapter_dir(root / "a0", seed=1),
                tiny_adapter_dir(root / "a1", seed=2, r=8,
                                 targets=("q_proj", "v_proj", "down_proj"))]
    return dict(root=root, model=tiny_model_dir(root), data=str(data), adapters=adapters)


@pytest.fixture(scope="module")
def ranks(work):
    """The results of two ranks run by torchrun (tests/sharded_worker.py), by rank."""
    out = work["root"] / "ranks"
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(Path(__file__).parent / "sharded_worker.py"),
               str(work["model"]), work["data"], str(out), *map(str, work["adapters"])]
    run = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def one_process(work):
    """The same requests and jobs in one process over the whole base."""
    with Runtime.load(work["model"], **ENGINE) as runtime:
        for name, path in zip(ADAPTERS, work["adapters"]):
            runtime.register_adapter(name, path)
        specs = job_specs(work["data"], work["root"] / "one-process")
        jobs = {name: runtime.finetune(spec) for name, spec in specs.items()}
        completions = runtime.generate(requests())
        for job in jobs.values():
            job.wait(timeout=RUN_TIMEOUT_S)
        base_bytes = allocated_bytes(runtime.engine).base_shard
    final = {name: specs[name].adapter_dir / f"v{job.trainer.versions[-1]}"
             for name, job in jobs.items()}
    return dict(tokens={c.request_id: c.token_ids for c in completions}, final=final,
                base_bytes=base_bytes)


def _lora(version_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(version_dir) / "adapter_model.safetensors")


def test_sharded_outputs_equal_one_process_token_for_token(ranks, one_process):
    tokens = {**ranks[0]["tokens"], **ranks[1]["tokens"]}
    assert sorted(tokens) == sorted(one_process["tokens"])
    assert set(ranks[0]["tokens"]).isdisjoint(ranks[1]["tokens"])  # each rank its own
    for request_id, want in one_process["tokens"].items():
        assert tokens[request_id] == want, request_id


def test_requests_were_served_in_the_steps_that_trained(ranks):
    assert all(rank["mixed_steps"] > 0 for rank in ranks)


def test_each_layer_is_gathered_once_per_pass_of_any_rank(ranks):
    """Every forward or backward pass of any rank is a round that every rank joins, and each
    round gathers each layer exactly once (a rank without rows only gathers)."""
    for rank in ranks:
        passes = rank["rounds"]["forward"] + rank["rounds"]["backward"]
        assert rank["rounds"]["backward"] > 0
        assert rank["layer_gathers"] == [passes] * len(rank["layer_gathers"])


def test_idle_ranks_ask_each_other_for_work_without_spinning(ranks):
    for rank in ranks:  # one agreement per SYNC_POLL_S (0.05 s) when no rank has work
        assert 5 <= rank["idle_agreements_per_s"] <= 1.5 / SYNC_POLL_S


def test_each_rank_holds_half_the_base(work, ranks, one_process):
    numels = []
    for file in weight_files(work["model"]):
        with safe_open(file, "pt") as f:
            numels += [math.prod(f.get_slice(name).get_shape()) for name in f.keys()]
    whole = sum(numels) * 4  # float32
    assert one_process["base_bytes"] == whole
    for rank in ranks:
        shard = rank["bytes_at_rest"]["base_shard"]
        assert shard == sum(math.ceil(n / 2) for n in numels) * 4  # ZeRO-3: ceil(n/2) each
        assert 0.45 < shard / whole < 0.55
        assert rank["bytes_at_rest"]["adapter_slots"] > 0  # slot pools stay whole, per rank


def test_a_step_gathers_the_head_and_one_layer_at_a_time(work):
    with safe_open(weight_files(work["model"])[0], "pt") as f:
        numel = {name: math.prod(f.get_slice(name).get_shape()) for name in f.keys()}
    head = numel["model.embed_tokens.weight"] + numel["model.norm.weight"] + \
        numel["lm_head.weight"]
    layer = sum(n for name, n in numel.items() if name.startswith("model.layers.0."))
    assert gathered_bytes(load_model(work["model"])) == (head + layer) * 4


def test_planner_predicts_the_bytes_each_rank_holds(work, ranks):
    """`cotune plan`'s per-rank base shard, KV cache and slot pools for this base over two
    ranks, against what each rank of the real run allocated (within 10%)."""
    arch = Architecture.from_hf(json.loads((work["model"] / "config.json").read_text()))
    workload = Workload(dtype="float32", max_rank=ENGINE["max_rank"], slots=ENGINE["num_slots"],
                        context=ENGINE["kv_cache_tokens"], batch=1)
    planned = make_plan(arch, Cluster(gpus_per_node=2, nodes=1, gpu_bytes=1 << 40),
                        workload).device
    for rank in ranks:
        held = rank["bytes_at_rest"]
        for ours, theirs in (("base shard", "base_shard"), ("KV cache", "kv_cache"),
                             ("adapter slots", "adapter_slots")):
            assert abs(planned[ours] - held[theirs]) <= 0.1 * held[theirs], (ours, held)


def test_rank_local_job_trains_as_in_one_process(ranks, one_process):
    got, want = _lora(ranks[0]["final"]["local"]), _lora(one_process["final"]["local"])
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=LORA_ATOL, msg=name)
    assert "local" not in ranks[1]["final"]


def test_job_spanning_ranks_trains_as_in_one_process(ranks, one_process):
    want = _lora(one_process["final"]["span"])
    first, second = (_lora(rank["final"]["span"]) for rank in ranks)
    for name in want:
        assert torch.equal(first[name], second[name]), name  # the ranks step as one
        torch.testing.assert_close(first[name], want[name], rtol=0, atol=LORA_ATOL, msg=name)
    assert any(want[name].abs().max() > 0.01 for name in want if "lora_B" in name)  # it trained


def test_zero3_config_offload_choices():
    assert zero3_config()["zero_optimization"] == {"stage": 3}
    assert zero3_config()["bf16"] == {"enabled": False}
    assert zero3_config("bfloat16")["bf16"] == {"enabled": True}
    assert zero3_config(offload="cpu")["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_zero3_config_nvme_needs_an_existing_path(tmp_path):
    offload = zero3_config(offload="nvme", nvme_path=tmp_path)["zero_optimization"]
    assert offload["offload_param"] == {"device": "nvme", "nvme_path": str(tmp_path),
                                        "pin_memory": False}
    with pytest.raises(ValueError, match="needs --nvme-path"):
        zero3_config(offload="nvme")
    with pytest.raises(ValueError, match="not a directory"):
        zero3_config(offload="nvme", nvme_path=tmp_path / "missing")
    with pytest.raises(ValueError, match="only with --zero-offload nvme"):
        zero3_config(offload="cpu", nvme_path=tmp_path)
    with pytest.raises(ValueError, match="accepted: none, cpu, nvme"):
        zero3_config(offload="disk")


def test_sharding_options_are_checked():
    with pytest.raises(ValueError, match="launch it as ranks"):
        check_sharding(False, "cpu", "cpu")
    with pytest.raises(ValueError, match="give cpu or cuda"):
        check_sharding(True, "none", "cuda:1")
    check_sharding(True, "nvme", "cuda")


def test_rank_info_from_launcher_variables():
    env = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="h", MASTER_PORT="29500")
    assert RankInfo.from_env(env) == RankInfo(1, 2, 1, "h", 29500)
    assert RankInfo.from_env({}) is None
    assert RankInfo.from_env({"WORLD_SIZE": "1"}) is None
    with pytest.raises(RankSetupError, match="MASTER_PORT is not set"):
        RankInfo.from_env({k: v for k, v in env.items() if k != "MASTER_PORT"})
    with pytest.raises(RankSetupError, match="outside"):
        RankInfo.from_env({**env, "RANK": "2"})


def test_spanning_needs_a_sharded_base(work):
    spec = job_specs(work["data"], work["root"] / "unsharded")["span"]
    with Runtime.load(work["model"], **ENGINE) as runtime:
        with pytest.raises(ValueError, match="needs a base sharded over ranks"):
            runtime.finetune(spec, span_ranks=True)


def _free_ports(count: int = 1) -> int:
    """The first of `count` consecutive ports that are free now."""
    while True:
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                for offset in range(1, count):
                    with socket.socket() as s:
                        s.bind(("127.0.0.1", port + offset))
                return port
            except OSError:
                continue


def test_serve_as_ranks_and_a_dead_rank_stops_the_others(work):
    """Two `cotune serve` ranks as the Helm chart starts them (the launcher's variables, one
    process each, the base offloaded to CPU memory); kill -9 of one makes the other exit with
    a message, not hang."""
    root, token = work["root"] / "serve", work["root"] / "admin.token"
    token.write_text("ct_0123456789ab_" + "s" * 43 + "\n")
    port, metrics = _free_ports(), _free_ports(2)

    def start(rank: int):
        env = dict(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        return start_server(work["root"], "--admin-token-file", str(token), "--rank-timeout",
                            "30", "--zero-offload", "cpu", "--metrics-port", str(metrics),
                            data_dir=root, env=env)

    with ThreadPoolExecutor(2) as pool:  # the ranks load the base together
        servers = list(pool.map(start, range(2)))
    try:
        tokens = []
        for server in servers:
            with Client(server.address, server.admin_token) as client:
                done = client.complete("The cat sat on", max_tokens=8, ignore_eos=True)
                assert done.completion_tokens == 8
                tokens.append(done.token_ids)
        assert tokens[0] == tokens[1]  # one base, whichever rank serves
        assert sorted(p.name for p in root.iterdir()) == ["rank-0", "rank-1"]  # one each
        for rank, server in enumerate(servers):  # ranks of one host: port + LOCAL_RANK
            assert f"metrics: http://127.0.0.1:{metrics + rank}/metrics" in "".join(server.output)
        servers[1].proc.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 90
        while servers[0].proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert servers[0].proc.returncode == 1, "".join(servers[0].output[-30:])
        assert "rank 0 of 2: the sharded base stopped" in "".join(servers[0].output)
    finally:
        for server in servers:
            server.stop(signal.SIGKILL)


def test_a_spanning_job_needs_an_example_per_rank_in_every_micro_batch(work):
    model = load_model(work["model"])
    spec = job_specs(work["data"], work["root"] / "too-small")["span"]
    with pytest.raises(ValueError, match="needs at least 2 examples in every micro-batch; "
                                         "batch_size 4 over 5 training examples leaves 1"):
        Trainer(replace(spec, batch_size=4, eval_fraction=0.4), model, tiny_tokenizer(), "j",
                span=(0, 2))
    Trainer(spec, model, tiny_tokenizer(), "j", span=(1, 2))  # 8 examples, 4 a micro-batch


def test_nvme_offload_is_refused_clearly_where_libaio_is_missing():
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from cotune.distributed.sharded_runtime import check_nvme_offload

    if AsyncIOBuilder().is_compatible():
        check_nvme_offload()
    else:
        with pytest.raises(ValueError, match="libaio"):
            check_nvme_offload()
