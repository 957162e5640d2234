"""cotune reads and writes PEFT's LoRA format exactly, and refuses what it cannot honour.

Every adapter here is written by real PEFT (or by cotune and read back by real PEFT) on a tiny
random Llama; refusals edit those real files the way a broken or foreign adapter would differ.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from cotune.adapters.peft_format import (
    AdapterError,
    LoraAdapter,
    LoraModule,
    load_peft_adapter,
    save_peft_adapter,
)

LORA_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_RANK = 64
Q0 = "model.layers.0.self_attn.q_proj"
KEY_A = f"base_model.model.{Q0}.lora_A.weight"
KEY_B = f"base_model.model.{Q0}.lora_B.weight"


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, vocab_size=256)
    return LlamaForCausalLM(config).eval()


def lora_capable_modules(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_NAMES}


BASE_MODULES = lora_capable_modules(tiny_llama())


def peft_adapter(path: Path, **lora_options) -> PeftModel:
    """Saves a real PEFT LoRA of the tiny base to `path`, with random B (PEFT zeroes it)."""
    model = get_peft_model(tiny_llama(), LoraConfig(**lora_options))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
    model.save_pretrained(path)
    return model.eval()


def peft_lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules()
            if isinstance(m, LoraLayer)}


def edit_config(path: Path, **changes) -> None:
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))


def edit_weights(path: Path, edit) -> None:
    weights_path = path / "adapter_model.safetensors"
    tensors = load_file(weights_path)
    edit(tensors)
    save_file(tensors, weights_path, metadata={"format": "pt"})


def load(path: Path, base_modules=BASE_MODULES, max_rank: int = MAX_RANK) -> LoraAdapter:
    return load_peft_adapter(path, base_modules, max_rank)


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    """A real PEFT adapter: r=8, alpha=16 on q_proj and v_proj of both layers."""
    path = tmp_path / "adapter"
    peft_adapter(path, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    return path


# ---------------------------------------------------------------------------------------------
# Reading PEFT's adapters

PEFT_CONFIGS = {
    "q_v": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all_rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=list(LORA_NAMES)),
    "patterns": dict(r=8, lora_alpha=16, target_modules=list(LORA_NAMES),
                     rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 16},
                     alpha_pattern={"v_proj": 3, r"layers\.1\.self_attn\.o_proj": 40}),
    "patterns_rslora": dict(r=6, lora_alpha=7, use_rslora=True, target_modules=list(LORA_NAMES),
                            rank_pattern={r"layers\.0\..*_proj": 3}, alpha_pattern={"up_proj": 1}),
    "regex": dict(r=3, lora_alpha=5, target_modules=r".*\.layers\.1\.self_attn\.(q|k)_proj"),
    "layers_to_transform": dict(r=2, lora_alpha=2, target_modules=["gate_proj", "down_proj"],
                                layers_to_transform=[1], layers_pattern="layers"),
    "full_path_and_layers": dict(r=4, lora_alpha=4, target_modules=[Q0, "v_proj"],
                                 layers_to_transform=1),
    "exclude": dict(r=5, lora_alpha=12, target_modules=["q_proj", "k_proj"],
                    exclude_modules=["model.layers.0.self_attn.k_proj"]),
    "all_linear": dict(r=5, lora_alpha=10, target_modules="all-linear"),
}


@pytest.mark.parametrize("name", list(PEFT_CONFIGS))
def test_load_gives_peft_weights_and_scales(tmp_path, name):
    model = peft_adapter(tmp_path, **PEFT_CONFIGS[name])
    adapter = load(tmp_path)
    layers = peft_lora_layers(model)
    assert set(adapter.modules) == set(layers)
    for path, layer in layers.items():
        module = adapter.modules[path]
        assert module.a.dtype == module.b.dtype == torch.float32
        assert module.a.is_contiguous() and module.b.is_contiguous()
        assert torch.equal(module.a, layer.lora_A["default"].weight)
        assert torch.equal(module.b, layer.lora_B["default"].weight)
        assert module.scale == layer.scaling["default"], path
    assert adapter.max_rank == max(layer.r["default"] for layer in layers.values())
    assert adapter.config == json.loads((tmp_path / "adapter_config.json").read_text())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_converts_half_precision_to_float32(adapter_dir, dtype):
    edit_weights(adapter_dir, lambda t: t.update({k: v.to(dtype) for k, v in t.items()}))
    stored = load_file(adapter_dir / "adapter_model.safetensors")
    module = load(adapter_dir).modules[Q0]
    assert module.a.dtype == module.b.dtype == torch.float32
    assert torch.equal(module.a, stored[KEY_A].float())
    assert torch.equal(module.b, stored[KEY_B].float())


@pytest.mark.parametrize("init", [False, "gaussian", "eva", "orthogonal", "mica"])
def test_load_accepts_initialisations_that_leave_the_base_alone(adapter_dir, init):
    edit_config(adapter_dir, init_lora_weights=init)
    assert set(load(adapter_dir).modules) == {Q0, "model.layers.0.self_attn.v_proj",
                                              "model.layers.1.self_attn.q_proj",
                                              "model.layers.1.self_attn.v_proj"}


def test_load_accepts_unknown_options_that_are_off(adapter_dir):
    edit_config(adapter_dir, some_future_option=None, another_future_flag=False)
    assert Q0 in load(adapter_dir).modules


def test_load_only_reads_the_directory(adapter_dir):
    def snapshot():
        return {p.name: p.read_bytes() for p in adapter_dir.iterdir()}

    before = snapshot()
    load(adapter_dir)
    with pytest.raises(AdapterError):
        load(adapter_dir, max_rank=4)
    assert snapshot() == before


# ---------------------------------------------------------------------------------------------
# Writing PEFT's format

def test_saved_adapter_loads_in_peft_with_same_weights_and_logits(tmp_path):
    original = peft_adapter(tmp_path / "peft", **PEFT_CONFIGS["patterns_rslora"])
    ours = load(tmp_path / "peft")
    save_peft_adapter(ours, tmp_path / "ours")

    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    layers = peft_lora_layers(reloaded)
    assert set(layers) == set(ours.modules)
    for path, layer in layers.items():
        assert torch.equal(layer.lora_A["default"].weight, ours.modules[path].a)
        assert torch.equal(layer.lora_B["default"].weight, ours.modules[path].b)
        assert layer.scaling["default"] == ours.modules[path].scale
    tokens = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, original(tokens).logits)


def test_saved_adapter_has_peft_keys_and_reads_back_identically(tmp_path):
    peft_adapter(tmp_path / "peft", **PEFT_CONFIGS["patterns"])
    ours = load(tmp_path / "peft")
    save_peft_adapter(ours, tmp_path / "ours")
    again = load(tmp_path / "ours")

    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert again.config == ours.config
    assert set(again.modules) == set(ours.modules)
    for path, module in ours.modules.items():
        assert torch.equal(again.modules[path].a, module.a)
        assert torch.equal(again.modules[path].b, module.b)
        assert again.modules[path].scale == module.scale


def test_save_leaves_no_temporary_files(tmp_path, adapter_dir):
    save_peft_adapter(load(adapter_dir), tmp_path / "out" / "v1")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["v1"]
    assert sorted(p.name for p in (tmp_path / "out" / "v1").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]


def test_save_never_overwrites(tmp_path, adapter_dir):
    before = (adapter_dir / "adapter_config.json").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        save_peft_adapter(load(adapter_dir), adapter_dir)
    assert (adapter_dir / "adapter_config.json").read_bytes() == before


def test_save_refuses_a_config_that_gives_other_ranks_and_writes_nothing(tmp_path, adapter_dir):
    adapter = load(adapter_dir)
    wrong = LoraAdapter(modules=adapter.modules, config=dict(adapter.config, r=4))
    with pytest.raises(AdapterError, match=re.escape(
            f"module '{Q0}' has rank 8 and scale 2.0, but its config gives rank 4 and scale 4.0")):
        save_peft_adapter(wrong, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_save_refuses_a_module_the_config_does_not_target(tmp_path, adapter_dir):
    adapter = load(adapter_dir)
    a, b = torch.zeros(8, 64), torch.zeros(64, 8)
    modules = dict(adapter.modules, **{"model.layers.0.mlp.up_proj": LoraModule(a, b, 2.0)})
    with pytest.raises(AdapterError, match="'model.layers.0.mlp.up_proj' is not selected"):
        save_peft_adapter(LoraAdapter(modules=modules, config=adapter.config), tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Refusals: files

def test_refuses_a_missing_directory(tmp_path):
    with pytest.raises(AdapterError, match="does not exist or is not a directory"):
        load(tmp_path / "nowhere")


def test_refuses_a_missing_config(adapter_dir):
    (adapter_dir / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="has no adapter_config.json"):
        load(adapter_dir)


@pytest.mark.parametrize("text", ["{not json", "\xff\xfe", "[1, 2]"])
def test_refuses_a_config_that_is_not_a_json_object(adapter_dir, text):
    (adapter_dir / "adapter_config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(AdapterError, match="adapter_config.json.*accepted: a JSON object"):
        load(adapter_dir)


def test_refuses_missing_weights(adapter_dir):
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="has no adapter_model.safetensors"):
        load(adapter_dir)


def test_refuses_a_pickled_peft_adapter(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()
    with pytest.raises(AdapterError, match="contains adapter_model.bin, a pickle weights file; "
                                           "cotune never unpickles files"):
        load(tmp_path)


class _TouchWhenUnpickled:
    """A pickle that leaves a mark on disk if anyone ever unpickles it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_trap_pickle_marks_when_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    pickle.loads(pickle.dumps(_TouchWhenUnpickled(marker)))  # the test's own object, on purpose
    assert marker.exists()


