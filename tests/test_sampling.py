"""The batched sampler against transformers' warpers, seeded reproducibility, draw frequencies,
logprobs, and the validation of sampling parameters."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from cotune.engine.sampling import Sampler, SamplingError, SamplingParams, filter_logits

TEMPERATURES = [0.3, 0.7, 1.0, 1.5]
TOP_KS = [0, 1, 2, 5, 50, 10_000]  # 10_000 > vocab: keeps everything
TOP_PS = [1.0, 0.95, 0.9, 0.5, 0.1, 1e-6]


def hf_filtered(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """transformers' warpers on one row, added under the same conditions as in generate()."""
    scores = row[None].clone()  # (1, V)
    if p.temperature != 1.0:
        scores = TemperatureLogitsWarper(p.temperature)(None, scores)
    if p.top_k != 0:
        scores = TopKLogitsWarper(p.top_k, min_tokens_to_keep=1)(None, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p, min_tokens_to_keep=1)(None, scores)
    return scores[0]


def random_params(rng: random.Random, count: int) -> list[SamplingParams]:
    return [SamplingParams(temperature=rng.choice(TEMPERATURES), top_k=rng.choice(TOP_KS),
                           top_p=rng.choice(TOP_PS)) for _ in range(count)]


def filtered(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    return filter_logits(logits, [p.temperature for p in params], [p.top_k for p in params],
                         [p.top_p for p in params])


@pytest.mark.parametrize("vocab", [1, 7, 133, 4099])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_filtered_distribution_equals_transformers_warpers(seed, vocab, ties):
    rng = random.Random(seed)
    logits = torch.randn(64, vocab) * 3  # (B, V)
    if ties:  # few distinct values: ties at the top-k edge and across the top-p boundary
        logits = (logits * 2).round() / 2
    params = random_params(rng, 64)
    ours = filtered(logits, params)  # (B, V)
    for i, p in enumerate(params):
        ref = hf_filtered(logits[i], p)
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(ref)), (i, p)
        torch.testing.assert_close(ours[i].softmax(-1), ref.softmax(-1), rtol=0, atol=0)


def test_top_k_keeps_every_token_tied_with_the_kth(seed):
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    kept = ~torch.isinf(filtered(logits, [SamplingParams(temperature=1.0, top_k=2)]))
    assert kept.tolist() == [[True, False, True, True, False]]


def test_top_p_threshold_rounds_like_the_warper_at_the_boundary():
    # A two-token row whose smaller probability lies in (float32(1 - 0.9), float32(1) -
    # float32(0.9)]: the warper keeps it, a threshold computed in float32 would drop it.
    low = torch.tensor(1 - 0.9, dtype=torch.float32)
    high = 1 - torch.tensor(0.9, dtype=torch.float32)
    logit = torch.tensor(math.log(1 / 9), dtype=torch.float32)
    for _ in range(2000):
        row = torch.stack([logit, torch.tensor(0.0)])  # (2,)
        if low < row.softmax(-1)[0] <= high:
            break
        logit = torch.nextafter(logit, torch.tensor(1.0))
    else:
        pytest.fail("no boundary logits found")
    params = SamplingParams(temperature=1.0, top_p=0.9)
    ours = filtered(row[None], [params])[0]
    assert torch.equal(ours, hf_filtered(row, params))
    assert not torch.isinf(ours).any()


def test_top_p_keeps_the_most_likely_token_however_small_p(seed):
    logits = torch.randn(5, 100)
    kept = ~torch.isinf(filtered(logits, [SamplingParams(temperature=1.0, top_p=1e-9)] * 5))
    assert kept.sum(-1).tolist() == [1] * 5
    assert torch.equal(kept.float().argmax(-1), logits.argmax(-1))


def test_greedy_rows_take_the_argmax_of_raw_logits_whatever_their_neighbours(seed):
    logits = torch.randn(9, 257) * 4
    params = [SamplingParams(temperature=0.0, top_k=5, top_p=0.1) if i % 2 == 0
              else SamplingParams(temperature=1.3, seed=i) for i in range(9)]
    generators = [p.make_generator() for p in params]
    tokens, _ = Sampler().sample(logits, params, generators)
    argmax = logits.argmax(-1).tolist()
    assert [tokens[i] for i in range(0, 9, 2)] == [argmax[i] for i in range(0, 9, 2)]


