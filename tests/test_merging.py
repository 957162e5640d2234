"""cotune's adapter merging gives what PEFT's add_weighted_adapter gives, method by method, on
real PEFT adapters of a tiny Llama: the merged factors (or, for the svd methods, whose singular
vectors are defined up to sign, the delta s * B @ A) of every module, the new config, and the
logits of the model with the merged adapter; and it refuses what cannot be merged."""

from __future__ import annotations

import copy

import peft.tuners.lora.model as peft_lora_model
import pytest
import torch
from conftest import LOGIT_ATOL, make_peft_adapter, tiny_hf_model
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from cotune.adapters.merging import (
    METHODS,
    SVD_METHODS,
    IncompatibleParents,
    MergeSpec,
    merge_adapters,
)
from cotune.adapters.peft_format import (
    AdapterError,
    LoraAdapter,
    LoraModule,
    load_peft_adapter,
    save_peft_adapter,
)

TARGETS = ["q_proj", "v_proj", "down_proj"]
FACTOR_ATOL = 1e-6
DELTA_ATOL = 1e-5
SEED = 7  # of the dare masks, on both sides


@pytest.fixture(scope="module")
def base():
    return tiny_hf_model("llama2")


@pytest.fixture(scope="module")
def base_modules(base):
    return {name: (m.in_features, m.out_features) for name, m in base.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS}


@pytest.fixture(scope="module")
def parents(tmp_path_factory, base):
    """{name: PEFT directory}: a and b of rank 4 (b with rsLoRA), c of rank 8."""
    root = tmp_path_factory.mktemp("parents")
    specs = {"a": dict(r=4, alpha=8, seed=1), "b": dict(r=4, alpha=6, rslora=True, seed=2),
             "c": dict(r=8, alpha=4, seed=3)}
    for name, spec in specs.items():
        make_peft_adapter(base, root / name, targets=TARGETS, std=0.2, **spec)
    return {name: root / name for name in specs}


