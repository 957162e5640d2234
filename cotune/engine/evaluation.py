"""A version's evaluation: the eval loss, and retention (the base model's loss on general
text over the adapter's), as forward passes that the engine spreads over its steps, a few
examples at a time in the room a step has, so that publishing a version never holds up the
requests being served.

    evaluation = Evaluation(eval_examples, general_examples, lora, base_loss)
    while not evaluation.done:
        evaluation.run(evaluation.take(fits), model)  # one step's share
    metrics = evaluation.metrics()
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby

import torch
from torch.nn import functional as F

from cotune.engine.training_data import Example
from cotune.model.llama import CausalLM, ForwardBatch
from cotune.model.lora_routing import LoraRouting, TrainableLora

PASS_TOKENS = 2048  # tokens a forward pass of evaluation holds, over many examples


@dataclass(frozen=True)
class EvalItem:
    metric: str  # "eval_loss", "general_loss_base" or "general_loss_adapter"
    example: Example
    lora: TrainableLora | None  # None: the base model

    @property
    def tokens(self) -> int:
        return len(self.example.token_ids)


class Evaluation:
    def __init__(self, eval_examples: list[Example], general_examples: list[Example],
                 lora: TrainableLora, general_loss_base: float | None):
        """`general_loss_base`: the base model's loss on the general text when known (the
        base is frozen: it is worked out once per job)."""
        items = [EvalItem("eval_loss", e, lora) for e in eval_examples]
        if general_loss_base is None:
            items += [EvalItem("general_loss_base", e, None) for e in general_examples]
        items += [EvalItem("general_loss_adapter", e, lora) for e in general_examples]
        self._todo = deque(items)
        self._known = {} if general_loss_base is None else \
            {"general_loss_base": general_loss_base}
        self._loss: Counter[str] = Counter()  # metric -> summed loss over target tokens
        self._targets: Counter[str] = Counter()

    @property
    def done(self) -> bool:
        return not self._todo

    def take(self, fits: Callable[[int], bool], at_least_one: bool = False) -> list[EvalItem]:
        """The next examples, in order, while `fits(their tokens)`; with `at_least_one`, the
        next one even when it alone does not fit."""
        taken, tokens = [], 0
        while self._todo and (fits(tokens + self._todo[0].tokens)
                              or (at_least_one and not taken)):
            tokens += self._todo[0].tokens
            taken.append(self._todo.popleft())
        return taken

    def take_all(self) -> list[EvalItem]:
        return self.take(lambda tokens: True)

    @torch.no_grad()
    def run(self, items: list[EvalItem], model: CausalLM) -> None:
        """Forward passes over `items` (many examples to a pass, each attending only within
        itself), their losses added to their metrics."""
        for (metric, lora), group in groupby(items, key=lambda i: (i.metric, i.lora)):
            for examples in _passes([item.example for item in group], PASS_TOKENS):
                lens = [len(e.token_ids) for e in examples]
                routing = LoraRouting.from_sequences(lens, [lora] * len(lens))
                batch = ForwardBatch(torch.tensor([t for e in examples for t in e.token_ids]),
                                     lens, lora=routing)
                logits = model.logits(model(batch))
                targets = shifted_targets(examples, logits.device)
                self._loss[metric] += F.cross_entropy(logits, targets, ignore_index=-100,
                                                      reduction="sum").item()
                self._targets[metric] += sum(sum(e.loss_mask) for e in examples)

    def metrics(self) -> dict[str, float]:
        """Once done: the mean loss per target token of each metric, and retention."""
        means = {metric: self._loss[metric] / max(1, self._targets[metric])
                 for metric in self._targets}
        means = {**self._known, **means}
        means["retention"] = means["general_loss_base"] / means["general_loss_adapter"]
        return means


def shifted_targets(examples: list[Example], device) -> torch.Tensor:
    """(total tokens,) the token each row predicts, -100 where the row predicts nothing:
    row t of an example predicts token t+1 when that token is a target."""
    targets = []
    for example in examples:
        ids, mask = example.token_ids, example.loss_mask
        targets.extend(ids[t + 1] if mask[t + 1] else -100 for t in range(len(ids) - 1))
        targets.append(-100)
    return torch.tensor(targets, device=device)


def _passes(examples: list[Example], max_tokens: int) -> list[list[Example]]:
    """Consecutive examples in groups of at most `max_tokens` tokens (or one longer example)."""
    groups: list[list[Example]] = []
    tokens = 0
    for example in examples:
        if not groups or tokens + len(example.token_ids) > max_tokens:
            groups.append([])
            tokens = 0
        groups[-1].append(example)
        tokens += len(example.token_ids)
    return groups
