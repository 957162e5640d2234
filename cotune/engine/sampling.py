"""Choosing the next token of a batch of sequences, each with its own sampling parameters.

Semantics: for a sampled row, `p = softmax(top_p(top_k(logits / temperature)))` and the token
is drawn from `p`; a greedy row (temperature 0) takes `argmax(logits)`. The filters are those of
Hugging Face transformers (`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`,
in that order, `min_tokens_to_keep=1`), applied to the whole batch at once with per-row
parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class SamplingError(ValueError):
    """Sampling parameters, or the logits handed to the sampler, are not valid."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    `stop` strings end the generation and are not part of the output text; `stop_token_ids`
    end it like EOS does and stay in the output token ids. `logprobs=k` reports the chosen
    token's logprob and the k most likely alternatives (k=0: the chosen token only).
    """

    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # (0, 1]; 1 = off
    top_k: int = 0  # 0 = off; else >= 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self):
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise SamplingError(
                f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise SamplingError(
                f"top_k must be an integer >= 1, or 0 to turn it off, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise SamplingError(
                f"seed must be an integer in [0, 2**64) or None, got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(
                isinstance(s, str) and s for s in stop):
            raise SamplingError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                _is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise SamplingError(
                f"stop_token_ids must be a list of token ids (integers >= 0), "
                f"got {self.stop_token_ids!r}")
        if not isinstance(self.ignore_eos, bool):
            raise SamplingError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise SamplingError(
                f"logprobs must be None or an integer >= 0 (the number of alternatives), "
                f"got {self.logprobs!r}")
        # Normalised forms: floats, tuples (hashable, immutable like the rest).
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A generator seeded with `seed` for this request's whole life, or None (unseeded)."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


@dataclass
class TokenLogprob:
    """Logprobs of one sampled position, from the model's raw distribution."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # k best (token_id, logprob), best first


def filter_logits(logits: torch.Tensor, temperature: list[float], top_k: list[int],
                  top_p: list[float]) -> torch.Tensor:
    """The logits of the sampling distribution: temperature, then top-k, then top-p, per row.

    logits (B, V) float32; one temperature (> 0), top_k (0 = off) and top_p (1 = off) per row.
    Returns (B, V) float32 with the filtered-out entries at -inf; `softmax` of it is what
    `Sampler` draws from, and it equals transformers' warpers applied row by row.
    """
    device = logits.device
    B, V = logits.shape
    # Temperature: scores / T, the same float32 division as TemperatureLogitsWarper.
    temps = torch.tensor(temperature, dtype=torch.float32, device=device)  # (B,)
    scores = logits / temps[:, None]  # (B, V)

    # Top-k: drop scores below the k-th largest of the row (ties with it are kept).
    k = [min(kk, V) for kk in top_k]
    if any(k):
        kth_index = torch.tensor([max(kk, 1) - 1 for kk in k], device=device)  # (B,)
        top_values = torch.topk(scores, max(k), dim=-1).values  # (B, kmax), descending
        kth = top_values.gather(1, kth_index[:, None])  # (B, 1)
        on = torch.tensor([kk > 0 for kk in k], device=device)  # (B,)
        scores = scores.masked_fill((scores < kth) & on[:, None], -math.inf)

    # Top-p: in ascending order, drop the tokens whose cumulative probability is <= 1 - p;
    # the most likely token always stays. The threshold is rounded from float64 like the
    # warper's Python scalar (float32(1) - float32(0.9) != float32(1 - 0.9)).
    if any(p < 1.0 for p in top_p):
        threshold = torch.tensor([1.0 - p for p in top_p], dtype=torch.float32,
                                 device=device)  # (B,)
        sorted_scores, sorted_index = torch.sort(scores, descending=False)  # (B, V)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
        remove_sorted = cumulative <= threshold[:, None]  # (B, V)
        remove_sorted[:, -1] = False  # min_tokens_to_keep = 1
        remove = remove_sorted.scatter(1, sorted_index, remove_sorted)  # (B, V)
        # A row at p = 1 is left untouched, as transformers skips the warper there (the mask
        # would otherwise also drop tokens whose probability underflows to 0).
        on = torch.tensor([p < 1.0 for p in top_p], device=device)  # (B,)
        scores = scores.masked_fill(remove & on[:, None], -math.inf)
    return scores