@pytest.mark.parametrize("name, match", [
    ("adapter_model.bin", "contains adapter_model.bin, a pickle weights file"),
    ("adapter_model.pt", "contains adapter_model.pt, a pickle weights file"),
    ("adapter_model.safetensors", "is a pickle \\(torch.save\\) file, not safetensors"),
])
def test_never_unpickles_weights(tmp_path, adapter_dir, name, match):
    marker = tmp_path / "unpickled"
    torch.save({KEY_A: _TouchWhenUnpickled(marker)}, adapter_dir / name)
    with pytest.raises(AdapterError, match=match):
        load(adapter_dir)
    assert not marker.exists()


def test_refuses_weights_that_are_not_safetensors(adapter_dir):
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00not a header")
    with pytest.raises(AdapterError, match="is not a valid safetensors file"):
        load(adapter_dir)


def header_only(path: Path) -> bytes:
    """Cuts the weights file of the adapter at `path` to its header; returns what was cut."""
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    end = 8 + int.from_bytes(data[:8], "little")
    weights.write_bytes(data[:end])
    return data[end:]


def framed(header: bytes) -> bytes:
    """A safetensors file of `header` and no tensor bytes."""
    return len(header).to_bytes(8, "little") + header


def test_a_rank_above_max_rank_is_refused_from_the_header_before_any_tensor_is_read(
        adapter_dir):
    header_only(adapter_dir)  # the tensors are not there to read
    with pytest.raises(AdapterError, match=re.escape("has rank 8, which exceeds max_rank 4")):
        load(adapter_dir, max_rank=4)
    with pytest.raises(AdapterError, match=re.escape(
            "not a valid safetensors file (its tensors span 14336 bytes after the header, but "
            "the file has 0)")):
        load(adapter_dir)


