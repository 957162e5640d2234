"""Loading a Hugging Face checkpoint: shards, dtypes, the meta-device build, the errors that
refuse what cotune cannot run, config.json of transformers 4.x and 5, rotary frequencies, and
sliding-window attention over a KV cache — each against transformers itself."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import LOGIT_ATOL, TINY, tiny_hf_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from cotune.engine.kv_cache import PagedBatch, PagedKVCache
from cotune.model.config import ModelConfig, ModelConfigError
from cotune.model.llama import ForwardBatch
from cotune.model.loading import load_model
from cotune.model.rope import inverse_frequencies

ATOL32 = LOGIT_ATOL[torch.float32]


def cotune_logits(model, token_ids: torch.Tensor) -> torch.Tensor:
    """(n, vocab) float32 logits of one sequence, run as one prefill."""
    with torch.no_grad():
        return model.logits(model(ForwardBatch(token_ids, [len(token_ids)])))


def hf_logits(hf_model, token_ids: torch.Tensor) -> torch.Tensor:
    """(n, vocab) float32 logits of one sequence from transformers."""
    with torch.no_grad():
        return hf_model(token_ids[None]).logits[0].float()


def max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got - want).abs().max().item()


def edit_config(path: Path, **changes) -> None:
    """Rewrites config.json of checkpoint `path` with `changes` (None deletes a field)."""
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    config_file.write_text(json.dumps(config))


def tiny_config_dict(model_type: str, **fields) -> dict:
    """config.json contents of a tiny transformers config of `model_type`."""
    return AutoConfig.for_model(model_type, **dict(TINY, **fields)).to_dict()


# --- 1. sharded checkpoints -------------------------------------------------------------


def test_sharded_checkpoint_logits_equal_single_file_and_transformers(
        hf_checkpoint, tmp_path, seed):
    hf_model, single_dir = hf_checkpoint
    sharded_dir = tmp_path / "sharded"
    hf_model.save_pretrained(sharded_dir, max_shard_size="20KB")
    shards = sorted(sharded_dir.glob("model-*.safetensors"))
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    assert not (sharded_dir / "model.safetensors").exists()
    assert len(shards) > 2, "the checkpoint must really be split for this test to mean anything"

    token_ids = torch.randint(0, TINY["vocab_size"], (17,))
    sharded = cotune_logits(load_model(sharded_dir), token_ids)
    single = cotune_logits(load_model(single_dir), token_ids)
    assert torch.equal(sharded, single)
    diff = max_diff(sharded, hf_logits(hf_model, token_ids))
    assert diff <= ATOL32, f"max |diff| {diff:.2e} (seed {seed})"


# --- 2. bfloat16 ------------------------------------------------------------------------


def test_bfloat16_load_computes_in_bf16_and_matches_transformers_bf16(hf_checkpoint, seed):
    hf_model, path = hf_checkpoint
    model = load_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}

    token_ids = torch.randint(0, TINY["vocab_size"], (37,))
    with torch.no_grad():
        hidden = model(ForwardBatch(token_ids, [len(token_ids)]))
        logits = model.logits(hidden)
    assert hidden.dtype == torch.bfloat16  # the layers ran in bf16, not upcast to float32
    want = hf_logits(hf_model.to(torch.bfloat16), token_ids)
    diff = max_diff(logits, want)
    assert diff <= LOGIT_ATOL[torch.bfloat16], f"max |diff| {diff:.2e} (seed {seed})"


# --- 3. built on meta, then assigned ----------------------------------------------------


def test_loaded_model_has_no_meta_tensor_and_nothing_requires_grad(hf_checkpoint):
    _, path = hf_checkpoint
    model = load_model(path)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert tensors
    on_meta = [name for name, t in tensors.items() if t.is_meta]
    assert not on_meta, f"left on meta: {on_meta}"
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert not trainable, f"requires grad: {trainable}"
    assert not model.training


def test_state_dict_keys_and_values_equal_transformers_minus_tied_lm_head(hf_checkpoint):
    hf_model, path = hf_checkpoint
    model = load_model(path)
    ours = model.state_dict()
    theirs = hf_model.state_dict()
    if hf_model.config.tie_word_embeddings:
        del theirs["lm_head.weight"]  # the same tensor as embed_tokens; cotune reuses it
        assert model.lm_head is None
    assert set(ours) == set(theirs)
    changed = [key for key in ours if not torch.equal(ours[key], theirs[key])]
    assert not changed, f"differ from transformers: {changed[:5]}"


# --- 4. clear errors --------------------------------------------------------------------


def test_directory_without_config_json_is_refused(hf_checkpoint):
    _, path = hf_checkpoint
    (path / "config.json").unlink()
    with pytest.raises(ModelConfigError, match="has no config.json"):
        load_model(path)


def test_directory_without_any_weights_is_refused(hf_checkpoint):
    _, path = hf_checkpoint
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelConfigError, match="has no model.safetensors"):
        load_model(path)


UNSUPPORTED_CONFIGS = {
    "model_type-gpt2": (dict(model_type="gpt2"), r"model_type 'gpt2' is not supported"),
    "hidden_act-gelu": (dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported"),
    "rope_type-yarn": (
        dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=10000.0)),
        r"rope scaling type 'yarn' is not supported; accepted: default, linear, llama3"),
    "legacy-rope_scaling-dynamic": (
        dict(rope_parameters=None, rope_theta=10000.0,  # a transformers 4.x config.json
             rope_scaling=dict(type="dynamic", factor=2.0)),
        r"rope scaling type 'dynamic' is not supported"),
    "heads-not-multiple-of-kv-heads": (
        dict(num_attention_heads=4, num_key_value_heads=3),
        r"num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED_CONFIGS))
def test_unsupported_config_is_refused_naming_what_is_accepted(tmp_path, case):
    tiny_hf_model("llama2").save_pretrained(tmp_path)
    changes, message = UNSUPPORTED_CONFIGS[case]
    edit_config(tmp_path, **changes)
    with pytest.raises(ModelConfigError, match=message):
        load_model(tmp_path)


def test_qwen2_with_sliding_window_is_refused(tmp_path):
    tiny_hf_model("qwen2-bias").save_pretrained(tmp_path)
    edit_config(tmp_path, use_sliding_window=True, sliding_window=4)
    with pytest.raises(ModelConfigError, match="use_sliding_window=true .* not supported"):
        load_model(tmp_path)


class _TouchOnUnpickle:
    """Unpickling this creates `path`: proof that a file was opened as a pickle."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "pytorch_model.bin.index.json"])
