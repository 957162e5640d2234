"""Convert a GGUF file of a Llama-family model into a Hugging Face checkpoint directory.

The embedded default model ships as a quantized GGUF file. Dequantizing it on every start
would cost tens of seconds, so it is converted once into an ordinary float32 checkpoint
(`config.json`, `model.safetensors`, tokenizer files) that the loader reads like any other,
and kept in a cache keyed by the file's identity.

The tensors are read with the `gguf` package directly; only the tokenizer goes through
transformers, whose GGUF tokenizer converter is the reference for that part.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, Keys
from gguf.quants import dequantize
from safetensors.numpy import save_file

from cotune.model.gguf_int4 import INT4_FILE, block_levels, to_file

# Bump when the output of the converter changes, so that stale cache entries are not reused.
CONVERTER_VERSION = 3  # 3: the 4-bit blocks kept (gguf_int4)

# `general.architecture` values whose tensors map one to one onto transformers' Llama.
# llama.cpp writes Mistral and other Llama derivatives under "llama" too.
LLAMA_ARCHITECTURES = ("llama",)

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_TENSOR_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_REQUIRED = object()  # default of `_field` for metadata that must be present


class UnsupportedGGUFError(ValueError):
    """The file is not a GGUF this converter can turn into a Llama checkpoint."""


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert `gguf_path` into a new Hugging Face checkpoint directory `out_dir`.

    The checkpoint is written into a temporary sibling directory and renamed into place, so
    `out_dir` either does not exist or is complete, even if the process dies half-way.
    Raises FileExistsError if `out_dir` exists (also when a concurrent writer published it
    first), FileNotFoundError if the GGUF file is missing, UnsupportedGGUFError if it is not
    a Llama-family model.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        _write_checkpoint(gguf_path, tmp)
        _make_world_readable(tmp)
        try:
            tmp.rename(out_dir)  # atomic; refuses to replace a directory that is not empty
        except OSError as e:
            if out_dir.exists():
                raise FileExistsError(f"{out_dir} was published by another writer") from e
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def cached_checkpoint(gguf_path: Path, cache_root: Path | None = None) -> Path:
    """Return the converted checkpoint of `gguf_path`, converting it on the first call only.

    Entries live in `cache_root / "models" / <key>`; see `cache_key` for what the key covers.
    Publishing is atomic, so an existing entry is always complete and is returned as is.
    """
    gguf_path = Path(gguf_path)
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    entry = root / "models" / cache_key(gguf_path)
    if entry.is_dir():
        return entry
    try:
        return convert_gguf(gguf_path, entry)
    except FileExistsError:
        return entry  # another process converted the same file at the same time


def default_cache_root() -> Path:
    """The cache directory: `$COTUNE_CACHE_DIR`, else `~/.cache/cotune`."""
    configured = os.environ.get("COTUNE_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "cotune"


def cache_key(gguf_path: Path) -> str:
    """Name of the cache entry of `gguf_path`: readable stem plus a hash of its identity.

    The identity is the file's name, size and modification time (plus the converter version):
    cheap to compute even for files of many gigabytes, and any rewrite of the file changes it.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    stat = gguf_path.stat()
    identity = f"v{CONVERTER_VERSION}:{gguf_path.name}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return f"{gguf_path.stem}-{digest}"


