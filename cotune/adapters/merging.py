"""Merging LoRA adapters into a new one: the math of PEFT's `add_weighted_adapter`.

The methods, weights, ranks and config are PEFT 0.21's (tuners/lora/model.py:
`_check_add_weighted_adapter`, `add_weighted_adapter`, `_generalized_task_arithmetic_weighted_
adapter`, `_svd_generalized_task_arithmetic_weighted_adapter`; utils/merge_utils.py), so that
parents merged here and by PEFT give the same adapter. Per module, with parent i's factors
A_i (r_i, in), B_i (out, r_i), scale s_i and weight w_i:

- linear, ties, dare_linear, dare_ties, magnitude_prune ("factor" methods, equal ranks):
  A = combine_i(A_i, sign(w_i s_i) sqrt|w_i s_i|), B = combine_i(B_i, sqrt|w_i s_i|); the two
  factors are combined separately, so only `linear` gives exactly sum_i w_i delta_i.
- cat: A = [w_i s_i A_i] stacked by rows, B = [B_i] by columns: exactly sum_i w_i delta_i, of
  rank sum_i r_i.
- svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd: D = combine_i(delta_i, w_i)
  with delta_i = s_i B_i @ A_i, then the best rank-r factors of D: B = U_r diag(S_r), A = Vh_r.

combine: `linear`/`svd` a weighted sum; `magnitude_prune` keeps each tensor's `density` share of
entries largest in magnitude, then sums; `ties` prunes so, elects each entry's sign (`total`:
the sign of the sum, `frequency`: the commoner sign), and averages the weighted entries of that
sign; `dare_*` drops entries at random (kept with probability `density`, rescaled by
1/density) instead of by magnitude.

The new adapter (as PEFT makes it): the first parent's config with r = lora_alpha = the new
rank, so a scale of 1 (the parents' scales are in the factors already), no rank_pattern or
alpha_pattern, use_rslora false, and target_modules the union of the parents' lists (or the
regexes joined, "(a)|(b)"). PEFT 0.21 keeps the first parent's use_rslora, which scales the
merge by sqrt(r) when that parent uses rsLoRA; PEFT fixed that (huggingface/peft#3449) by
writing use_rslora false as here. The new rank: the parents' rank for the factor methods, their sum
for cat, `svd_rank` (default: the largest parent rank) for the svd methods. One parent is
always merged `linear`, as PEFT does.

The seed of dare_*: the masks are drawn from a torch.Generator seeded with `seed`, module by
module in the base's module order, for each module the parents' A then the parents' B (the
delta, for dare_*_svd), in parent order. PEFT draws the same masks in the same order from
torch's global generator: seeded with `seed` as its merge loop starts (after it has made the
new adapter's layers, which draw from it too), it gives the same adapter, on the CPU.

Every refusal is an AdapterError (a bad request: INVALID_ARGUMENT) or an IncompatibleParents
(parents that cannot be merged as asked: FAILED_PRECONDITION) whose message says what was wrong
and what is accepted. Torch only; nothing is read or written here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cotune.adapters.peft_format import LoraAdapter, LoraModule
from cotune.adapters.validation import AdapterError, module_scale

METHODS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties",
           "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = tuple(m for m in METHODS if m.endswith("svd"))
DENSITY_METHODS = tuple(m for m in METHODS if m not in ("linear", "cat", "svd"))
SIGN_METHODS = ("ties", "ties_svd", "dare_ties", "dare_ties_svd")
SIGN_RULES = ("total", "frequency")
MAX_PARENTS = 16  # each parent is held in memory while the merge runs
MAX_WEIGHT = 100.0  # in magnitude; task arithmetic uses weights of order 1


class IncompatibleParents(AdapterError):
    """Parents that cannot be merged as asked: other modules, bases or ranks."""


@dataclass(frozen=True)
class MergeSpec:
    """How to merge: one weight per parent (in parent order) and the method's parameters.

    density: in (0, 1], for the methods that prune (DENSITY_METHODS), None for the others.
    majority_sign_method: "total" or "frequency", for the ties methods (SIGN_METHODS).
    svd_rank: the new rank of the svd methods; None: the largest parent rank.
    seed: of the dare masks (see the module's docstring); 0 by default.
    """

    method: str
    weights: tuple[float, ...]
    density: float | None = None
    majority_sign_method: str = "total"
    svd_rank: int | None = None
    seed: int = 0

    def check(self) -> None:
        """Refuses (AdapterError) what no parents could make right."""
        if self.method not in METHODS:
            raise AdapterError(f"merge method {self.method!r} is unknown; accepted: "
                               + ", ".join(METHODS))
        count = len(self.weights)
        if not 1 <= count <= MAX_PARENTS:
            raise AdapterError(f"a merge of {count} adapters; accepted: 1 to {MAX_PARENTS} "
                               "parents, each with its weight")
        for i, weight in enumerate(self.weights):
            if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
                raise AdapterError(
                    f"weight {weight!r} of parent {i + 1} is not accepted; accepted: finite "
                    f"weights of at most {MAX_WEIGHT:g} in magnitude (negative ones subtract), "
                    "not all zero")
        if not any(self.weights):
            raise AdapterError("every weight is zero, so the merge would be no adapter; "
                               "accepted: finite weights, at least one of them non-zero")
        self._check_parameters()

    def _check_parameters(self) -> None:
        method = self.method
        if method in DENSITY_METHODS:
            if self.density is None or not 0 < self.density <= 1:
                given = "none was given" if self.density is None else f"got {self.density!r}"
                raise AdapterError(
                    f"merge method {method} needs a density, the share of entries it keeps, "
                    f"{given}; accepted: a density in (0, 1]")
        elif self.density is not None:
            raise AdapterError(f"merge method {method} takes no density; accepted: a density "
                               "only with " + ", ".join(DENSITY_METHODS))
        if self.majority_sign_method not in SIGN_RULES:
            raise AdapterError(f"majority_sign_method {self.majority_sign_method!r} is "
                               "unknown; accepted: total, frequency")
        if self.majority_sign_method != "total" and method not in SIGN_METHODS:
            raise AdapterError(f"merge method {method} elects no sign; accepted: "
                               "majority_sign_method only with " + ", ".join(SIGN_METHODS))
        if self.svd_rank is not None:
            if method not in SVD_METHODS:
                raise AdapterError(f"merge method {method} takes no svd_rank; accepted: "
                                   "svd_rank only with " + ", ".join(SVD_METHODS))
            if self.svd_rank < 1:
                raise AdapterError(f"svd_rank {self.svd_rank} is not accepted; accepted: a "
                                   "positive rank (or none: the largest parent rank)")
        if not 0 <= self.seed < 2**63:
            raise AdapterError(f"seed {self.seed} is not accepted; accepted: 0 to 2^63-1")

    def applied(self) -> MergeSpec:
        """The spec PEFT applies: with one parent, `linear` whatever the method."""
        if len(self.weights) > 1 or self.method == "linear":
            return self
        return MergeSpec("linear", self.weights, seed=self.seed)

    def parameters(self) -> dict:
        """The method and the parameters it uses, for a version's provenance."""
        shown = {"method": self.method}
        if self.method in DENSITY_METHODS:
            shown["density"] = self.density
        if self.method in SIGN_METHODS:
            shown["majority_sign_method"] = self.majority_sign_method
        if self.method in SVD_METHODS:
            shown["svd_rank"] = self.svd_rank
        if self.method.startswith("dare"):
            shown["seed"] = self.seed
        return shown


@dataclass(frozen=True)
class MergePlan:
    spec: MergeSpec  # as applied (see MergeSpec.applied)
    rank: int
    config: dict  # the new adapter_config.json


def plan_merge(parents: Sequence[LoraAdapter], spec: MergeSpec,
               names: Sequence[str] | None = None) -> MergePlan:
    """Checks that `parents` can be merged by `spec` and says what the merge makes, before any
    tensor is computed. `names`: the parents as messages name them ("a@v2")."""
    spec.check()
    if len(parents) != len(spec.weights):
        raise AdapterError(f"{len(parents)} parents but {len(spec.weights)} weights; "
                           "accepted: one weight per parent")
    names = list(names or (f"parent {i + 1}" for i in range(len(parents))))
    for parent, name in zip(parents, names, strict=True):
        if parent.config.get("use_dora") is True:
            raise IncompatibleParents(
                f"{name} is a DoRA adapter, and PEFT's add_weighted_adapter merges plain LoRA "
                "only (a magnitude has no weighted sum); accepted: parents without use_dora")
    _check_same_modules(parents, names)
    spec = spec.applied()
    ranks = [_config_rank(p.config) for p in parents]  # PEFT's: r, or rank_pattern's largest
    if spec.method in FACTOR_METHODS:
        _check_one_rank(parents, ranks, names, spec.method)
        rank = ranks[0]
    elif spec.method == "cat":
        rank = sum(ranks)
    else:
        rank = spec.svd_rank or max(ranks)
        _check_svd_rank(parents[0], rank)
    config = {**parents[0].config, "r": rank, "lora_alpha": rank,
              "target_modules": _union_targets(parents, names), "alpha_pattern": {},
              "rank_pattern": {}, "use_rslora": False}
    return MergePlan(spec, rank, config)


def merge_adapters(parents: Sequence[LoraAdapter], spec: MergeSpec,
                   order: Sequence[str] | None = None,
                   names: Sequence[str] | None = None) -> LoraAdapter:
    """The adapter that merges `parents` by `spec` (weights in parent order), as PEFT's
    add_weighted_adapter makes it. `order`: the base's module paths in the model's order (the
    order of the dare masks); None: the parents' module order."""
    plan = plan_merge(parents, spec, names)
    spec = plan.spec
    generator = torch.Generator().manual_seed(spec.seed)
    modules = {}
    paths = [p for p in order or () if p in parents[0].modules]
    placed = set(paths)
    paths += [p for p in parents[0].modules if p not in placed]  # any `order` left out
    for path in paths:
        factors = [parent.modules[path] for parent in parents]
        if spec.method == "cat":
            a, b = _cat(factors, spec.weights, plan.rank)
        elif spec.method in SVD_METHODS:
            a, b = _svd(factors, spec, plan.rank, generator)
        else:
            a, b = _factors(factors, spec, generator)
        modules[path] = LoraModule(a=a.contiguous(), b=b.contiguous(),
                                   scale=module_scale(plan.config, path))
    return LoraAdapter(modules=modules, config=plan.config)


# --- the checks ---------------------------------------------------------------------------------

def _check_same_modules(parents: Sequence[LoraAdapter], names: list[str]) -> None:
    first = set(parents[0].modules)
    for parent, name in zip(parents[1:], names[1:], strict=True):
        modules = set(parent.modules)
        if modules != first:
            only = sorted(first - modules)[:3] or sorted(modules - first)[:3]
            raise IncompatibleParents(
                f"{names[0]} and {name} adapt different modules (e.g. {', '.join(only)} in one "
                "only); accepted: parents that adapt the same modules of the base")


def _config_rank(config: dict) -> int:
    pattern = config.get("rank_pattern") or {}
    return max(config.get("r", 8), *pattern.values()) if pattern else config.get("r", 8)


def _check_one_rank(parents: Sequence[LoraAdapter], ranks: list[int], names: list[str],
                    method: str) -> None:
    module_ranks = {m.a.shape[0] for p in parents for m in p.modules.values()}
    if len(set(ranks)) > 1 or len(module_ranks) > 1:
        shown = ", ".join(
            f"{name} rank {'/'.join(map(str, sorted({m.a.shape[0] for m in p.modules.values()})))}"
            for name, p in zip(names, parents, strict=True))
        raise IncompatibleParents(
            f"merge method {method} needs parents of one rank in every module, got {shown}; "
            "accepted: parents of equal rank, or a method that takes mixed ranks: cat, "
            + ", ".join(SVD_METHODS))


def _check_svd_rank(parent: LoraAdapter, rank: int) -> None:
    path, module = min(parent.modules.items(), key=lambda item: min(item[1].b.shape[0],
                                                                    item[1].a.shape[1]))
    largest = min(module.b.shape[0], module.a.shape[1])
    if rank > largest:
        raise AdapterError(
            f"svd rank {rank} exceeds the smallest side ({largest}) of module {path!r}; "
            f"accepted: an svd_rank of 1 to {largest}")


def _union_targets(parents: Sequence[LoraAdapter], names: list[str]) -> list[str] | str:
    targets = [p.config["target_modules"] for p in parents]
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    if any(isinstance(t, str) for t in targets):
        regex = next(n for n, t in zip(names, targets, strict=True) if isinstance(t, str))
        listed = next(n for n, t in zip(names, targets, strict=True) if not isinstance(t, str))
        raise IncompatibleParents(
            f"{regex} targets its modules by a regex and {listed} by a list of names, which "
            "PEFT does not merge either; accepted: parents whose target_modules are all lists "
            "or all regexes")
    return sorted(set().union(*targets))  # PEFT's set union, written as a list


# --- the math (merge_utils, on float32 tensors) -------------------------------------------------

def _factors(factors: list[LoraModule], spec: MergeSpec,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The factor methods: A and B combined separately, the weight split between them."""
    weights_a, weights_b = [], []
    for module, weight in zip(factors, spec.weights, strict=True):
        scaled = weight * module.scale
        sign = 1 if scaled >= 0 else -1  # on A only: signs on both sides would cancel
        weights_a.append(math.sqrt(abs(scaled)) * sign)
        weights_b.append(math.sqrt(abs(scaled)))
    a = _combine([m.a for m in factors], torch.tensor(weights_a), spec, generator)
    b = _combine([m.b for m in factors], torch.tensor(weights_b), spec, generator)
    return a, b


def _cat(factors: list[LoraModule], weights: Sequence[float],
         rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.cat([m.a * w * m.scale for m, w in zip(factors, weights, strict=True)])  # (R, in)
    b = torch.cat([m.b for m in factors], dim=1)  # (out, R)
    # a module of ranks below the parents' r (rank_pattern) leaves zero rows, as in PEFT
    padded_a = a.new_zeros(rank, a.shape[1])
    padded_b = b.new_zeros(b.shape[0], rank)
    padded_a[:a.shape[0]], padded_b[:, :b.shape[1]] = a, b
    return padded_a, padded_b


def _svd(factors: list[LoraModule], spec: MergeSpec, rank: int,
         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    deltas = [(m.b @ m.a) * m.scale for m in factors]  # (out, in) each
    delta = _combine(deltas, torch.tensor(list(spec.weights)), spec, generator)
    # the leading singular triplets; the reduced SVD has the same ones as PEFT's full one
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return vh[:rank], u[:, :rank] @ torch.diag(s[:rank])  # A (rank, in), B (out, rank)


def _combine(tensors: list[torch.Tensor], weights: torch.Tensor, spec: MergeSpec,
             generator: torch.Generator) -> torch.Tensor:
    """merge_utils' task_arithmetic, magnitude_prune, ties, dare_linear or dare_ties (by the
    method, its _svd twin alike) of `tensors` with one weight each."""
    method = spec.method.removesuffix("_svd")
    if method in ("linear", "svd"):
        return _weighted_sum(torch.stack(tensors), weights)
    if method.startswith("dare"):
        pruned = [_random_prune(t, spec.density, generator) for t in tensors]
    else:
        pruned = [_magnitude_prune(t, spec.density) for t in tensors]
    stacked = torch.stack(pruned)  # (n, *shape)
    if method in ("magnitude_prune", "dare_linear"):
        return _weighted_sum(stacked, weights)
    return _disjoint_merge(stacked, weights, spec.majority_sign_method)


def _weighted_sum(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (stacked * _per_tensor(weights, stacked)).sum(dim=0)


def _per_tensor(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    return weights.view(weights.shape + (1,) * (stacked.dim() - 1))  # (n, 1, 1)


def _magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keeps the int(density * numel) entries largest in magnitude."""
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    keep = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
    mask[keep[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def _random_prune(tensor: torch.Tensor, density: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Keeps each entry with probability `density`, rescaled by 1/density (DARE)."""
    if density >= 1:
        return tensor  # no draw, as in PEFT
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def _disjoint_merge(stacked: torch.Tensor, weights: torch.Tensor, rule: str) -> torch.Tensor:
    """TIES: each entry's sign elected over the pruned tensors (unweighted), then the mean of
    the weighted entries of that sign."""
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if rule == "total" else sign.sum(dim=0)
    elected = sign == torch.where(votes >= 0, 1, -1)  # (n, *shape)
    weighted = stacked * _per_tensor(weights, stacked)
    kept = (weighted * elected).sum(dim=0)
    return kept / torch.clamp(elected.sum(dim=0), min=1.0)