@pytest.mark.parametrize("header, reason", [
    ((200 << 20).to_bytes(8, "little"), "a header of 209715200 bytes, which a file of 8 bytes "
                                        "cannot hold (at most 104857600)"),
    (b"\x01", "the file has 1 bytes, fewer than the 8 that give the length of its header"),
    (framed(b"[1,]"), "its header is not JSON"),
    (framed(b"[]"), "its header is not a JSON object"),
    (framed(b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}'),
     "its header's entry 'x' lacks a dtype (a string), a shape (whole numbers) or "
     "data_offsets ([begin, end])"),
])
def test_refuses_a_safetensors_header_out_of_bounds_or_malformed(adapter_dir, header, reason):
    (adapter_dir / "adapter_model.safetensors").write_bytes(header)
    with pytest.raises(AdapterError, match="is not a valid safetensors file \\(.*"
                       + re.escape(reason)):
        load(adapter_dir)


@pytest.mark.parametrize("spoil, reason", [
    (lambda data: data + bytes(1 << 20), "its tensors span 14336 bytes after the header, but "
                                         "the file has 1062912"),
    (lambda data: data[:-4], "its tensors span 14336 bytes after the header, but the file has "
                             "14332"),
])
def test_refuses_weights_whose_data_is_not_what_the_header_describes(adapter_dir, spoil,
                                                                     reason):
    weights = adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(spoil(weights.read_bytes()))
    with pytest.raises(AdapterError, match=re.escape(reason)):
        load(adapter_dir)