def _write_checkpoint(gguf_path: Path, out_dir: Path) -> None:
    """Write config, weights and tokenizer of `gguf_path` into the existing `out_dir`."""
    reader = _open_reader(gguf_path)
    config = _llama_config(reader, gguf_path)
    tensors = _convert_tensors(reader, config, gguf_path)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    int4 = _int4_tensors(reader, config)
    if int4:
        (out_dir / INT4_FILE).parent.mkdir()
        save_file(int4, out_dir / INT4_FILE, metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _save_tokenizer(gguf_path, out_dir)


def _make_world_readable(out_dir: Path) -> None:
    """mkdtemp and safetensors create owner-only entries; a shared cache (say, one filled at
    image build time by another user) must be readable by every user that serves from it."""
    for path in [out_dir, *out_dir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def _open_reader(gguf_path: Path) -> GGUFReader:
    """Open the file memory-mapped, turning the reader's bare errors into ones naming it."""
    try:
        reader = GGUFReader(gguf_path)
    except ValueError as e:
        raise UnsupportedGGUFError(f"{gguf_path} is not a readable GGUF file: {e}") from e
    arch = _field(reader, Keys.General.ARCHITECTURE, gguf_path)
    if arch not in LLAMA_ARCHITECTURES:
        raise UnsupportedGGUFError(
            f"{gguf_path} holds a {arch!r} model; only Llama-family GGUF files "
            f"(general.architecture in {LLAMA_ARCHITECTURES}) can be converted"
        )
    return reader


def _field(reader: GGUFReader, key: str, gguf_path: Path, default: Any = _REQUIRED) -> Any:
    """The value of metadata `key`; an error naming the key when it is required and absent."""
    field = reader.get_field(key)
    if field is not None:
        return field.contents()
    if default is _REQUIRED:
        raise UnsupportedGGUFError(f"{gguf_path} lacks the metadata key {key!r}")
    return default


def _llama_config(reader: GGUFReader, gguf_path: Path) -> dict[str, Any]:
    """A transformers LlamaConfig dict built from the GGUF metadata."""
    arch = _field(reader, Keys.General.ARCHITECTURE, gguf_path)

    def field(template: str, default: Any = _REQUIRED) -> Any:
        return _field(reader, template.format(arch=arch), gguf_path, default)

    hidden_size = field(Keys.LLM.EMBEDDING_LENGTH)
    num_heads = field(Keys.Attention.HEAD_COUNT)
    # key_length is the head size when written; llama.cpp otherwise takes the rotary width,
    # which equals the head size in every Llama-family model.
    head_dim = field(Keys.Attention.KEY_LENGTH, field(Keys.Rope.DIMENSION_COUNT, None))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden_size,
        "intermediate_size": field(Keys.LLM.FEED_FORWARD_LENGTH),
        "num_hidden_layers": field(Keys.LLM.BLOCK_COUNT),
        "num_attention_heads": num_heads,
        "num_key_value_heads": field(Keys.Attention.HEAD_COUNT_KV, num_heads),
        "head_dim": head_dim if head_dim is not None else hidden_size // num_heads,
        "hidden_act": "silu",
        "rms_norm_eps": field(Keys.Attention.LAYERNORM_RMS_EPS),
        "rope_theta": field(Keys.Rope.FREQ_BASE, 10000.0),
        "max_position_embeddings": field(Keys.LLM.CONTEXT_LENGTH),
        "vocab_size": field(Keys.LLM.VOCAB_SIZE, None) or _vocab_size(reader, gguf_path),
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": _field(reader, Keys.Tokenizer.BOS_ID, gguf_path, None),
        "eos_token_id": _field(reader, Keys.Tokenizer.EOS_ID, gguf_path, None),
        "pad_token_id": _field(reader, Keys.Tokenizer.PAD_ID, gguf_path, None),
        "torch_dtype": "float32",
    }
    rope_scaling = _rope_scaling(reader, arch, gguf_path)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _vocab_size(reader: GGUFReader, gguf_path: Path) -> int:
    """Older files omit `<arch>.vocab_size`; the token list has one entry per id."""
    tokens = reader.get_field(Keys.Tokenizer.LIST)
    if tokens is None:
        raise UnsupportedGGUFError(f"{gguf_path} has neither a vocab_size nor a token list")
    return len(tokens.data)


def _rope_scaling(reader: GGUFReader, arch: str, gguf_path: Path) -> dict[str, Any] | None:
    """The transformers `rope_scaling` dict of the file's rotary scaling, None when unscaled."""

    def field(template: str, default: Any = None) -> Any:
        return _field(reader, template.format(arch=arch), gguf_path, default)

    kind = field(Keys.Rope.SCALING_TYPE, "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(field(Keys.Rope.SCALING_FACTOR))}
    if kind == "yarn":
        scaling = {
            "rope_type": "yarn",
            "factor": float(field(Keys.Rope.SCALING_FACTOR)),
            "original_max_position_embeddings": field(Keys.Rope.SCALING_ORIG_CTX_LEN),
        }
        for name, template in [
            ("beta_fast", Keys.Rope.SCALING_YARN_BETA_FAST),
            ("beta_slow", Keys.Rope.SCALING_YARN_BETA_SLOW),
        ]:
            if (value := field(template)) is not None:
                scaling[name] = float(value)
        return scaling
    raise UnsupportedGGUFError(
        f"{gguf_path} uses rope scaling {kind!r}; only 'none', 'linear' and 'yarn' are supported"
    )


def _hf_tensor_name(gguf_name: str) -> str | None:
    """The transformers Llama name of GGUF tensor `gguf_name`, None when it has none."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_TENSOR_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _BLOCK_TENSORS:
        return None
    return f"model.layers.{match.group(1)}.{_BLOCK_TENSORS[match.group(2)]}.weight"


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor a transformers Llama of `config` loads, with its shape (out, in)."""
    d, ff, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q_dim, kv_dim = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {
        "model.embed_tokens.weight": (config["vocab_size"], d),
        "model.norm.weight": (d,),
    }
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], d)
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes |= {
            f"{layer}.self_attn.q_proj.weight": (q_dim, d),
            f"{layer}.self_attn.k_proj.weight": (kv_dim, d),
            f"{layer}.self_attn.v_proj.weight": (kv_dim, d),
            f"{layer}.self_attn.o_proj.weight": (d, q_dim),
            f"{layer}.mlp.gate_proj.weight": (ff, d),
            f"{layer}.mlp.up_proj.weight": (ff, d),
            f"{layer}.mlp.down_proj.weight": (d, ff),
            f"{layer}.input_layernorm.weight": (d,),
            f"{layer}.post_attention_layernorm.weight": (d,),
        }
    return shapes


