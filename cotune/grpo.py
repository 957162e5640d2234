"""GRPO on a small verifiable task: answer a question with one word.

The recipe of `cotune demo rl` (over a real server, through the SDK) and of `cotune bench
rl`'s loops (in-process, cotune's one engine against two systems that sync through files).
It imports no torch: it drives a `Policy`, which samples groups of completions and trains on
them.

Each step takes `prompts` questions and samples `group` completions of each at temperature 1,
with the sampler's logprobs. A completion's reward is 1 when it stopped by itself and holds
exactly one word, else 0 (SmolLM2-135M-Instruct, asked for one word, does so about one time in
ten). A completion's advantage is its reward minus its group's mean (no division by the
group's spread: Dr. GRPO), over the step's number of completions; completions of a group
whose rewards are all equal teach nothing and are left out. The loss is importance sampling
on the sampled tokens, and one optimizer step follows each batch: on-policy, so the ratio is
1 and its gradient is the policy gradient.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "brown",
           "grey"]
ANIMALS = ["cat", "dog", "horse", "lion", "tiger", "cow", "sheep", "goat", "fox", "bear",
           "duck", "owl"]
QUESTIONS = ([f"Name an animal that is {colour}." for colour in COLOURS]
             + [f"What sound does a {animal} make?" for animal in ANIMALS])
INSTRUCTION = " Answer with one word."
_WORD = re.compile(r"[A-Za-z']+")


@dataclass(frozen=True)
class Sample:
    """One sampled completion: its prompt's tokens, its own (the stop token included when it
    stopped by itself) with their logprobs, and its text."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    stopped: bool


class Policy(Protocol):
    def prompt_ids(self, question: str) -> list[int]:
        """The question as the model's chat template renders it, the assistant's turn open."""

    def sample(self, prompts: list[list[int]], group: int, max_tokens: int,
               seed: int) -> list[list[Sample]]:
        """`group` completions of each prompt at temperature 1, with their logprobs."""

    def train(self, examples: list[dict]) -> None:
        """ForwardBackward (importance_sampling) over `examples` (token_ids, weights,
        logprobs, advantages per token), then one OptimStep."""


def reward(sample: Sample) -> float:
    return 1.0 if sample.stopped and len(_WORD.findall(sample.text)) == 1 else 0.0


@dataclass(frozen=True)
class Settings:
    prompts: int = 4  # questions a step
    group: int = 8  # completions of each
    max_tokens: int = 16
    seed: int = 0


@dataclass
class StepReport:
    step: int
    mean_reward: float
    trained_on: int  # completions with an advantage
    sample_seconds: float
    train_seconds: float
    examples: list[str] = field(default_factory=list)  # a few completions


def examples_of(groups: list[list[Sample]]) -> list[dict]:
    """The training examples of a step's groups: the sampled tokens weigh 1, with the
    sampler's logprobs and the completion's advantage; the prompt's tokens weigh 0."""
    total = sum(len(g) for g in groups)
    examples = []
    for samples in groups:
        rewards = [reward(s) for s in samples]
        mean = sum(rewards) / len(rewards)
        for sample, value in zip(samples, rewards):
            advantage = (value - mean) / total
            if advantage == 0:
                continue
            prompt, n = len(sample.prompt_ids), len(sample.token_ids)
            examples.append({"token_ids": sample.prompt_ids + sample.token_ids,
                             "weights": [0.0] * prompt + [1.0] * n,
                             "logprobs": [0.0] * prompt + sample.logprobs,
                             "advantages": [0.0] * prompt + [advantage] * n})
    return examples


DEFAULT_SETTINGS = Settings()


def run(policy: Policy, steps: int, settings: Settings = DEFAULT_SETTINGS,
        on_step: Callable[[StepReport], None] | None = None) -> list[StepReport]:
    """`steps` GRPO steps; a report of each (to `on_step` as each ends)."""
    rng = random.Random(settings.seed)
    prompts = {q: policy.prompt_ids(q + INSTRUCTION) for q in QUESTIONS}
    reports = []
    for step in range(steps):
        questions = rng.sample(QUESTIONS, settings.prompts)
        started = time.perf_counter()
        groups = policy.sample([prompts[q] for q in questions], settings.group,
                               settings.max_tokens, rng.randrange(1 << 30))
        sampled = time.perf_counter()
        examples = examples_of(groups)
        if examples:
            policy.train(examples)
        samples = [s for g in groups for s in g]
        report = StepReport(step, sum(map(reward, samples)) / len(samples), len(examples),
                            sampled - started, time.perf_counter() - sampled,
                            [s.text for s in samples[::settings.group][:3]])
        reports.append(report)
        if on_step is not None:
            on_step(report)
    return reports