def test_refuses_a_header_whose_offsets_do_not_match_the_shapes(adapter_dir):
    weights = adapter_dir / "adapter_model.safetensors"
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    begin, end = header[KEY_A]["data_offsets"]
    header[KEY_A]["shape"] = [8, 32]  # half the bytes its offsets span
    text = json.dumps(header).encode()
    weights.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])
    with pytest.raises(AdapterError, match="has shape \\(8, 32\\)"):
        load(adapter_dir)  # the base's shape is checked first
    with pytest.raises(AdapterError, match=re.escape(
            f"its tensor '{KEY_A}' spans bytes [{begin}, {end}) after the header, where "
            f"[{begin}, {begin + 8 * 32 * 4}) was due")):
        load(adapter_dir, base_modules={**BASE_MODULES, Q0: (32, 64)})


# ---------------------------------------------------------------------------------------------
# Refusals: what the adapter is

def test_refuses_other_peft_types(tmp_path):
    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                       feedforward_modules=["down_proj"])
    get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    with pytest.raises(AdapterError, match="has peft_type 'IA3'.*accepts only peft_type 'LORA'"):
        load(tmp_path)


def test_refuses_weights_of_a_module_the_base_lacks(adapter_dir):
    c_attn = "model.layers.0.self_attn.c_attn"

    def rename(tensors):
        for factor in "AB":
            key = f"base_model.model.{Q0}.lora_{factor}.weight"
            tensors[key.replace(Q0, c_attn)] = tensors.pop(key)

    edit_weights(adapter_dir, rename)
    with pytest.raises(AdapterError, match=re.escape(
            f"targets module '{c_attn}' which the base model does not have; the base has "
            "LoRA-capable modules named q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
            "down_proj")):
        load(adapter_dir)


def test_refuses_a_target_name_the_base_lacks(adapter_dir):
    edit_config(adapter_dir, target_modules=["q_proj", "v_proj", "c_attn"])
    with pytest.raises(AdapterError, match="targets module 'c_attn' which the base model does "
                                           "not have; the base has LoRA-capable modules named"):
        load(adapter_dir)


def test_refuses_a_target_regex_that_matches_nothing(adapter_dir):
    edit_config(adapter_dir, target_modules=r".*\.attn\.c_attn")
    with pytest.raises(AdapterError, match="regex .* matches no module of the base model"):
        load(adapter_dir)


def test_refuses_weights_the_config_does_not_target(adapter_dir):
    edit_config(adapter_dir, target_modules=["v_proj"])
    with pytest.raises(AdapterError, match=re.escape(
            f"has weights for module '{Q0}' but its target_modules do not select it")):
        load(adapter_dir)


def test_refuses_a_targeted_module_without_weights(adapter_dir):
    edit_weights(adapter_dir, lambda t: (t.pop(KEY_A), t.pop(KEY_B)))
    with pytest.raises(AdapterError, match=re.escape(
            f"targets module '{Q0}' in adapter_config.json but adapter_model.safetensors has no "
            "lora_A/lora_B for it")):
        load(adapter_dir)


@pytest.mark.parametrize("key", [KEY_A, KEY_B])
def test_refuses_a_module_missing_one_factor(adapter_dir, key):
    edit_weights(adapter_dir, lambda t: t.pop(key))
    present, missing = ("B", "A") if key == KEY_A else ("A", "B")
    with pytest.raises(AdapterError, match=re.escape(
            f"has lora_{present} but no lora_{missing} for module '{Q0}'")):
        load(adapter_dir)


def test_refuses_lora_a_of_other_in_features(adapter_dir):
    with pytest.raises(AdapterError, match=re.escape(
            f"lora_A of module '{Q0}' has shape (8, 64), but the base module has "
            "in_features=32; accepted: (r, 32)")):
        load(adapter_dir, base_modules=dict(BASE_MODULES, **{Q0: (32, 64)}))


