"""A measured model of how long a step takes, from which the scheduler sizes each step.

    seconds = a + b_serve * inference_tokens + b_forward * training_tokens
                + b_backward * backward_tokens

fitted by least squares over the most recent steps. Training rows cost more than served
ones in the forward (a differentiable pass), and their backward (which recomputes each
layer's forward on them, see layer_checkpoint) runs in whichever step the trainer planned
it, so the two get their own slopes. Until enough steps are seen, conservative priors stand
in. The fit is what turns SLO targets into budgets: the largest step whose predicted time
still meets the time-per-output-token target, and the training work that fits beside it.
"""

from __future__ import annotations

from collections import deque

import numpy as np

PRIOR = (0.02, 1e-3, 1.5e-3, 3e-3)  # (a, b_serve, b_forward, b_backward)


class StepTimeModel:
    def __init__(self, window: int = 128, prior: tuple[float, float, float, float] = PRIOR):
        self.samples: deque[tuple[int, int, int, float]] = deque(maxlen=window)
        self.prior = prior
        self.coefficients = prior

    def observe(self, inference_tokens: int, training_tokens: int, backward_tokens: int,
                seconds: float) -> None:
        self.samples.append((inference_tokens, training_tokens, backward_tokens, seconds))
        if len(self.samples) >= 8:
            self.coefficients = self._fit()

    def predict(self, inference_tokens: int, training_tokens: int = 0,
                backward_tokens: int = 0) -> float:
        a = self.coefficients[0]
        return a + self.coefficients[1] * inference_tokens + self.training_cost(
            training_tokens, backward_tokens)

    def training_cost(self, training_tokens: int, backward_tokens: int) -> float:
        """Seconds that training rows add to a step: their forward and the backward run."""
        _, _, b_forward, b_backward = self.coefficients
        return b_forward * training_tokens + b_backward * backward_tokens

    def inference_budget(self, seconds: float, cap: int) -> int:
        """The most inference tokens a step may hold and still take at most `seconds`."""
        a, b_serve = self.coefficients[:2]
        return int(max(1, min(cap, (seconds - a) / b_serve)))

    def _fit(self) -> tuple[float, float, float, float]:
        data = np.array(self.samples, dtype=np.float64)
        x = np.column_stack([np.ones(len(data)), data[:, :3]])
        # A little ridge toward the prior keeps the fit sane when a column never varies
        # (say, no training yet).
        ridge = 1e-3 * np.diag([1.0, 1e2, 1e2, 1e2])
        rhs = x.T @ data[:, 3] + ridge @ np.array(self.prior)
        a, *slopes = np.linalg.solve(x.T @ x + ridge, rhs)
        return (max(a, 0.0), *(max(b, 1e-6) for b in slopes))