@pytest.fixture(scope="module")
def reference(base, parents):
    """One PeftModel holding the parents under their names."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), parents["a"], adapter_name="a")
    for name in ("b", "c"):
        model.load_adapter(parents[name], adapter_name=name)
    return model.eval()


def peft_merge(model, names, weights, merged, monkeypatch, **options):
    """PEFT's merge of adapters `names` as `merged`, its dare masks drawn after torch's global
    generator is seeded with SEED as the merge loop starts (cotune's seed, see merging.py)."""
    freeze = peft_lora_model._freeze_adapter

    def freeze_then_seed(*args):
        freeze(*args)
        torch.manual_seed(SEED)

    monkeypatch.setattr(peft_lora_model, "_freeze_adapter", freeze_then_seed)
    model.add_weighted_adapter(names, weights, merged, **options)
    monkeypatch.setattr(peft_lora_model, "_freeze_adapter", freeze)
    return {name.removeprefix("base_model.model."): (m.lora_A[merged].weight.detach(),
                                                       m.lora_B[merged].weight.detach(),
                                                       m.scaling[merged])
            for name, m in model.named_modules() if isinstance(m, LoraLayer)
            and merged in m.lora_A}


def cotune_merge(parents, base_modules, names, weights, **options) -> LoraAdapter:
    loaded = [load_peft_adapter(parents[n], base_modules, 64) for n in names]
    return merge_adapters(loaded, MergeSpec(weights=tuple(weights), seed=SEED, **options),
                          order=list(base_modules), names=names)


def options_of(method: str) -> dict:
    options = {"method": method}
    if method not in ("linear", "cat", "svd"):
        options["density"] = 0.5
    return options


def peft_options(method: str) -> dict:
    options = dict(options_of(method), combination_type=method)
    del options["method"]
    return options


CASES = [(m, ("a", "b")) for m in METHODS] + \
    [(m, ("a", "c")) for m in ("cat", *SVD_METHODS)] + \
    [("linear", ("b", "a")), ("svd", ("b", "c"))]  # the first parent uses rsLoRA


def fix_rslora_scale(model, merged: str, expected: dict) -> dict:
    """PEFT 0.21 keeps the first parent's use_rslora, so its merge of an rsLoRA first parent
    is scaled by sqrt(r) (huggingface/peft#3449 fixed it: use_rslora false, scale 1): the
    reference as fixed upstream, factors unchanged."""
    if not model.peft_config[merged].use_rslora:
        return expected
    model.peft_config[merged].use_rslora = False
    for m in model.modules():
        if isinstance(m, LoraLayer) and merged in m.scaling:
            m.scaling[merged] = 1.0
    return {path: (a, b, 1.0) for path, (a, b, _) in expected.items()}


@pytest.mark.parametrize(("method", "names"), CASES,
                         ids=[f"{m}-{'+'.join(n)}" for m, n in CASES])
def test_a_merge_equals_peft_add_weighted_adapter(method, names, parents, base_modules,
                                                 reference, tmp_path, monkeypatch):
    weights = [0.7, -0.4]
    merged_name = f"{method}-{'-'.join(names)}"
    expected = peft_merge(reference, list(names), weights, merged_name, monkeypatch,
                          **peft_options(method))
    expected = fix_rslora_scale(reference, merged_name, expected)
    merged = cotune_merge(parents, base_modules, list(names), weights, **options_of(method))

    assert list(merged.modules) == list(expected)
    for path, (a, b, scale) in expected.items():
        module = merged.modules[path]
        assert module.scale == pytest.approx(scale)
        if method in SVD_METHODS:  # singular vectors are defined up to their signs
            torch.testing.assert_close(module.b @ module.a * module.scale, b @ a * scale,
                                       atol=DELTA_ATOL, rtol=0)
            assert module.a.shape == a.shape and module.b.shape == b.shape
        else:
            torch.testing.assert_close(module.a, a, atol=FACTOR_ATOL, rtol=0)
            torch.testing.assert_close(module.b, b, atol=FACTOR_ATOL, rtol=0)
    config = reference.peft_config[merged_name]
    assert (merged.config["r"], merged.config["lora_alpha"]) == (config.r, config.lora_alpha)
    assert set(merged.config["target_modules"]) == set(config.target_modules)
    assert merged.config["use_rslora"] == config.use_rslora

    # saved, read back by PEFT: the model's logits are those of PEFT's own merge
    save_peft_adapter(merged, tmp_path / "merged")
    assert load_peft_adapter(tmp_path / "merged", base_modules, 64).max_rank == config.r
    reference.load_adapter(tmp_path / "merged", adapter_name=f"cotune-{merged_name}")
    tokens = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference.set_adapter(merged_name)
        theirs = reference(tokens).logits
        reference.set_adapter(f"cotune-{merged_name}")
        ours = reference(tokens).logits
        with reference.disable_adapter():
            plain = reference(tokens).logits
    assert (theirs - plain).abs().max() > 1e-3  # the merge changes the model
    torch.testing.assert_close(ours, theirs, atol=LOGIT_ATOL[torch.float32], rtol=0)


def test_linear_of_one_parent_is_its_delta_times_the_weight(parents, base_modules):
    merged = cotune_merge(parents, base_modules, ["b"], [0.5], method="ties", density=0.3)
    parent = load_peft_adapter(parents["b"], base_modules, 64)
    assert merged.config["r"] == 4  # one parent: linear whatever the method, as in PEFT
    for path, module in merged.modules.items():
        p = parent.modules[path]
        torch.testing.assert_close(module.b @ module.a * module.scale, p.b @ p.a * p.scale * 0.5,
                                   atol=DELTA_ATOL, rtol=0)


def test_the_seed_decides_the_dare_masks(parents, base_modules):
    def merge(seed):
        loaded = [load_peft_adapter(parents[n], base_modules, 64) for n in ("a", "b")]
        return merge_adapters(loaded, MergeSpec("dare_linear", (0.5, 0.5), density=0.5,
                                                seed=seed), order=list(base_modules))
    first, again, other = merge(1), merge(1), merge(2)
    path = next(iter(first.modules))
    assert torch.equal(first.modules[path].a, again.modules[path].a)
    assert not torch.equal(first.modules[path].a, other.modules[path].a)


def _module(r: int, d_in: int, d_out: int) -> LoraModule:
    return LoraModule(a=torch.randn(r, d_in), b=torch.randn(d_out, r), scale=1.0)


def _adapter(ranks: dict[str, int], targets=("q_proj",)) -> LoraAdapter:
    modules = {path: _module(r, 64, 64) for path, r in ranks.items()}
    config = {"peft_type": "LORA", "r": max(ranks.values()), "lora_alpha": 8,
              "target_modules": list(targets) if not isinstance(targets, str) else targets}
    return LoraAdapter(modules=modules, config=config)


Q0, Q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"


@pytest.mark.parametrize(("spec", "fragment"), [
    (MergeSpec("nope", (1.0, 1.0)), "merge method 'nope' is unknown; accepted: linear, cat"),
    (MergeSpec("ties", (1.0, 1.0)), "needs a density"),
    (MergeSpec("ties", (1.0, 1.0), density=0.0), "accepted: a density in (0, 1]"),
    (MergeSpec("dare_ties", (1.0, 1.0), density=1.5), "accepted: a density in (0, 1]"),
    (MergeSpec("linear", (1.0, 1.0), density=0.5), "takes no density"),
    (MergeSpec("linear", (float("nan"), 1.0)), "accepted: finite weights"),
    (MergeSpec("linear", (float("inf"), 1.0)), "accepted: finite weights"),
    (MergeSpec("linear", (0.0, 0.0)), "every weight is zero"),
    (MergeSpec("linear", ()), "accepted: 1 to 16 parents"),
    (MergeSpec("linear", (1.0,) * 17), "accepted: 1 to 16 parents"),
    (MergeSpec("ties", (1.0, 1.0), density=0.5, majority_sign_method="most"),
     "accepted: total, frequency"),
    (MergeSpec("cat", (1.0, 1.0), svd_rank=4), "takes no svd_rank"),
    (MergeSpec("svd", (1.0, 1.0), svd_rank=65), "accepted: an svd_rank of 1 to 64"),
])
def test_bad_requests_are_refused_saying_what_is_accepted(spec, fragment):
    parents = [_adapter({Q0: 4})] * max(1, len(spec.weights))
    with pytest.raises(AdapterError) as refused:
        merge_adapters(parents, spec)
    assert not isinstance(refused.value, IncompatibleParents)
    assert fragment in str(refused.value)


@pytest.mark.parametrize(("parents", "spec", "fragment"), [
    ([_adapter({Q0: 4}), _adapter({Q0: 8})], MergeSpec("linear", (1.0, 1.0)),
     "needs parents of one rank"),
    ([_adapter({Q0: 4}), _adapter({Q0: 8})], MergeSpec("dare_ties", (1.0, 1.0), density=0.5),
     "accepted: parents of equal rank, or a method that takes mixed ranks: cat, svd"),
    ([_adapter({Q0: 4}), _adapter({Q1: 4})], MergeSpec("cat", (1.0, 1.0)),
     "adapt different modules"),
    ([_adapter({Q0: 4}), _adapter({Q0: 4}, targets=r".*q_proj")], MergeSpec("cat", (1.0, 1.0)),
     "all lists or all regexes"),
    ([_adapter({Q0: 4}), LoraAdapter(_adapter({Q0: 4}).modules,
                                     {**_adapter({Q0: 4}).config, "use_dora": True})],
     MergeSpec("linear", (1.0, 1.0)), "parent 2 is a DoRA adapter"),
])
def test_parents_that_cannot_be_merged_are_refused(parents, spec, fragment):
    with pytest.raises(IncompatibleParents) as refused:
        merge_adapters(parents, spec)
    assert fragment in str(refused.value)


def test_mixed_ranks_are_merged_by_cat_and_svd(parents, base_modules):
    cat = cotune_merge(parents, base_modules, ["a", "c"], [1.0, 1.0], method="cat")
    svd = cotune_merge(parents, base_modules, ["a", "c"], [1.0, 1.0], method="svd",
                       svd_rank=6)
    assert (cat.config["r"], cat.max_rank, svd.config["r"], svd.max_rank) == (12, 12, 6, 6)