class Sampler:
    """Picks one token per row of a logits batch; the rows share nothing but the tensor ops."""

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None],
               ) -> tuple[list[int], list[TokenLogprob | None]]:
        """Samples one token per row; returns (token ids, logprobs or None per row).

        logits (B, V) float32, one row per sequence, unprocessed; params and generators: one
        per row. A greedy row (temperature 0) takes the argmax of the raw logits. A sampled
        row draws from the filtered distribution (see `filter_logits`) with its own generator
        when it has one, so a seeded row gives the same tokens whatever else is in the batch;
        rows without one share torch's default generator. A generator may live on another
        device than the logits (a CPU generator with CUDA logits): that row's probabilities
        are moved to it.

        Logprobs are those of the model's raw distribution, `log_softmax(logits)` before
        temperature, top-k and top-p (what vLLM reports by default), so they do not depend on
        the sampling parameters: the chosen token's logprob and the `params.logprobs` best
        alternatives, best first.
        """
        if logits.dim() != 2:
            raise SamplingError(f"logits must be (batch, vocab), got shape {tuple(logits.shape)}")
        B, V = logits.shape
        if len(params) != B or len(generators) != B:
            raise SamplingError(
                f"logits have {B} rows but there are {len(params)} sampling params and "
                f"{len(generators)} generators; give one of each per row")
        logits = logits.float()
        tokens = torch.argmax(logits, dim=-1)  # (B,) greedy everywhere, then overwritten

        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            index = torch.tensor(rows, device=logits.device)
            scores = filter_logits(logits[index], [params[i].temperature for i in rows],
                                   [params[i].top_k for i in rows],
                                   [params[i].top_p for i in rows])  # (R, V)
            probs = scores.softmax(dim=-1)  # (R, V)
            drawn = torch.empty(len(rows), dtype=torch.long, device=logits.device)  # (R,)
            unseeded = [j for j, i in enumerate(rows) if generators[i] is None]
            if unseeded:
                at = torch.tensor(unseeded, device=logits.device)
                drawn[at] = torch.multinomial(probs[at], 1).squeeze(1)
            for j, i in enumerate(rows):
                generator = generators[i]
                if generator is not None:  # one draw per seeded row, from its own stream
                    row = probs[j:j + 1].to(generator.device)  # (1, V)
                    drawn[j] = torch.multinomial(row, 1, generator=generator).to(drawn.device)[0, 0]
            tokens[index] = drawn
        token_ids = tokens.tolist()
        return token_ids, self._logprobs(logits, params, token_ids)

    @staticmethod
    def _logprobs(logits: torch.Tensor, params: list[SamplingParams],
                  token_ids: list[int]) -> list[TokenLogprob | None]:
        out: list[TokenLogprob | None] = [None] * len(params)
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not rows:
            return out
        V = logits.shape[1]
        k_max = max(params[i].logprobs for i in rows)
        if k_max > V:
            raise SamplingError(
                f"logprobs={k_max} asks for more alternatives than the vocabulary has ({V})")
        index = torch.tensor(rows, device=logits.device)
        logprobs = torch.log_softmax(logits[index], dim=-1)  # (R, V)
        chosen = logprobs.gather(1, torch.tensor([[token_ids[i]] for i in rows],
                                                 device=logits.device))  # (R, 1)
        top = torch.topk(logprobs, k_max, dim=-1)  # (R, k_max) each, best first
        chosen_list = chosen[:, 0].tolist()
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
        for j, i in enumerate(rows):
            k = params[i].logprobs
            out[i] = TokenLogprob(token_ids[i], chosen_list[j],
                                  list(zip(top_ids[j][:k], top_values[j][:k])))
        return out
