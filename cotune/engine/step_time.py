"""A measured model of how long a step takes, from which the scheduler sizes each step.

    seconds = a + b_serve * inference_tokens + b_train * training_tokens

fitted by least squares over the most recent steps (training tokens cost a forward and a
backward, so they get their own slope). Until enough steps are seen, conservative priors
stand in. The fit is what turns SLO targets into token budgets: the largest step whose
predicted time still meets the time-per-output-token target.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class StepTimeModel:
    def __init__(self, window: int = 128, prior: tuple[float, float, float] = (0.02, 1e-3, 3e-3)):
        self.samples: deque[tuple[int, int, float]] = deque(maxlen=window)
        self.prior = prior
        self.coefficients = prior  # (a, b_serve, b_train)

    def observe(self, inference_tokens: int, training_tokens: int, seconds: float) -> None:
        self.samples.append((inference_tokens, training_tokens, seconds))
        if len(self.samples) >= 8:
            self.coefficients = self._fit()

    def predict(self, inference_tokens: int, training_tokens: int = 0) -> float:
        a, b_serve, b_train = self.coefficients
        return a + b_serve * inference_tokens + b_train * training_tokens

    def inference_budget(self, seconds: float, cap: int) -> int:
        """The most inference tokens a step may hold and still take at most `seconds`."""
        a, b_serve, _ = self.coefficients
        return int(max(1, min(cap, (seconds - a) / b_serve)))

    def training_budget(self, seconds: float, inference_tokens: int, cap: int) -> int:
        """Training tokens that fit beside `inference_tokens` within `seconds` (may be 0)."""
        _, _, b_train = self.coefficients
        left = seconds - self.predict(inference_tokens)
        return int(max(0, min(cap, left / b_train)))

    def _fit(self) -> tuple[float, float, float]:
        data = np.array(self.samples, dtype=np.float64)
        x = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1]])
        # A little ridge toward the prior keeps the fit sane when a column never varies
        # (say, no training yet).
        ridge = 1e-3 * np.diag([1.0, 1e2, 1e2])
        rhs = x.T @ data[:, 2] + ridge @ np.array(self.prior)
        a, b_serve, b_train = np.linalg.solve(x.T @ x + ridge, rhs)
        return (max(a, 0.0), max(b_serve, 1e-6), max(b_train, 1e-6))
