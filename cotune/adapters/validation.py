"""What an adapter_config.json means, by PEFT's own rules, and which of its options cotune refuses.

The rules mirror peft 0.21: `LoraConfig` (tuners/lora/config.py), `check_target_module_exists`
(tuners/tuners_utils.py), `get_pattern_key` (utils/other.py) and `LoraLayer.update_layer`
(tuners/lora/layer.py). Every refusal says what is wrong and what is accepted.

The regexes of a config come from tenants, so they are matched by RE2, in time linear in the
module path: Python's `re` backtracks, and a pattern like `(.*.*)*Z` held the server for a
minute. RE2 has no lookaround and no backreferences; a config that uses them is refused.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable

import re2

# The options whose non-default value changes the math of the LoRA delta (or adds parameters
# cotune does not hold), with the values accepted and the reason. Defaults are PEFT's.
_UNSUPPORTED_OPTIONS: dict[str, tuple[tuple, str]] = {
    "modules_to_save": ((None, []), "full copies of base modules cannot share the one base"),
    "fan_in_fan_out": ((False,), "cotune's bases store weights as (out_features, in_features)"),
    "bias": (("none",), "trained biases of the base are not part of a LoRA delta"),
    "lora_bias": ((False,), "a bias on lora_B is not supported"),
    "target_parameters": ((None, []), "LoRA on raw parameters (MoE experts) is not supported"),
    "layer_replication": ((None, []), "replicated layers change the base model itself"),
    "use_qalora": ((False,), "QALoRA pools the input before lora_A"),
    "trainable_token_indices": ((None,), "trainable embedding rows are not supported"),
    "megatron_config": ((None,), "Megatron-parallel LoRA layers are not supported"),
    "alora_invocation_tokens": ((None,), "activated LoRA (aLoRA) applies only after its tokens"),
    "velora_config": ((None,), "VeLoRA stores extra state and approximates the backward pass"),
    "monteclora_config": ((None,), "MonteCLoRA samples perturbations of the weights"),
    "use_bdlora": ((None,), "block-diagonal LoRA (BD-LoRA) is not supported"),
    "arrow_config": ((None,), "Arrow routing between experts is not supported"),
    "kasa_config": ((None,), "KaSA inserts singular values between A and B and changes the base"),
}

# The options cotune reads and honours below.
_HONOURED_OPTIONS = frozenset({
    "peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "init_lora_weights",
    "use_dora",
})

# Options that leave the math of a saved adapter alone: metadata, training-time settings, and
# settings that only matter together with an option checked above.
_INERT_OPTIONS = frozenset({
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "lora_dropout", "runtime_config", "ensure_weight_tying", "megatron_core",
    "qalora_group_size", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
})

# Initialisations (besides true and false) whose weights are saved as they are; the residual
# ones change the base weights, so their LoRA alone is not the adapter.
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica")
_RESIDUAL_INIT_PREFIXES = ("pissa", "olora", "corda", "loftq", "lora_ga")

# The largest lora_alpha accepted, in magnitude. PEFT sets no limit, but a scale past it only
# ever turns outputs into overflow (an alpha of 1e308 stopped an engine that multiplied by it);
# trained adapters use alphas up to a few thousand.
MAX_LORA_ALPHA = 100_000

# The longest regex accepted in adapter_config.json; PEFT's own are a few hundred characters.
MAX_PATTERN_LENGTH = 4096
_ACCEPTED_REGEX = (f"a regex of at most {MAX_PATTERN_LENGTH} characters in RE2 syntax (Python's, "
                   "without lookahead, lookbehind or backreferences)")
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is the tenant's error, not the server's log

# PEFT's defaults, used where a config omits the key (as PEFT does).
_DEFAULT_R = 8
_DEFAULT_ALPHA = 8

# PEFT's layer index where layers_pattern is unset; cotune's own pattern, so Python's `re`.
_FIRST_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(\d+)\.")


class AdapterError(ValueError):
    """An adapter that cotune refuses; the message says what is wrong and what is accepted."""


class AdapterMismatch(AdapterError):
    """A well-formed adapter that does not fit this base model or this server (a module the
    base lacks, a shape of another model, a rank above the slot pool's)."""


def check_config(config: dict, where: str) -> None:
    """Refuses a config whose options cotune would otherwise ignore or misread."""
    if config.get("peft_type") != "LORA":
        raise AdapterError(
            f"adapter {where} has peft_type {config.get('peft_type')!r} in adapter_config.json; "
            "cotune accepts only peft_type 'LORA' (plain LoRA adapters)")
    _check_options(config, where)
    if not isinstance(config.get("use_dora", False), bool):
        raise AdapterError(f"adapter {where} sets use_dora={json.dumps(config['use_dora'])}; "
                           "accepted: true (DoRA) or false")
    _check_init(config.get("init_lora_weights", True), where)
    _check_rank_and_alpha(config, where)
    _check_targeting(config, where)


def _check_options(config: dict, where: str) -> None:
    for name, value in config.items():
        if name in _UNSUPPORTED_OPTIONS:
            accepted, why = _UNSUPPORTED_OPTIONS[name]
            if value not in accepted:
                raise AdapterError(
                    f"adapter {where} sets {name}={json.dumps(value)} in adapter_config.json, "
                    f"which cotune does not support: {why}; accepted: {name}="
                    + " or ".join(json.dumps(a) for a in accepted))
        elif name not in _HONOURED_OPTIONS and name not in _INERT_OPTIONS:
            # An option of a newer PEFT: harmless only while it is off.
            if value not in (None, False, [], {}):
                raise AdapterError(
                    f"adapter {where} sets {name}={json.dumps(value)} in adapter_config.json, "
                    "an option cotune does not know and cannot honour; accepted: leave it unset "
                    "(null), or use plain LoRA options only")


def _check_init(init, where: str) -> None:
    if isinstance(init, bool) or init in _PLAIN_INITS:
        return
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INIT_PREFIXES):
        raise AdapterError(
            f"adapter {where} uses init_lora_weights={init!r}, which changes the base weights, so "
            "its LoRA only works on PEFT's modified base; accepted: a plain LoRA, e.g. re-saved by "
            "PEFT with save_pretrained(..., path_initial_model_for_weight_conversion=...)")
    raise AdapterError(
        f"adapter {where} uses init_lora_weights={json.dumps(init)}, which cotune does not know; "
        "accepted: true, false, " + ", ".join(json.dumps(i) for i in _PLAIN_INITS))