def test_top_k_1_is_greedy_at_any_temperature(seed):
    logits = torch.randn(16, 1000)
    params = [SamplingParams(temperature=t, top_k=1) for t in [0.5, 1.0, 2.0, 50.0] * 4]
    for _ in range(5):
        tokens, _ = Sampler().sample(logits, params, [None] * 16)
        assert tokens == logits.argmax(-1).tolist()


def test_same_seed_gives_the_same_tokens_whatever_else_is_in_the_batch(seed):
    steps, vocab = 12, 50
    logits = [torch.randn(1, vocab) for _ in range(steps)]  # one row per step
    target = SamplingParams(temperature=1.0, top_p=0.95, top_k=40, seed=7)

    def run(batch_size: int, position: int) -> list[int]:
        params = [SamplingParams(temperature=rng.choice([0.0, 0.8, 2.0]),
                                 seed=rng.choice([None, rng.randrange(100)]))
                  for _ in range(batch_size)]
        params[position] = target
        generators = [p.make_generator() for p in params]
        out = []
        for step in range(steps):
            batch = torch.randn(batch_size, vocab)
            batch[position] = logits[step][0]
            tokens, _ = Sampler().sample(batch, params, generators)
            out.append(tokens[position])
        return out

    rng = random.Random(seed)
    alone = run(1, 0)
    assert run(5, 3) == alone
    assert run(17, 0) == alone
    assert run(17, 16) == alone
    other = SamplingParams(temperature=1.0, top_p=0.95, top_k=40, seed=8)
    assert [Sampler().sample(row, [other], [other.make_generator()])[0][0]
            for row in logits] != alone


