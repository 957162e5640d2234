"""The planner (`cotune plan`): its parameter counts against the real modules and DeepSpeed's
own count, its per-GPU bytes against DeepSpeed's estimator and against the bytes a real engine
allocates, and its command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import FAMILIES, TINY, tiny_tokenizer
from deepspeed.runtime.zero.stage3 import model_to_params
from transformers import AutoConfig, AutoModelForCausalLM

from cotune import FinetuneSpec, LoraSettings
from cotune.cli import main
from cotune.distributed.architecture import (
    PRESETS_DIR,
    Architecture,
    ArchitectureError,
    load_architecture,
)
from cotune.distributed.memory import allocated_bytes, gathered_bytes
from cotune.distributed.plan import Cluster, GiB, Workload, make_plan
from cotune.engine.engine import Engine, EngineConfig
from cotune.engine.trainer import Trainer
from cotune.model.config import ModelConfig
from cotune.model.llama import LORA_TARGETS, CausalLM
from cotune.model.loading import load_model

PRESETS = ("smollm2-135m", "llama-3.1-70b", "llama-3.1-405b", "dense-1t", "moe-1t")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_counts_equal_deepspeeds_count_of_the_real_module(family):
    hf = {**TINY, **FAMILIES[family], "vocab_size": TINY["vocab_size"]}
    model = CausalLM(ModelConfig.from_hf(hf))
    total, largest = model_to_params(model)
    arch = Architecture.from_hf(hf)
    assert (arch.total_params, arch.largest_tensor) == (total, largest)


@pytest.mark.parametrize("preset", ["smollm2-135m", "llama-3.1-405b"])
def test_preset_counts_equal_the_module_built_from_it(preset):
    arch = load_architecture(preset)
    with torch.device("meta"):
        model = CausalLM(ModelConfig.from_hf(json.loads(
            (PRESETS_DIR / f"{preset}.json").read_text())))
    assert arch.total_params == sum(p.numel() for p in model.parameters())
    assert arch.largest_tensor == max(p.numel() for p in model.parameters())


def test_mixture_of_experts_counts_equal_transformers_mixtral():
    config = AutoConfig.for_model("mixtral", hidden_size=64, intermediate_size=48,
                                  num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=320, num_local_experts=6,
                                  num_experts_per_tok=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    arch = Architecture.from_hf(config.to_dict())
    assert arch.is_moe and arch.moe_layers == 3
    assert arch.total_params == sum(p.numel() for p in model.parameters())
    # a token reads 2 of the 6 experts of each layer: 4 x 3 x (3 x 64 x 48) elements unread
    assert arch.total_params - arch.active_params == 4 * 3 * 3 * 64 * 48


def test_trillion_parameter_presets_are_a_trillion():
    for preset in ("dense-1t", "moe-1t"):
        assert 0.95e12 <= load_architecture(preset).total_params <= 1.1e12
    moe = load_architecture("moe-1t")
    assert moe.active_params < moe.total_params / 20


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (8, 16)])
def test_base_partition_agrees_with_deepspeeds_estimator(preset, gpus, nodes):
    plan = make_plan(load_architecture(preset), Cluster(gpus, nodes, 80 * GiB), Workload())
    ours, theirs = plan.device["base shard"], plan.deepspeed_partition_bytes
    # the only difference allowed: DeepSpeed's partitions are padded to the ranks
    assert theirs <= ours <= theirs * 1.001 + 1e6


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gathered_bytes_are_what_the_sharded_engine_gathers(family):
    hf = {**TINY, **FAMILIES[family], "vocab_size": TINY["vocab_size"]}
    plan = make_plan(Architecture.from_hf(hf), Cluster(2, 1, 80 * GiB),
                     Workload(dtype="float32"))
    assert plan.device["gathered head+layer"] == gathered_bytes(
        CausalLM(ModelConfig.from_hf(hf)))


def test_offload_moves_the_shard_off_the_gpu():
    arch, cluster = load_architecture("dense-1t"), Cluster(8, 16, 141 * GiB)
    none, cpu, nvme = (make_plan(arch, cluster, Workload(offload=o)) for o in
                       ("none", "cpu", "nvme"))
    assert none.device["base shard"] > 0 and cpu.device["base shard"] == 0
    assert cpu.host_per_node - none.host_per_node == 8 * none.device["base shard"]
    assert nvme.nvme_per_node == 8 * none.device["base shard"]
    assert cpu.max_batch > none.max_batch


def test_largest_batch_and_adapter_count_are_the_boundary_of_what_fits():
    arch, cluster = load_architecture("moe-1t"), Cluster(8, 16, 141 * GiB)
    plan = make_plan(arch, cluster, Workload())
    assert plan.fits and plan.max_batch > Workload.batch and plan.max_slots > Workload.slots
    assert make_plan(arch, cluster, Workload(batch=plan.max_batch)).fits
    assert not make_plan(arch, cluster, Workload(batch=plan.max_batch + 1)).fits
    assert make_plan(arch, cluster, Workload(slots=plan.max_slots)).fits
    assert not make_plan(arch, cluster, Workload(slots=plan.max_slots + 1)).fits


def test_the_bytes_a_real_engine_allocates_match_the_plan(tiny_checkpoint, tmp_path):
    """One process, float32: the base, the KV cache, the slot pools, and a job's LoRA weights,
    gradients and AdamW moments as allocated, against the planner (within 10%)."""
    _, path = tiny_checkpoint
    workload = Workload(dtype="float32", max_rank=8, slots=5, context=96, batch=4, jobs=1,
                        train_rank=4)
    engine = Engine(load_model(path), config=EngineConfig(
        num_slots=workload.slots, max_rank=workload.max_rank,
        kv_cache_tokens=workload.batch * workload.context))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": "the cat", "completion": " sat on the mat"})
                            + "\n" for _ in range(4)))
    spec = FinetuneSpec(name="plan", data=str(data), output_dir=str(tmp_path / "out"),
                        lora=LoraSettings(rank=workload.train_rank, alpha=8,
                                          targets=LORA_TARGETS), batch_size=2, epochs=1)
    trainer = Trainer(spec, engine.model, tiny_tokenizer(), "job-plan")
    engine.add_trainer(trainer)
    while trainer.step < 1:  # one optimizer step of two: the moments exist, the job runs on
        engine.step()
    assert trainer in engine.trainers

    at_rest = allocated_bytes(engine)
    measured = {"base shard": at_rest.base_shard, "KV cache": at_rest.kv_cache,
                "adapter slots": at_rest.adapter_slots,
                "optimizer state": at_rest.training_lora + at_rest.optimizer_state}
    arch = Architecture.from_hf(json.loads((path / "config.json").read_text()))
    planned = make_plan(arch, Cluster(1, 1, 1 << 40), workload).device
    for name, size in measured.items():
        assert abs(planned[name] - size) <= 0.1 * size, (name, planned[name], size)


def test_the_planner_imports_without_torch():
    code = "import sys, cotune.distributed.plan; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


def test_plan_command_prints_json_a_user_can_read(capsys):
    code = main(["plan", "--model", "moe-1t", "--gpus", "8", "--gpu-mem", "141", "--nodes",
                 "16", "--offload", "cpu", "--json"])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["device_total"] == sum(plan["device"].values())
    assert plan["fits"] is True and plan["device"]["base shard"] == 0
    assert plan["total_params"] > 1e12 and plan["cluster"]["nodes"] == 16
    assert main(["plan", "--model", "dense-1t", "--gpus", "8", "--gpu-mem", "80"]) == 0
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "DeepSpeed" in text and "largest batch" in text


@pytest.mark.parametrize("args,expected", [
    (["--model", "no-such-model"], "presets: dense-1t"),
    (["--model", "dense-1t", "--offload", "disk"], "accepted: none, cpu, nvme"),
    (["--model", "dense-1t", "--dtype", "int4"], "accepted: bfloat16"),
    (["--model", "dense-1t", "--batch", "0"], "batch=0: must be at least 1"),
])
def test_plan_command_refuses_bad_input_clearly(args, expected, capsys):
    assert main(["plan", "--gpus", "8", "--gpu-mem", "80", *args]) == 2
    assert expected in capsys.readouterr().err


def test_latent_attention_configs_are_refused_with_the_reason(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "kv_lora_rank": 4}))
    with pytest.raises(ArchitectureError, match="latent attention"):
        load_architecture(str(tmp_path))