def test_pickled_weights_are_refused_by_name_and_never_unpickled(hf_checkpoint, tmp_path, name):
    _, path = hf_checkpoint
    (path / "model.safetensors").unlink()
    sentinel = tmp_path / "unpickled"
    (path / name).write_bytes(pickle.dumps(_TouchOnUnpickle(sentinel)))
    with pytest.raises(ModelConfigError, match=f"only as {name} \\(pickle\\), which cotune never"):
        load_model(path)
    assert not sentinel.exists()


def _without_tensor(path: Path, key: str) -> None:
    weights = load_file(path / "model.safetensors")
    del weights[key]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def test_weights_missing_a_tensor_are_refused_naming_it(hf_checkpoint):
    _, path = hf_checkpoint
    _without_tensor(path, "model.layers.1.mlp.down_proj.weight")
    with pytest.raises(ModelConfigError,
                       match=r"missing \['model.layers.1.mlp.down_proj.weight'\], unexpected \[\]"):
        load_model(path)


def test_config_with_more_layers_than_weights_is_refused_naming_missing_keys(hf_checkpoint):
    _, path = hf_checkpoint
    edit_config(path, num_hidden_layers=3)
    with pytest.raises(ModelConfigError,
                       match=r"missing \['model.layers.2\.[^\]]*\], unexpected \[\]"):
        load_model(path)