def test_refuses_lora_b_of_other_out_features(adapter_dir):
    with pytest.raises(AdapterError, match=re.escape(
            f"lora_B of module '{Q0}' has shape (64, 8), but the base module has "
            "out_features=48; accepted: (48, r)")):
        load(adapter_dir, base_modules=dict(BASE_MODULES, **{Q0: (64, 48)}))


def test_refuses_lora_a_and_b_of_different_ranks(adapter_dir):
    edit_weights(adapter_dir, lambda t: t.update({KEY_B: t[KEY_B][:, :4].contiguous()}))
    with pytest.raises(AdapterError, match=re.escape(
            f"module '{Q0}' has lora_A of rank 8 but lora_B of rank 4")):
        load(adapter_dir)


def test_refuses_weights_whose_rank_the_config_contradicts(adapter_dir):
    edit_config(adapter_dir, rank_pattern={"q_proj": 4})
    with pytest.raises(AdapterError, match=re.escape(
            f"module '{Q0}' has rank 8 in adapter_model.safetensors but rank 4 by "
            "adapter_config.json")):
        load(adapter_dir)


def test_refuses_a_rank_above_the_servers_max_rank(adapter_dir):
    with pytest.raises(AdapterError, match=re.escape(
            "has rank 8, which exceeds max_rank 4 of this server; lower the rank to at most 4 "
            "or start the server with --max-rank 8")):
        load(adapter_dir, max_rank=4)


@pytest.mark.parametrize("key", [KEY_A, KEY_B])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_refuses_non_finite_values_naming_the_tensor(adapter_dir, key, value):
    def poison(tensors):
        tensors[key][3, 1] = value

    edit_weights(adapter_dir, poison)
    with pytest.raises(AdapterError, match=re.escape(f"tensor '{key}' contains NaN or Inf")):
        load(adapter_dir)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.uint8])
def test_refuses_integer_tensors(adapter_dir, dtype):
    edit_weights(adapter_dir, lambda t: t.update({KEY_A: t[KEY_A].to(dtype)}))
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(AdapterError, match=re.escape(
            f"tensor '{KEY_A}' has dtype {name}; accepted: float32, float16, bfloat16")):
        load(adapter_dir)


@pytest.mark.parametrize("key, shape, what", [
    (f"base_model.model.{Q0}.lora_magnitude_vector", (64,), "a DoRA magnitude"),
    ("base_model.model.model.embed_tokens.lora_embedding_A", (8, 256), "LoRA of an embedding"),
    (f"base_model.model.{Q0}.lora_B.bias", (64,), "a bias"),
    ("base_model.model.lm_head.weight", (256, 64), "a full weight"),
    (f"base_model.model.{Q0}.lora_A.default.weight", (8, 64), "not a lora_A/lora_B weight"),
])
def test_refuses_tensors_that_are_not_lora_weights(adapter_dir, key, shape, what):
    edit_weights(adapter_dir, lambda t: t.update({key: torch.zeros(shape)}))
    with pytest.raises(AdapterError, match=re.escape(
            f"has tensors that are not plain LoRA weights: '{key}' ({what}")):
        load(adapter_dir)


@pytest.mark.parametrize("option, value, why", [
    ("modules_to_save", ["lm_head"], "full copies of base modules"),
    ("fan_in_fan_out", True, "(out_features, in_features)"),
    ("bias", "all", "trained biases"),
    ("bias", "lora_only", "trained biases"),
    ("lora_bias", True, "a bias on lora_B"),
    ("target_parameters", ["mlp.experts.gate_up_proj"], "raw parameters"),
    ("layer_replication", [[0, 2], [1, 2]], "replicated layers"),
    ("use_qalora", True, "QALoRA"),
    ("trainable_token_indices", [1, 2], "trainable embedding rows"),
    ("megatron_config", {"tensor_model_parallel_size": 2}, "Megatron"),
    ("alora_invocation_tokens", [5, 6], "aLoRA"),
    ("velora_config", {}, "VeLoRA"),
    ("monteclora_config", {"num_samples": 4}, "MonteCLoRA"),
    ("use_bdlora", {"nblocks": 2}, "BD-LoRA"),
    ("arrow_config", {"top_k": 2}, "Arrow"),
    ("kasa_config", {}, "KaSA"),
])
def test_refuses_options_that_change_the_math(adapter_dir, option, value, why):
    edit_config(adapter_dir, **{option: value})
    with pytest.raises(AdapterError, match=re.escape(
            f"sets {option}={json.dumps(value)} in adapter_config.json, which cotune does not "
            "support: ") + f".*{re.escape(why)}.*accepted: {option}="):
        load(adapter_dir)


