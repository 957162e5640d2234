"""Hugging Face PEFT's LoRA format on disk: adapter_config.json + adapter_model.safetensors.

An adapter is a directory. Its weights are named by PEFT's keys,
`base_model.model.<module path>.lora_A.weight` of shape (r, in_features) and
`base_model.model.<module path>.lora_B.weight` of shape (out_features, r), and a module's delta
is `y += scale * x @ A.T @ B.T`. Adapters move freely between cotune, PEFT and vLLM.

Weights are read from safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from cotune import bounded_json
from cotune.adapters.durable import fsync, write_synced
from cotune.adapters.safetensors_header import (
    Header,
    HeaderError,
    TensorInfo,
    check_extent,
    read_header,
)
from cotune.adapters.validation import (
    AdapterError,
    AdapterMismatch,
    check_config,
    check_targets_exist,
    describe_base,
    is_targeted,
    module_rank,
    module_scale,
)

__all__ = ["AdapterError", "AdapterMismatch", "LoraAdapter", "LoraModule", "load_peft_adapter",
           "save_peft_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\."
                       r"(?:lora_(?P<factor>[AB])\.weight|(?P<magnitude>lora_magnitude_vector))")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_ACCEPTED_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}  # safetensors' names: bytes per item
# The largest entry of a module's delta, scale * B @ A, accepted in magnitude. A base's weights
# are of order 1 and less, trained deltas far smaller; weights multiplied by 1e30 passed the
# finiteness check and turned every row of their adapter into NaN.
MAX_DELTA_ENTRY = 1000.0


@dataclass(frozen=True, eq=False)
class LoraModule:
    """The LoRA of one base module: delta(x) = scale * x @ a.T @ b.T."""

    a: torch.Tensor  # (r, in_features), float32, contiguous
    b: torch.Tensor  # (out_features, r), float32, contiguous
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (per module)
    # DoRA's magnitude m (out_features,), float32, for an adapter with use_dora: the module's
    # output is then m / ||W + scale B A|| (each output row's norm) times that of W + scale B A
    magnitude: torch.Tensor | None = None


@dataclass(frozen=True)
class LoraAdapter:
    modules: dict[str, LoraModule]  # key: the base module's path, "model.layers.0.self_attn.q_proj"
    config: dict  # adapter_config.json as read (or as will be written)

    @property
    def max_rank(self) -> int:
        return max((m.a.shape[0] for m in self.modules.values()), default=0)


def load_peft_adapter(path: str | Path, base_modules: Mapping[str, tuple[int, int]],
                      max_rank: int) -> LoraAdapter:
    """Reads the PEFT LoRA adapter in directory `path`, or raises AdapterError.

    base_modules maps each base module path that can carry LoRA (e.g.
    'model.layers.0.self_attn.q_proj') to (in_features, out_features). The adapter is complete
    or refused: nothing is half-loaded, and the directory is only read. Every check of the
    weights' names, dtypes, shapes and ranks is made on the safetensors header, before any
    tensor is read: a refused adapter costs the memory of its header, whatever its size.
    """
    where = str(path)
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter {where} does not exist or is not a directory; accepted: a "
                           f"directory with {CONFIG_NAME} and {WEIGHTS_NAME}")
    config = _read_config(path, where)
    _refuse_pickles(path, where)
    check_config(config, where)
    check_targets_exist(config, base_modules, where)
    weights = _weights_file(path, where)
    header = _read_header(weights, where)
    described = _lora_factors(header.tensors, config, where)
    _check_module_set(config, described, base_modules, where)
    for name, (a, b, magnitude) in described.items():
        _check_factors(config, name, a, b, base_modules[name], where)
        if magnitude is not None:
            _check_magnitude(name, magnitude, base_modules[name][1], where)
    _check_max_rank(described, max_rank, where)
    _check_extent(weights, header, where)
    factors = _read_factors(weights, described, where)
    return LoraAdapter(modules=_float32_modules(config, factors, where), config=config)


def _read_config(path: Path, where: str) -> dict:
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(f"adapter {where} has no {CONFIG_NAME}; accepted: a PEFT adapter "
                           f"directory with {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = bounded_json.loads(config_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"adapter {where} has an invalid {CONFIG_NAME} ({e}); accepted: a "
                           "JSON object as PEFT's save_pretrained writes it") from None
    except bounded_json.NestedTooDeeply as e:
        raise AdapterError(f"adapter {where} has an invalid {CONFIG_NAME}: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {where} has a {CONFIG_NAME} that is not a JSON object; "
                           "accepted: a JSON object as PEFT's save_pretrained writes it")
    return config


def _refuse_pickles(path: Path, where: str) -> None:
    # a pickle can run any code when loaded, so it is refused by name and never opened
    for child in sorted(path.iterdir()):
        if child.suffix.lower() in _PICKLE_SUFFIXES:
            raise AdapterError(
                f"adapter {where} contains {child.name}, a pickle weights file; cotune never "
                f"unpickles files; accepted: weights in {WEIGHTS_NAME} only (PEFT writes it by "
                "default; convert a pickled adapter with PEFT where you trust it)")


def _weights_file(path: Path, where: str) -> Path:
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterError(f"adapter {where} has no {WEIGHTS_NAME}; accepted: LoRA weights in "
                           f"{WEIGHTS_NAME} as PEFT's save_pretrained writes them")
    return weights


def _read_header(weights: Path, where: str) -> Header:
    try:
        return read_header(weights)
    except HeaderError as e:
        raise _not_safetensors(weights, where, str(e)) from None


def _check_extent(weights: Path, header: Header, where: str) -> None:
    """The file holds the checked tensors and nothing more (of accepted dtypes by now)."""
    try:
        check_extent(header, _ACCEPTED_DTYPES)
    except HeaderError as e:
        raise _not_safetensors(weights, where, str(e)) from None


def _read_factors(weights: Path, described: Mapping[str, tuple], where: str
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """The tensors of the checked header: {module path: (lora_A, lora_B, magnitude or
    None)}."""
    try:
        # parses a header and copies bytes; runs no code (reading the file whole is 3x faster
        # than load_file's mapping for adapters of kilobytes to megabytes)
        tensors = load(weights.read_bytes())
    except SafetensorError as e:
        raise _not_safetensors(weights, where, str(e)) from None
    return {name: (tensors[_key(name, "A")], tensors[_key(name, "B")],
                   tensors.get(_magnitude_key(name))) for name in described}


def _not_safetensors(weights: Path, where: str, reason: str) -> AdapterError:
    with open(weights, "rb") as f:
        head = f.read(4)
    if head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, a raw pickle
        return AdapterError(
            f"adapter {where} has a {WEIGHTS_NAME} that is a pickle (torch.save) file, not "
            "safetensors; cotune never unpickles files; accepted: a real safetensors file as "
            "PEFT's save_pretrained writes it")
    return AdapterError(f"adapter {where} has a {WEIGHTS_NAME} that is not a valid safetensors "
                        f"file ({reason}); accepted: a safetensors file as PEFT's "
                        "save_pretrained writes it")


def _lora_factors(tensors: Mapping[str, TensorInfo], config: dict,
                  where: str) -> dict[str, tuple[TensorInfo, TensorInfo, TensorInfo | None]]:
    """Groups PEFT's keys by module path: {path: (lora_A, lora_B, DoRA magnitude or None)};
    refuses any other key, and a magnitude where the config has no use_dora (or none where
    it has)."""
    found: dict[str, dict[str, TensorInfo]] = {}
    unknown = []
    dora = config.get("use_dora") is True
    for key, tensor in tensors.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None or (match["magnitude"] and not dora):
            unknown.append(key)
        else:
            found.setdefault(match["module"], {})[match["factor"] or "M"] = tensor
    if unknown:
        shown = ", ".join(f"{k!r} ({_what_is(k)})" for k in sorted(unknown)[:3])
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise AdapterError(
            f"adapter {where} has tensors that are not plain LoRA weights: {shown}{more}; "
            f"accepted: only '{KEY_PREFIX}<module>.lora_A.weight' and "
            f"'{KEY_PREFIX}<module>.lora_B.weight'"
            + (f", and '{KEY_PREFIX}<module>.lora_magnitude_vector' with use_dora" if not dora
               else ""))
    for module, factors in found.items():
        missing = [f"lora_{f}" for f in ("A", "B") if f not in factors]
        if missing:
            present = "lora_A" if "A" in factors else "lora_B" if "B" in factors \
                else "a DoRA magnitude"
            raise AdapterError(
                f"adapter {where} has {present} but no {' or '.join(missing)} for module "
                f"{module!r}; accepted: both lora_A and lora_B for every module")
        if dora and "M" not in factors:
            raise AdapterError(
                f"adapter {where} has use_dora but no lora_magnitude_vector for module "
                f"{module!r}; accepted: a DoRA magnitude for every module of a DoRA adapter")
    return {module: (f["A"], f["B"], f.get("M")) for module, f in sorted(found.items())}


def _what_is(key: str) -> str:
    if "lora_magnitude_vector" in key:
        return "a DoRA magnitude"
    if "lora_embedding_" in key:
        return "LoRA of an embedding"
    if key.endswith("bias"):
        return "a bias"
    if ".lora_" in key:
        return "not a lora_A/lora_B weight"
    return "a full weight, e.g. from modules_to_save or a resized embedding"


def _check_module_set(config: dict, factors: Mapping, base_modules: Mapping, where: str) -> None:
    """The weights hold exactly the base modules that the config targets."""
    for name in factors:
        if name not in base_modules:
            raise AdapterMismatch(
                f"adapter {where} targets module {name!r} which the base model does not have; "
                f"{describe_base(base_modules)}")
        if not is_targeted(config, name):
            raise AdapterError(
                f"adapter {where} has weights for module {name!r} but its target_modules do not "
                "select it (PEFT would ignore them); accepted: weights for exactly the modules "
                "that adapter_config.json targets")
    for name in base_modules:
        if is_targeted(config, name) and name not in factors:
            raise AdapterError(
                f"adapter {where} targets module {name!r} in adapter_config.json but "
                f"{WEIGHTS_NAME} has no lora_A/lora_B for it; accepted: weights for exactly the "
                "modules that adapter_config.json targets")
    if not factors:
        raise AdapterError(f"adapter {where} has no LoRA weights; accepted: at least one module")


def _check_factors(config: dict, name: str, a: TensorInfo, b: TensorInfo,
                   features: tuple[int, int], where: str) -> None:
    in_features, out_features = features
    for factor, tensor in (("A", a), ("B", b)):
        if tensor.dtype not in _ACCEPTED_DTYPES:
            raise AdapterError(
                f"adapter {where}: tensor {_key(name, factor)!r} has dtype "
                f"{tensor.dtype_name}; accepted: float32, float16, bfloat16 (quantised adapters "
                "are not supported)")
    if len(a.shape) != 2 or a.shape[1] != in_features:
        raise AdapterMismatch(
            f"adapter {where}: lora_A of module {name!r} has shape {a.shape}, but the base "
            f"module has in_features={in_features}; accepted: (r, {in_features})")
    if len(b.shape) != 2 or b.shape[0] != out_features:
        raise AdapterMismatch(
            f"adapter {where}: lora_B of module {name!r} has shape {b.shape}, but the base "
            f"module has out_features={out_features}; accepted: ({out_features}, r)")
    r = a.shape[0]
    if b.shape[1] != r:
        raise AdapterError(
            f"adapter {where}: module {name!r} has lora_A of rank {r} but lora_B of rank "
            f"{b.shape[1]}; accepted: lora_A (r, in_features) and lora_B (out_features, r)")
    if r != module_rank(config, name):
        raise AdapterError(
            f"adapter {where}: module {name!r} has rank {r} in {WEIGHTS_NAME} but rank "
            f"{module_rank(config, name)} by adapter_config.json (r, rank_pattern); accepted: "
            "the same rank in both")


def _check_magnitude(name: str, magnitude: TensorInfo, out_features: int, where: str) -> None:
    if magnitude.dtype not in _ACCEPTED_DTYPES or tuple(magnitude.shape) != (out_features,):
        raise AdapterMismatch(
            f"adapter {where}: the DoRA magnitude of module {name!r} is {magnitude.dtype_name} "
            f"{tuple(magnitude.shape)}; accepted: ({out_features},) float32, float16 or "
            "bfloat16, one per output feature")


def _check_max_rank(factors: Mapping[str, tuple], max_rank: int, where: str) -> None:
    rank = max(factors[0].shape[0] for factors in factors.values())
    if rank > max_rank:
        raise AdapterMismatch(
            f"adapter {where} has rank {rank}, which exceeds max_rank {max_rank} of this "
            f"server; lower the rank to at most {max_rank} or start the server with "
            f"--max-rank {rank}")


def _float32_modules(config: dict, factors: Mapping[str, tuple], where: str
                     ) -> dict[str, LoraModule]:
    """The checked factors (and DoRA magnitudes) as float32 views of one new buffer, all
    checked finite at once (a few ops per adapter instead of a few per tensor: loads run
    beside the engine)."""
    keys, tensors = [], []
    for name, (a, b, magnitude) in factors.items():
        keys += [_key(name, "A"), _key(name, "B")]
        tensors += [a, b]
        if magnitude is not None:
            keys.append(_magnitude_key(name))
            tensors.append(magnitude)
    buffer = torch.empty(sum(t.numel() for t in tensors), dtype=torch.float32)
    views, offset = {}, 0
    for key, tensor in zip(keys, tensors):
        views[key] = buffer[offset:offset + tensor.numel()].view(tensor.shape)
        views[key].copy_(tensor)
        offset += tensor.numel()
    if not torch.isfinite(buffer).all():
        bad = next(key for key, view in views.items() if not torch.isfinite(view).all())
        raise AdapterError(f"adapter {where}: tensor {bad!r} contains NaN or Inf; accepted: "
                           "finite values only")
    modules = {name: LoraModule(a=views[_key(name, "A")], b=views[_key(name, "B")],
                                scale=module_scale(config, name),
                                magnitude=views.get(_magnitude_key(name)))
               for name in factors}
    for name, module in modules.items():
        _check_delta(name, module, where)
    return modules


def _check_delta(name: str, module: LoraModule, where: str) -> None:
    """Refuses a module whose delta has an entry past MAX_DELTA_ENTRY. Each entry of B @ A is
    at most (its row of B's norm) x (its column of A's norm), a bound of O(r (in + out)); the
    product itself is formed only where that bound is passed."""
    bound = abs(module.scale) * float(torch.linalg.vector_norm(module.b, dim=1).max()) \
        * float(torch.linalg.vector_norm(module.a, dim=0).max())
    if bound <= MAX_DELTA_ENTRY:
        return
    largest = abs(module.scale) * float((module.b @ module.a).abs().max())
    if largest > MAX_DELTA_ENTRY:
        raise AdapterError(
            f"adapter {where}: module {name!r} has a delta (scale x lora_B @ lora_A) with an "
            f"entry of {largest:.3g}; accepted: entries of at most {MAX_DELTA_ENTRY:g} in "
            "magnitude (the base's weights are of order 1)")


def _key(module: str, factor: str) -> str:
    return f"{KEY_PREFIX}{module}.lora_{factor}.weight"


def _magnitude_key(module: str) -> str:
    return f"{KEY_PREFIX}{module}.lora_magnitude_vector"


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=torch.float32,
                              memory_format=torch.contiguous_format, copy=True)


def save_peft_adapter(adapter: LoraAdapter, path: str | Path) -> None:
    """Writes adapter_config.json + adapter_model.safetensors atomically (temp dir beside path,
    fsync files, rename), loadable by peft.PeftModel.from_pretrained.

    Refuses (AdapterError) an adapter whose config would not give PEFT the same ranks and
    scales, and (FileExistsError) a path that exists: a published version is never rewritten.
    """
    where = str(path)
    path = Path(path)
    tensors = _tensors_to_save(adapter, where)
    config_bytes = json.dumps(adapter.config, indent=2, sort_keys=True).encode("utf-8")
    if path.exists():
        raise FileExistsError(f"{where} already exists; an adapter is written once, to a new path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the adapter is for any reader
        write_synced(tmp / CONFIG_NAME, config_bytes)
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        fsync(tmp / WEIGHTS_NAME)
        fsync(tmp)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync(path.parent)


def _tensors_to_save(adapter: LoraAdapter, where: str) -> dict[str, torch.Tensor]:
    config = adapter.config
    check_config(config, where)
    if not adapter.modules:
        raise AdapterError(f"adapter {where} has no LoRA modules; accepted: at least one module")
    tensors = {}
    for name, module in adapter.modules.items():
        _check_module_to_save(config, name, module, where)
        tensors[_key(name, "A")] = _float32(module.a)
        tensors[_key(name, "B")] = _float32(module.b)
        if module.magnitude is not None:
            tensors[_magnitude_key(name)] = _float32(module.magnitude)
    return tensors


def _check_module_to_save(config: dict, name: str, module: LoraModule, where: str) -> None:
    a, b = module.a, module.b
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise AdapterError(
            f"adapter {where}: module {name!r} has a {tuple(a.shape)} and b {tuple(b.shape)}; "
            "accepted: a (r, in_features) and b (out_features, r)")
    if not is_targeted(config, name):
        raise AdapterError(
            f"adapter {where}: module {name!r} is not selected by the config's target_modules, "
            "so PEFT would not load it; accepted: a config that targets every module")
    rank, scale = module_rank(config, name), module_scale(config, name)
    if a.shape[0] != rank or not math.isclose(module.scale, scale, rel_tol=1e-6):
        raise AdapterError(
            f"adapter {where}: module {name!r} has rank {a.shape[0]} and scale {module.scale}, "
            f"but its config gives rank {rank} and scale {scale}; accepted: r, lora_alpha, "
            "use_rslora, rank_pattern and alpha_pattern that give each module its rank and scale")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdapterError(
            f"adapter {where}: module {name!r} contains NaN or Inf; accepted: finite values only")
    dora = config.get("use_dora") is True
    if dora != (module.magnitude is not None):
        raise AdapterError(
            f"adapter {where}: module {name!r} {'lacks' if dora else 'has'} a DoRA magnitude "
            f"but the config's use_dora is {dora}; accepted: a magnitude for every module "
            "exactly when use_dora is true")
    if module.magnitude is not None and (tuple(module.magnitude.shape) != (b.shape[0],)
                                         or not torch.isfinite(module.magnitude).all()):
        raise AdapterError(
            f"adapter {where}: module {name!r} has a DoRA magnitude of shape "
            f"{tuple(module.magnitude.shape)}; accepted: ({b.shape[0]},) finite values")
