"""A measured model of how long a step takes, from which the scheduler sizes each step.

    seconds = a + b_serve * inference_tokens                    (serving)
                + [training_tokens > 0] * c_forward + b_forward * training_tokens
                + c_backward * backward_passes + b_backward * backward_tokens    (training)

Training rows have costs of their own: their pass reads every weight again however few
they are (c_forward), and so does each backward over a pass's graph (c_backward: a step may
run the backward of several pieces forwarded in earlier steps, one graph each); per token
their forward is differentiable (b_forward), and their backward runs in whichever step the
trainer planned it (b_backward). Without the fixed terms a few-token piece looks nearly
free, and a step that trains overshoots its target by the fixed part.

The two parts are fitted apart, each by least squares on what it measured: the engine times
its training rows on their own (the backward, and their layers' forward), so serving is
fitted on the rest of each step and training on its own seconds, over the most recent steps
of each kind. A fit drops the samples far off its first pass (an optimizer step, a version
being saved) and fits again. Until enough steps are seen, conservative priors stand in. The
model is what turns SLO targets into budgets: the largest step whose predicted time still
meets the time-per-output-token target, and the training work that fits beside it.
"""

from __future__ import annotations

from collections import deque

import numpy as np

# (a, b_serve, c_forward, b_forward, c_backward, b_backward)
PRIOR = (0.02, 1e-3, 0.01, 1.5e-3, 0.02, 3e-3)
MIN_SAMPLES = 8  # of a kind before its fit replaces the prior
OUTLIER = 4.0  # a sample this many median absolute residuals off the first fit is dropped


class StepTimeModel:
    def __init__(self, window: int = 128, prior: tuple[float, ...] = PRIOR):
        self.prior = prior
        self.coefficients = prior
        self._serving: deque[tuple[int, float]] = deque(maxlen=window)
        # (forward tokens, backward tokens, backward passes, seconds)
        self._training: deque[tuple[int, int, int, float]] = deque(maxlen=window)

    def observe(self, inference_tokens: int, seconds: float, training_tokens: int = 0,
                backward_tokens: int = 0, backward_passes: int = 0,
                training_seconds: float = 0.0) -> None:
        """A step of `seconds` in all, `training_seconds` of them spent on its training rows."""
        self._serving.append((inference_tokens, seconds - training_seconds))
        if training_tokens or backward_tokens:
            self._training.append((training_tokens, backward_tokens, backward_passes,
                                   training_seconds))
        serving, training = self.prior[:2], self.prior[2:]
        if len(self._serving) >= MIN_SAMPLES:
            data = np.array(self._serving, dtype=np.float64)
            x = np.column_stack([np.ones(len(data)), data[:, 0]])
            serving = _fit(x, data[:, 1], self.prior[:2], slopes=[False, True])
        if len(self._training) >= MIN_SAMPLES:
            data = np.array(self._training, dtype=np.float64)
            x = np.column_stack([data[:, 0] > 0, data[:, 0], data[:, 2], data[:, 1]])
            training = _fit(x, data[:, 3], self.prior[2:], slopes=[False, True, False, True])
        self.coefficients = (*serving, *training)

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

    def inference_budget(self, seconds: float, cap: int) -> int:
        """The most inference tokens a step may hold and still take at most `seconds`."""
        a, b_serve = self.coefficients[:2]
        return int(max(1, min(cap, (seconds - a) / b_serve)))


def _fit(x: np.ndarray, y: np.ndarray, prior, slopes: list[bool]) -> tuple[float, ...]:
    """Coefficients of y ~ x, fixed costs >= 0 and per-token slopes > 0 (`slopes` marks
    which is which). A little ridge toward the prior keeps the fit sane when a column never
    varies (no backward yet, say); samples far off the first fit are dropped and the fit is
    made again."""
    prior = np.array(prior)
    ridge = 1e-3 * np.diag([1e2 if slope else 1.0 for slope in slopes])

    def solve(rows):
        xs = x[rows]
        return np.linalg.solve(xs.T @ xs + ridge, xs.T @ y[rows] + ridge @ prior)

    coefficients = solve(slice(None))
    residuals = np.abs(x @ coefficients - y)
    keep = residuals <= OUTLIER * np.median(residuals) + 1e-6
    if keep.sum() >= len(prior) and not keep.all():
        coefficients = solve(keep)
    return tuple(float(max(c, 1e-6 if slope else 0.0)) for c, slope in zip(coefficients, slopes))