def test_config_with_fewer_layers_than_weights_is_refused_naming_unexpected_keys(hf_checkpoint):
    _, path = hf_checkpoint
    edit_config(path, num_hidden_layers=1)
    with pytest.raises(ModelConfigError, match=r"missing \[\], unexpected \['model.layers.1\."):
        load_model(path)


def test_weights_of_another_shape_are_refused_naming_key_and_shapes(hf_checkpoint):
    _, path = hf_checkpoint
    edit_config(path, intermediate_size=TINY["intermediate_size"] + 8)
    with pytest.raises(ModelConfigError, match=r"model.layers.0.mlp.down_proj.weight has shape "
                                               r"\(64, 96\), the config expects \(64, 104\)"):
        load_model(path)


# --- 5. config.json of transformers 4.x and 5 -------------------------------------------

LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)


def test_from_hf_reads_llama3_rope_of_transformers_4_and_5_identically():
    base = tiny_config_dict("llama")
    for key in ("rope_parameters", "rope_scaling", "rope_theta"):
        base.pop(key, None)
    v4 = dict(base, rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", **LLAMA3_SCALING))
    v4_legacy = dict(base, rope_theta=500000.0, rope_scaling=dict(type="llama3", **LLAMA3_SCALING))
    v5 = dict(base, rope_parameters=dict(rope_type="llama3", rope_theta=500000.0,
                                         **LLAMA3_SCALING))
    # what transformers 5 itself writes for a config given in the 4.x form
    v5_written = tiny_config_dict(
        "llama", rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", **LLAMA3_SCALING))
    configs = [ModelConfig.from_hf(c) for c in (v4, v4_legacy, v5, v5_written)]
    assert configs[0] == configs[1] == configs[2] == configs[3]
    c = configs[0]
    assert (c.rope_type, c.rope_theta, c.rope_factor) == ("llama3", 500000.0, 8.0)
    assert (c.rope_low_freq_factor, c.rope_high_freq_factor) == (1.0, 4.0)
    assert c.rope_original_max_positions == 8192


def test_from_hf_reads_legacy_linear_rope_scaling():
    config = ModelConfig.from_hf(dict(tiny_config_dict("llama"), rope_parameters=None,
                                      rope_theta=20000.0,
                                      rope_scaling=dict(type="linear", factor=4.0)))
    assert (config.rope_type, config.rope_theta, config.rope_factor) == ("linear", 20000.0, 4.0)


def test_llama_attention_bias_biases_q_k_v_and_o():
    config = ModelConfig.from_hf(tiny_config_dict("llama", attention_bias=True))
    assert (config.qkv_bias, config.o_bias) == (True, True)
    config = ModelConfig.from_hf(tiny_config_dict("llama", attention_bias=False))
    assert (config.qkv_bias, config.o_bias) == (False, False)


def test_qwen2_biases_q_k_v_only_whatever_attention_bias_says():
    # transformers' Qwen2Attention hard-codes bias=True on q, k, v and False on o
    for extra in ({}, dict(attention_bias=False), dict(attention_bias=True)):
        config = ModelConfig.from_hf(dict(tiny_config_dict("qwen2"), **extra))
        assert (config.qkv_bias, config.o_bias) == (True, False), extra


def test_llama_checkpoint_with_attention_bias_matches_transformers(tmp_path, seed):
    config = AutoConfig.for_model("llama", **TINY, attention_bias=True)
    hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # transformers zero-inits biases; make them matter
        for name, p in hf_model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.05)
    hf_model.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.model.layers[0].self_attn.o_proj.bias is not None
    token_ids = torch.randint(0, TINY["vocab_size"], (11,))
    diff = max_diff(cotune_logits(model, token_ids), hf_logits(hf_model, token_ids))
    assert diff <= ATOL32, f"max |diff| {diff:.2e} (seed {seed})"


def test_qwen2_checkpoint_whose_config_sets_attention_bias_loads_like_transformers(tmp_path,
                                                                                   seed):
    hf_model = tiny_hf_model("qwen2-bias")
    hf_model.save_pretrained(tmp_path)
    edit_config(tmp_path, attention_bias=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    token_ids = torch.randint(0, TINY["vocab_size"], (11,))
    diff = max_diff(cotune_logits(load_model(tmp_path), token_ids),
                    hf_logits(reloaded, token_ids))
    assert diff <= ATOL32, f"max |diff| {diff:.2e} (seed {seed})"


# --- 6. rotary frequencies --------------------------------------------------------------

ROPE_PARAMETERS = {
    "default": dict(rope_type="default", rope_theta=10000.0),
    "linear": dict(rope_type="linear", factor=4.0, rope_theta=10000.0),
    "llama3": dict(rope_type="llama3", rope_theta=500000.0, **LLAMA3_SCALING),
}


def transformers_inverse_frequencies(hf_config) -> torch.Tensor:
    rope_type = hf_config.rope_parameters["rope_type"]
    if rope_type == "default":  # transformers 5 keeps the default in each model's rotary class
        return LlamaRotaryEmbedding.compute_default_rope_parameters(hf_config)[0]
    return ROPE_INIT_FUNCTIONS[rope_type](hf_config)[0]


@pytest.mark.parametrize("rope_type", list(ROPE_PARAMETERS))
def test_inverse_frequencies_equal_transformers_rope_init(rope_type):
    # Llama 3.1 8B's shape: head_dim 128 spans all three llama3 bands
    hf_config = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                            rope_parameters=dict(ROPE_PARAMETERS[rope_type]))
    ours = inverse_frequencies(ModelConfig.from_hf(hf_config.to_dict()))
    theirs = transformers_inverse_frequencies(hf_config)
    assert ours.dtype == torch.float32 and ours.shape == (64,)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_llama3_frequencies_cover_kept_smoothed_and_slowed_bands():
    # guards the test above: a llama3 case that missed a band would not check its branch
    config = ModelConfig.from_hf(LlamaConfig(
        hidden_size=4096, num_attention_heads=32,
        rope_parameters=dict(ROPE_PARAMETERS["llama3"])).to_dict())
    unscaled = inverse_frequencies(ModelConfig.from_hf(LlamaConfig(
        hidden_size=4096, num_attention_heads=32,
        rope_parameters=dict(rope_type="default", rope_theta=500000.0)).to_dict()))
    ratio = unscaled / inverse_frequencies(config)  # 1 kept, 8 slowed, between smoothed
    kept, slowed = ratio.isclose(torch.tensor(1.0)), ratio.isclose(torch.tensor(8.0))
    assert kept.any() and slowed.any() and (~kept & ~slowed).any()


# --- 7. sliding window over a KV cache --------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3])
def test_sliding_window_decode_beyond_window_matches_transformers_at_every_position(
        tmp_path, seed, chunk):
    hf_model = tiny_hf_model("mistral-window")
    window = hf_model.config.sliding_window
    assert window == 5
    hf_model.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    token_ids = torch.randint(0, TINY["vocab_size"], (12,))

    want = hf_logits(hf_model, token_ids)
    hf_model.config.sliding_window = None
    unwindowed = hf_logits(hf_model, token_ids)
    # the window changes every position past it: without it this test would check nothing
    assert max_diff(want[window:], unwindowed[window:]) > 100 * ATOL32

    cache = PagedKVCache(model.config, num_blocks=8, block_size=2)
    got = []
    with torch.no_grad():
        for start in range(0, len(token_ids), chunk):  # fed `chunk` tokens at a time
            new = token_ids[start:start + chunk]
            assert cache.reserve("seq", len(new))
            paged = PagedBatch(cache, ["seq"], [len(new)])
            got.append(model.logits(model(ForwardBatch(new, [len(new)], kv=paged))))
            cache.commit("seq", len(new))
    got = torch.cat(got)
    assert cache.lengths["seq"] == len(token_ids)
    diffs = (got - want).abs().amax(dim=-1)  # (12,) per position
    assert diffs.max().item() <= ATOL32, f"per-position max |diff| {diffs.tolist()} (seed {seed})"