def _check_rank_and_alpha(config: dict, where: str) -> None:
    _check_rank(config.get("r", _DEFAULT_R), "r", where)
    _check_alpha(config.get("lora_alpha", _DEFAULT_ALPHA), "lora_alpha", where)
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise AdapterError(
            f"adapter {where} has use_rslora={json.dumps(rslora)}; accepted: true or false")
    for field, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(
                f"adapter {where} has {field}={json.dumps(patterns)}; accepted: an object that "
                "maps module names or regexes to values")
        for pattern, value in patterns.items():
            _compile(pattern, _suffix_regex, f"{field} key", where)
            check(value, f"{field}[{pattern!r}]", where)


def _check_rank(value, name: str, where: str) -> None:
    if not _is_int(value) or value < 1:
        raise AdapterError(
            f"adapter {where} has {name}={json.dumps(value)}; accepted: a positive integer rank")


def _check_alpha(value, name: str, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or abs(value) > MAX_LORA_ALPHA:
        raise AdapterError(
            f"adapter {where} has {name}={json.dumps(value)}; accepted: a finite number of at "
            f"most {MAX_LORA_ALPHA} in magnitude")


def _check_targeting(config: dict, where: str) -> None:
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            raise AdapterError(
                f"adapter {where} has target_modules='all-linear', which PEFT resolves against "
                "its model before saving; accepted: the module names (as PEFT writes them) or a "
                "regex")
        _compile(targets, _regex, "target_modules", where)
        if config.get("layers_to_transform") is not None or config.get("layers_pattern"):
            raise AdapterError(
                f"adapter {where} combines a regex target_modules with layers_to_transform or "
                "layers_pattern, which PEFT refuses too; accepted: a list of names with them")
    elif not _is_list_of(targets, str):
        raise AdapterError(
            f"adapter {where} has target_modules={json.dumps(targets)}; accepted: a list of "
            "module names (e.g. [\"q_proj\", \"v_proj\"]) or a regex string")
    excluded = config.get("exclude_modules")
    if isinstance(excluded, str):
        _compile(excluded, _regex, "exclude_modules", where)
    elif excluded is not None and not _is_list_of(excluded, str):
        raise AdapterError(
            f"adapter {where} has exclude_modules={json.dumps(excluded)}; accepted: null, a list "
            "of module names or a regex string")
    _check_layers(config, where)


def _check_layers(config: dict, where: str) -> None:
    layers = config.get("layers_to_transform")
    pattern = config.get("layers_pattern")
    if layers is not None and not (_is_int(layers) or _is_list_of(layers, int)):
        raise AdapterError(
            f"adapter {where} has layers_to_transform={json.dumps(layers)}; accepted: null, a "
            "layer index or a list of layer indices")
    if pattern is not None and not (isinstance(pattern, str) or _is_list_of(pattern, str)):
        raise AdapterError(
            f"adapter {where} has layers_pattern={json.dumps(pattern)}; accepted: null, a name "
            "or a list of names (e.g. \"layers\")")
    for name in [pattern] if isinstance(pattern, str) else pattern or []:
        _compile(name, _layer_regex, "layers_pattern", where)
    if pattern and layers is None:
        raise AdapterError(
            f"adapter {where} sets layers_pattern without layers_to_transform, which PEFT "
            "refuses too; accepted: layers_pattern only together with layers_to_transform")


def _is_list_of(value, kind: type) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, kind) and not isinstance(v, bool) for v in value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _compile(pattern: str, build, what: str, where: str) -> None:
    """Refuses `pattern` unless build(pattern), the regex it is matched as, compiles in RE2."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise AdapterError(
            f"adapter {where} has a regex of {len(pattern)} characters in {what}: "
            f"{pattern[:80]!r}...; accepted: {_ACCEPTED_REGEX}")
    try:
        build(pattern)
    except re2.error as e:
        reason = e.args[0].decode(errors="replace") if isinstance(e.args[0], bytes) \
            else str(e)
        raise AdapterError(
            f"adapter {where} has an invalid regex in {what}: {pattern!r} ({reason}); "
            f"accepted: {_ACCEPTED_REGEX}") from None


def _regex(pattern: str):
    """`pattern` compiled by RE2 (re2 caches the compiled regexes)."""
    return re2.compile(pattern, _RE2_OPTIONS)


def _suffix_regex(key: str):
    # get_pattern_key: a key matches a suffix of whole segments of the module path
    return _regex(rf"(.*\.)?({key})$")


def _layer_regex(layers_pattern: str):
    # the layer index is the last group, whatever groups the pattern has (PEFT names it `idx`,
    # but RE2 lets a pattern take that name too)
    return _regex(rf"(?:^|.*?\.){layers_pattern}\.(\d+)\.")


def is_targeted(config: dict, path: str) -> bool:
    """Whether PEFT puts LoRA on the module at `path` (check_target_module_exists)."""
    if _matches(config.get("exclude_modules"), path):
        return False
    targets = config["target_modules"]
    if isinstance(targets, str):
        return _regex(targets).fullmatch(path) is not None
    if path in targets:  # a full path is taken as is, whatever layers_to_transform says
        return True
    return _matches(targets, path) and _in_transformed_layers(config, path)


def _matches(names_or_regex: str | list[str] | None, path: str) -> bool:
    if not names_or_regex:
        return False
    if isinstance(names_or_regex, str):
        return _regex(names_or_regex).fullmatch(path) is not None
    return any(path == name or path.endswith(f".{name}") for name in names_or_regex)


def _in_transformed_layers(config: dict, path: str) -> bool:
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = config.get("layers_pattern")
    if not patterns:
        # the first numbered segment is the layer index, not a nested one (an expert's)
        match = _FIRST_LAYER_INDEX.match(path)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = _layer_regex(pattern).match(path)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.groups()[-1])
    return index == layers if isinstance(layers, int) else index in layers


def check_targets_exist(config: dict, base_paths: Iterable[str], where: str) -> None:
    """Refuses a target_modules entry (or regex) that matches no LoRA-capable base module."""
    base_paths = list(base_paths)
    targets = config["target_modules"]
    if isinstance(targets, str):
        if not any(_matches(targets, path) for path in base_paths):
            raise AdapterMismatch(
                f"adapter {where} has target_modules regex {targets!r}, which matches no module "
                f"of the base model; {describe_base(base_paths)}")
        return
    for name in targets:
        if not any(_matches([name], path) for path in base_paths):
            raise AdapterMismatch(
                f"adapter {where} targets module {name!r} which the base model does not have; "
                f"{describe_base(base_paths)}")


def describe_base(base_paths: Iterable[str]) -> str:
    names = dict.fromkeys(p.rsplit(".", 1)[-1] for p in base_paths)
    return "the base has LoRA-capable modules named " + ", ".join(names)


def module_rank(config: dict, path: str) -> int:
    """The rank PEFT gives the module at `path`: rank_pattern's first match, else r."""
    return _pattern_value(config.get("rank_pattern") or {}, path, config.get("r", _DEFAULT_R))


def module_scale(config: dict, path: str) -> float:
    """scale = alpha / r, or alpha / sqrt(r) with rsLoRA, per module (LoraLayer.update_layer)."""
    r = module_rank(config, path)
    alpha = _pattern_value(config.get("alpha_pattern") or {}, path,
                           config.get("lora_alpha", _DEFAULT_ALPHA))
    return alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r


def _pattern_value(patterns: dict, path: str, default):
    # get_pattern_key: the first key, in file order, that matches a suffix of whole segments
    for pattern, value in patterns.items():
        if _suffix_regex(pattern).match(path):
            return value
    return default