def test_a_dora_adapter_loads_its_magnitudes_and_is_refused_without_them(tmp_path):
    path = tmp_path / "dora"
    peft_adapter(path, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True)
    adapter = load(path)
    magnitude = load_file(path / "adapter_model.safetensors")[
        f"base_model.model.{Q0}.lora_magnitude_vector"]
    assert torch.equal(adapter.modules[Q0].magnitude, magnitude)
    edit_weights(path, lambda t: t.update({f"base_model.model.{Q0}.lora_magnitude_vector":
                                           torch.ones(63)}))
    with pytest.raises(AdapterError, match=r"DoRA magnitude of module .* \(63,\); accepted: "
                                           r"\(64,\)"):
        load(path)
    edit_weights(path, lambda t: t.pop(f"base_model.model.{Q0}.lora_magnitude_vector"))
    with pytest.raises(AdapterError, match="has use_dora but no lora_magnitude_vector for module"):
        load(path)
    edit_config(path, use_dora="yes")
    with pytest.raises(AdapterError, match=r'use_dora="yes"; accepted: true \(DoRA\) or false'):
        load(path)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_refuses_initialisations_that_change_the_base(adapter_dir, init):
    edit_config(adapter_dir, init_lora_weights=init)
    with pytest.raises(AdapterError, match=re.escape(
            f"uses init_lora_weights='{init}', which changes the base weights")
            + ".*path_initial_model_for_weight_conversion"):
        load(adapter_dir)


def test_refuses_an_unknown_initialisation(adapter_dir):
    edit_config(adapter_dir, init_lora_weights="fancy")
    with pytest.raises(AdapterError, match='init_lora_weights="fancy", which cotune does not '
                                           'know; accepted: true, false, "gaussian"'):
        load(adapter_dir)


def test_refuses_an_unknown_option_that_is_on(adapter_dir):
    edit_config(adapter_dir, use_hyper_lora=True)
    with pytest.raises(AdapterError, match="sets use_hyper_lora=true in adapter_config.json, an "
                                           "option cotune does not know"):
        load(adapter_dir)


@pytest.mark.parametrize("changes, match", [
    (dict(r=0), "has r=0; accepted: a positive integer rank"),
    (dict(r="8"), 'has r="8"; accepted: a positive integer rank'),
    (dict(lora_alpha=None), "has lora_alpha=null; accepted: a finite number"),
    (dict(lora_alpha=1e308), "has lora_alpha=1e\\+308; accepted: a finite number of at most "
                             "100000 in magnitude"),
    (dict(alpha_pattern={"q_proj": -2e5}), "alpha_pattern\\['q_proj'\\]=-200000.0; accepted"),
    (dict(rank_pattern={"q_proj": 2.5}), "rank_pattern\\['q_proj'\\]=2.5; accepted: a positive"),
    (dict(alpha_pattern={"(": 2}), "invalid regex in alpha_pattern key"),
    (dict(target_modules=None), "target_modules=null; accepted: a list of module names"),
    (dict(target_modules="all-linear"), "target_modules='all-linear', which PEFT resolves"),
    (dict(target_modules="q_proj(", layers_to_transform=None), "invalid regex in target_modules"),
    (dict(target_modules=".*q_proj", layers_to_transform=[0]), "combines a regex target_modules"),
    (dict(layers_pattern="layers"), "sets layers_pattern without layers_to_transform"),
    (dict(layers_to_transform="0"), 'has layers_to_transform="0"; accepted: null, a layer'),
])
def test_refuses_malformed_config_values(adapter_dir, changes, match):
    edit_config(adapter_dir, **changes)
    with pytest.raises(AdapterError, match=match):
        load(adapter_dir)
