"""A measured model of how long a step takes, from which the scheduler sizes each step.

    seconds = a + b_serve * inference_tokens                    (serving)
                + [training_tokens > 0] * c_forward + b_forward * training_tokens
                + c_backward * backward_passes + b_backward * backward_tokens    (training)

Training rows have costs of their own, however few they are: their forward runs every
op of every layer apart from the served rows' (c_forward; the projections' GEMMs are shared,
see row_groups), and each backward over a pass's graph reads every weight again
(c_backward: a step may run the backward of several pieces forwarded in earlier steps, one
graph each). Per token their forward is differentiable (b_forward), and their backward runs
in whichever step the trainer planned it (b_backward). Without the fixed terms a few-token
piece looks nearly free, and a step that trains overshoots its target by the fixed part.

Serving, the training forward and the training backward are fitted apart, each by least
squares on what it measured: the engine times its training rows on their own (their layers'
forward, then the losses and backward after the pass), so serving is fitted on the rest of
each step, over the most recent steps, and each training part on its own seconds, over the
most recent steps that had it. (Fitted together, the fixed and per-token costs of forward
and backward cannot be told apart when whole examples run forward and backward in the same
step.) A fit drops the samples far off its first pass (an optimizer step, a version being
saved) and fits again. Until enough steps are seen, conservative priors stand in (for the
training parts' fixed costs, the serving fit's, as soon as there is one). The model
is what turns SLO targets into budgets: the largest step whose predicted time still meets
the time-per-output-token target, and the training work that fits beside it.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

# (a, b_serve, c_forward, b_forward, c_backward, b_backward)
PRIOR = (0.02, 1e-3, 0.01, 1.5e-3, 0.02, 3e-3)
MIN_SAMPLES = 8  # of a kind before its fit replaces the prior
# steps of each size (rows 1, 2, 3-4, 5-8, ...) kept for the fit of decode rows and prompt
# tokens: a long flood of large steps does not make it forget what a small one costs
SAMPLES_PER_SIZE = 32
MAX_ROWS = 1 << 20  # decodes_within never answers more
OUTLIER = 4.0  # a sample this many median absolute residuals off the first fit is dropped


class StepTimeModel:
    def __init__(self, window: int = 128, prior: tuple[float, ...] = PRIOR):
        self.prior = prior
        self.coefficients = prior
        self._serving: deque[tuple[int, float]] = deque(maxlen=window)  # (tokens, seconds)
        self._forward: deque[tuple[int, float]] = deque(maxlen=window)  # (tokens, seconds)
        # (tokens, passes, seconds)
        self._backward: deque[tuple[int, int, float]] = deque(maxlen=window)
        # (decode tokens, prefill tokens, serving seconds) by step size (`_size`), and the fit
        # of them: a decode row costs more than a prefill row (its attention reads a whole
        # context, its sequence is sampled and streamed), so a step's mix of the two tells
        # its time better than their sum where the mix moves (a flood's steps beside another
        # tenant's few requests). And a row costs less the more there are (on a CPU the
        # second row of a step cost 23 ms, the tenth 4 ms, SmolLM2 in float32): the
        # logarithm of the rows is a term of its own (of the fits tried on such steps it
        # put a lone decode closest: 2 ms off, where a square root was 11 and a line 18)
        self._rows: dict[int, deque[tuple[int, int, float]]] = {}
        self._rows_fit: tuple[float, float, float, float] | None = None

    @property
    def rows(self) -> tuple[float, float, float, float]:
        """(a, b_decode, b_prefill, c_rows): the fit of the steps' decode rows and prompt
        tokens, `predict_rows`."""
        if self._rows_fit is None:
            samples = [(decodes, prefill, _log_rows(decodes + prefill), seconds)
                       for size in self._rows.values() for decodes, prefill, seconds in size]
            self._rows_fit = _fit(samples, self._rows_prior()) \
                if len(samples) >= MIN_SAMPLES else self._rows_prior()
        return self._rows_fit

    def observe(self, inference_tokens: int, seconds: float, training_tokens: int = 0,
                forward_seconds: float = 0.0, backward_tokens: int = 0,
                backward_passes: int = 0, backward_seconds: float = 0.0,
                decode_tokens: int | None = None) -> None:
        """A step of `seconds` in all: `forward_seconds` of them spent on its training rows'
        forward (and their losses), `backward_seconds` on the backward of `backward_passes`
        graphs over `backward_tokens` rows (and the losses of the pieces in them).
        `decode_tokens`: of its inference tokens, the decodes (the rest prefill), when known."""
        serving = seconds - forward_seconds - backward_seconds
        self._serving.append((inference_tokens, serving))
        if decode_tokens is not None and inference_tokens:
            size = (inference_tokens - 1).bit_length()
            self._rows.setdefault(size, deque(maxlen=SAMPLES_PER_SIZE)).append(
                (decode_tokens, inference_tokens - decode_tokens, serving))
            self._rows_fit = None  # fitted again when asked (only tenant isolation asks)
        if training_tokens:
            self._forward.append((training_tokens, forward_seconds))
        if backward_passes:
            self._backward.append((backward_tokens, backward_passes, backward_seconds))
        a, b_serve, c_forward, b_forward, c_backward, b_backward = self.prior
        if len(self._serving) >= MIN_SAMPLES:
            a, b_serve = _fit(self._serving, (a, b_serve))
            # a pass over training rows has fixed costs like a step's: the prior of theirs,
            # until pieces of several sizes tell them apart from the per-token ones
            c_forward = c_backward = a
        if len(self._forward) >= MIN_SAMPLES:
            c_forward, b_forward = _fit(self._forward, (c_forward, b_forward))
        if len(self._backward) >= MIN_SAMPLES:
            c_backward, b_backward = _fit(self._backward, (c_backward, b_backward),
                                          per_pass=True)
        self.coefficients = (a, b_serve, c_forward, b_forward, c_backward, b_backward)

    def predict(self, inference_tokens: int, training_tokens: int = 0,
                backward_tokens: int = 0, backward_passes: int = 0) -> float:
        a, b_serve = self.coefficients[:2]
        return a + b_serve * inference_tokens + self.training_cost(
            training_tokens, backward_tokens, backward_passes)

    def training_cost(self, training_tokens: int, backward_tokens: int,
                      backward_passes: int) -> float:
        """Seconds that training rows add to a step: their forward, and the backward of
        `backward_passes` graphs over `backward_tokens` rows."""
        _, _, c_forward, b_forward, c_backward, b_backward = self.coefficients
        forward = c_forward + b_forward * training_tokens if training_tokens else 0.0
        return forward + c_backward * backward_passes + b_backward * backward_tokens

    @property
    def training_overhead(self) -> float:
        """Seconds a pass over training rows costs however few they are: the larger fixed
        part, of a forward or of a backward."""
        return max(self.coefficients[2], self.coefficients[4])

    def _rows_prior(self) -> tuple[float, float, float, float]:
        a, b_serve = self.coefficients[:2]
        return a, b_serve, b_serve, 0.0

    def predict_rows(self, decodes: int, prefill: int) -> float:
        """Seconds of a step serving `decodes` decode rows and `prefill` prompt tokens:
        a + b_decode * decodes + b_prefill * prefill + c_rows * log(decodes + prefill)."""
        a, b_decode, b_prefill, c_rows = self.rows
        return a + b_decode * decodes + b_prefill * prefill + c_rows * _log_rows(decodes + prefill)

    def decodes_within(self, seconds: float, prefill: int) -> int:
        """The most decode rows a step with `prefill` prompt tokens may hold and still take at
        most `seconds` (0 or more; the prediction grows with the rows, so a bisection)."""
        if self.predict_rows(0, prefill) > seconds:
            return 0
        low, high = 0, 1
        while self.predict_rows(high, prefill) <= seconds:
            if high >= MAX_ROWS:
                return high
            low, high = high, 2 * high
        while high - low > 1:  # predict_rows(low) <= seconds < predict_rows(high)
            middle = (low + high) // 2
            low, high = (middle, high) if self.predict_rows(middle, prefill) <= seconds \
                else (low, middle)
        return low

    def inference_budget(self, seconds: float, cap: int) -> int:
        """The most inference tokens a step may hold and still take at most `seconds`."""
        a, b_serve = self.coefficients[:2]
        return int(max(1, min(cap, (seconds - a) / b_serve)))


def _log_rows(rows: int) -> float:
    return math.log(max(rows, 1))


def _fit(samples, prior: tuple[float, ...], per_pass: bool = False) -> tuple[float, ...]:
    """(fixed >= 0, per unit > 0 of each feature...) seconds fitted to samples (features...,
    seconds), or (tokens, passes, seconds) with `per_pass` (the fixed cost then counts once
    per pass). A little ridge toward the prior keeps the fit sane while the features hardly
    vary; samples far off the first fit are dropped and the fit is made again. A cost the data
    would make negative is held at zero and the others fitted without it (clamping it after
    the fit would leave the others fitted to its negative share)."""
    data = np.array(samples, dtype=np.float64)
    features = data[:, :1] if per_pass else data[:, :-1]
    fixed = data[:, 1] if per_pass else np.ones(len(data))
    x, y = np.column_stack([fixed, features]), data[:, -1]
    ridge = 1e-3 * np.diag([1.0] + [1e2] * features.shape[1])

    def solve(rows):
        xs, free = x[rows], np.ones(x.shape[1], dtype=bool)
        while True:
            coefficients = np.zeros(x.shape[1])
            part, held = xs[:, free], ridge[np.ix_(free, free)]
            coefficients[free] = np.linalg.solve(
                part.T @ part + held, part.T @ y[rows] + held @ np.array(prior)[free])
            negative = coefficients < 0
            if not negative.any():
                return coefficients
            free &= ~negative

    coefficients = solve(slice(None))
    residuals = np.abs(x @ coefficients - y)
    keep = residuals <= OUTLIER * np.median(residuals) + 1e-6
    if keep.sum() >= 2 and not keep.all():
        coefficients = solve(keep)
    return (max(float(coefficients[0]), 0.0),
            *(max(float(c), 1e-6) for c in coefficients[1:]))