def chi_square_z(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Wilson-Hilferty z-score of Pearson's chi-square for observed `counts` against `probs`
    (bins with an expected count under 5 are pooled)."""
    n = counts.sum().item()
    expected = probs.double() * n
    small = expected < 5
    observed = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    df = max(len(expected) - 1, 1)
    return ((chi2 / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=6),
    SamplingParams(temperature=1.5, top_p=0.8),
    SamplingParams(temperature=1.2, top_k=10, top_p=0.9),
], ids=["plain", "top_k", "top_p", "both"])
def test_draw_frequencies_match_the_filtered_probabilities(seed, params):
    draws, vocab = 20_000, 24
    logits = torch.randn(1, vocab) * 1.5
    probs = filtered(logits, [params])[0].softmax(-1)  # (V,)
    tokens, _ = Sampler().sample(logits.expand(draws, vocab), [params] * draws, [None] * draws)
    counts = torch.bincount(torch.tensor(tokens), minlength=vocab)
    assert counts[probs == 0].sum() == 0, "a filtered-out token was drawn"
    assert chi_square_z(counts, probs) < 4.5


def test_seeded_draw_frequencies_match_the_filtered_probabilities(seed):
    draws, vocab = 3000, 10
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=seed)
    logits = torch.randn(1, vocab)
    probs = filtered(logits, [params])[0].softmax(-1)
    generator = params.make_generator()
    sampler = Sampler()
    tokens = [sampler.sample(logits, [params], [generator])[0][0] for _ in range(draws)]
    counts = torch.bincount(torch.tensor(tokens), minlength=vocab)
    assert counts[probs == 0].sum() == 0
    assert chi_square_z(counts, probs) < 4.5


def test_logprobs_are_the_raw_log_softmax_with_the_top_k_best_first(seed):
    logits = torch.randn(6, 300) * 3
    params = [SamplingParams(temperature=2.0, top_k=3, logprobs=5),
              SamplingParams(temperature=0.0, logprobs=0),
              SamplingParams(temperature=0.5),
              SamplingParams(temperature=1.0, top_p=0.5, logprobs=20),
              SamplingParams(temperature=0.0, logprobs=1),
              SamplingParams(temperature=1.0, seed=3, logprobs=300)]
    tokens, logprobs = Sampler().sample(logits, params, [p.make_generator() for p in params])
    reference = torch.log_softmax(logits, dim=-1)
    assert logprobs[2] is None
    for i, p in enumerate(params):
        if p.logprobs is None:
            continue
        entry = logprobs[i]
        assert entry.token_id == tokens[i]
        assert entry.logprob == pytest.approx(reference[i, tokens[i]].item(), abs=1e-6)
        assert len(entry.top) == p.logprobs
        values = [v for _, v in entry.top]
        assert values == sorted(values, reverse=True)
        for token, value in entry.top:
            assert value == pytest.approx(reference[i, token].item(), abs=1e-6)
        if p.logprobs:
            assert entry.top[0][0] == logits[i].argmax().item()


def test_logprobs_larger_than_the_vocabulary_are_refused():
    with pytest.raises(SamplingError, match="logprobs=11 .* vocabulary has \\(10\\)"):
        Sampler().sample(torch.randn(1, 10), [SamplingParams(logprobs=11)], [None])


def test_logits_and_params_must_agree_in_rows():
    with pytest.raises(SamplingError, match="3 rows but there are 2 sampling params"):
        Sampler().sample(torch.randn(3, 10), [SamplingParams()] * 2, [None] * 2)
    with pytest.raises(SamplingError, match="must be \\(batch, vocab\\)"):
        Sampler().sample(torch.randn(10), [SamplingParams()], [None])


@pytest.mark.parametrize("fields, message", [
    (dict(max_tokens=0), "max_tokens must be an integer >= 1, got 0"),
    (dict(max_tokens=2.0), "max_tokens must be an integer >= 1, got 2.0"),
    (dict(max_tokens=True), "max_tokens must be an integer >= 1, got True"),
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
    (dict(temperature="1"), "temperature must be a finite number >= 0"),
    (dict(top_p=0), "top_p must be in \\(0, 1\\], got 0"),
    (dict(top_p=1.01), "top_p must be in \\(0, 1\\], got 1.01"),
    (dict(top_p=-0.5), "top_p must be in \\(0, 1\\], got -0.5"),
    (dict(top_k=-1), "top_k must be an integer >= 1, or 0 to turn it off, got -1"),
    (dict(top_k=2.5), "top_k must be an integer >= 1, or 0 to turn it off, got 2.5"),
    (dict(seed=-1), "seed must be an integer in \\[0, 2\\*\\*64\\) or None, got -1"),
    (dict(seed=2**64), "seed must be an integer"),
    (dict(seed="7"), "seed must be an integer"),
    (dict(stop=["ok", ""]), "stop must be a list of non-empty strings"),
    (dict(stop=[1]), "stop must be a list of non-empty strings"),
    (dict(stop=""), "stop must be a list of non-empty strings"),
    (dict(stop_token_ids=[-1]), "stop_token_ids must be a list of token ids"),
    (dict(stop_token_ids=["2"]), "stop_token_ids must be a list of token ids"),
    (dict(stop_token_ids=5), "stop_token_ids must be a list of token ids"),
    (dict(ignore_eos=1), "ignore_eos must be a bool, got 1"),
    (dict(logprobs=-1), "logprobs must be None or an integer >= 0"),
    (dict(logprobs=1.0), "logprobs must be None or an integer >= 0"),
])
def test_invalid_sampling_params_are_refused_with_what_was_wrong(fields, message):
    with pytest.raises(SamplingError, match=message):
        SamplingParams(**fields)
    assert issubclass(SamplingError, ValueError)


def test_sampling_params_normalise_lists_and_numbers():
    p = SamplingParams(temperature=1, top_p=1, stop=["a", "bc"], stop_token_ids=[3, 4])
    assert p.stop == ("a", "bc") and p.stop_token_ids == (3, 4)
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float)
    assert SamplingParams(stop="END").stop == ("END",)
    hash(p)  # frozen and hashable
    assert SamplingParams().greedy and not p.greedy
    assert SamplingParams().make_generator() is None