def _unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of the q/k projection rows for its rotary kernel.

    transformers rotates the two halves of each head's rows against each other
    (`rotate_half`); ggml rotates adjacent pairs. llama.cpp's converter therefore maps each
    head's rows (2, head_dim/2) -> (head_dim/2, 2) (`w.reshape(n, 2, hd/2, d).swapaxes(1, 2)`);
    this is its inverse, the same as transformers' GGUF loader applies.
    """
    rows, *rest = w.shape
    w = w.reshape(n_heads, rows // n_heads // 2, 2, *rest)  # (n, hd/2, 2, d)
    return np.ascontiguousarray(w.swapaxes(1, 2).reshape(rows, *rest))  # (n * hd, d)


def _convert_tensors(
    reader: GGUFReader, config: dict[str, Any], gguf_path: Path
) -> dict[str, np.ndarray]:
    """Dequantize every tensor to float32 under its transformers name, checking shapes."""
    expected = _expected_shapes(config)
    heads_of = {
        "q_proj": config["num_attention_heads"],
        "k_proj": config["num_key_value_heads"],
    }
    tensors = {}
    for tensor in reader.tensors:
        name = _hf_tensor_name(tensor.name)
        if name is None:
            raise UnsupportedGGUFError(
                f"{gguf_path}: tensor {tensor.name!r} has no counterpart in a transformers Llama "
                "(biases, rope_freqs and other extras are not supported)"
            )
        w = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        if w.shape != expected.get(name):
            raise UnsupportedGGUFError(
                f"{gguf_path}: tensor {tensor.name!r} has shape {w.shape}, but the metadata "
                f"implies {expected.get(name)} for {name}"
            )
        proj = name.split(".")[-2]
        if proj in heads_of:
            w = _unpermute_rotary(w, heads_of[proj])
        tensors[name] = np.ascontiguousarray(w)
    missing = sorted(expected.keys() - tensors.keys())
    if missing:
        raise UnsupportedGGUFError(f"{gguf_path} lacks the tensors for {', '.join(missing)}")
    return tensors


def _int4_tensors(reader: GGUFReader, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """The 4-bit blocks of the projections stored in them (gguf_int4), rows in transformers'
    order, by the weights' transformers names; the shapes were checked by _convert_tensors."""
    heads_of = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    kept, projections = {}, _projection_names(config)
    for tensor in reader.tensors:
        name = _hf_tensor_name(tensor.name)
        blocks = None if name not in projections else \
            block_levels(tensor.data, tensor.tensor_type)
        if blocks is None:
            continue
        proj = name.split(".")[-2]
        if proj in heads_of:
            blocks = tuple(_unpermute_rotary(part, heads_of[proj]) for part in blocks)
        kept |= to_file(*blocks, name)
    return kept


def _projection_names(config: dict[str, Any]) -> set[str]:
    return {name for name in _expected_shapes(config) if name.startswith("model.layers.")
            and name.split(".")[-2].endswith("_proj")}


def _save_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """Rebuild the tokenizer (vocab, merges, special tokens, chat template) with transformers.

    The chat template goes into tokenizer_config.json rather than a separate .jinja file:
    every reader of Hugging Face checkpoints, old or new, looks for it there.
    """
    from transformers import AutoTokenizer  # slow import, needed only while converting

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
