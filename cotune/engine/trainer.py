"""One fine-tuning job inside the engine: its data, its adapter's weights, AdamW, the
learning-rate schedule, and its versions.

The engine drives it, once per step that has room for training:
  work = trainer.plan(seconds, cost, max_tokens)  # what fits in the room the SLOs leave
  ... one forward pass over inference rows and work.pieces' rows ...
  trainer.train(work, hidden_of_those_rows, model.logits)  # losses, then backward
Training is token-level: an example runs as pieces over several steps when a step has
room for only part of it (example_pieces.py). A micro-batch's loss is normalised by its own
number of target tokens, so the gradients of its pieces add up to those of the whole
micro-batch; the optimizer steps at the end of an accumulation window.

A job that spans the ranks of a sharded base runs on every rank with the same spec: each rank
takes every world_size-th example of each micro-batch, normalised by the target tokens of the
whole micro-batch, so the sum of the ranks' gradients is the gradient of the whole
micro-batch. At an optimizer step the rank waits (`awaiting_ranks`) until the step sync has
every rank's gradients summed into its own (`synced_optimizer_step`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch.nn import functional as F

from cotune.adapters.peft_format import LoraAdapter
from cotune.engine.checkpoint import discard_incomplete, load_checkpoint, save_checkpoint
from cotune.engine.evaluation import Evaluation, shifted_targets
from cotune.engine.example_pieces import Cost, ExamplePieces, ExampleRun, TrainingWork
from cotune.engine.finetune_spec import MAX_STEPS, FinetuneSpec, SpecError
from cotune.engine.live_lora import load_lora_weights, lora_snapshot, new_lora
from cotune.engine.training_data import Example, read_training_data, split_eval
from cotune.model.llama import CausalLM
from cotune.model.training_rows import TrainingRows


@dataclass(frozen=True)
class Published:
    """A version a job has just saved: its number, directory and weights (a copy, taken
    when it was saved: training goes on)."""

    version: int
    path: Path
    adapter: LoraAdapter


class Trainer:
    # What the engine asks of it (TrainsInSteps). Its caller waits on no step of it: a
    # training lane may train it beside the serving steps.
    may_train_on_lane = True

    def __init__(self, spec: FinetuneSpec, model: CausalLM, tokenizer, job_id: str,
                 base_fingerprint: str = "", span: tuple[int, int] | None = None):
        """`span`: (rank, world_size) for a job that spans the ranks of a sharded base."""
        self.spec, self.model, self.job_id, self.span = spec, model, job_id, span
        self.base_fingerprint = base_fingerprint
        data = read_training_data(spec.data, tokenizer, spec.max_length)
        self.dataset_fingerprint = data.fingerprint
        self.train_examples, self.eval_examples = split_eval(data, spec.eval_fraction, spec.seed)
        if span is not None:
            _check_span(len(self.train_examples), spec.batch_size, span[1])
        self.general_examples = _general_text(tokenizer, spec.max_length)
        self._general_loss_base: float | None = None  # the base model's, worked out once
        self.lora = new_lora(spec.lora, spec.seed, model)
        if spec.init_adapter is not None:  # a version it continues; _resume may go past it
            load_lora_weights(self.lora, spec.lora, model, Path(spec.init_adapter))
        opt = spec.optimizer
        self.optimizer = torch.optim.AdamW(self.lora.parameters(), lr=opt.lr, betas=opt.betas,
                                           eps=opt.eps, weight_decay=opt.weight_decay)
        batches_per_epoch = math.ceil(len(self.train_examples) / spec.batch_size)
        steps_per_epoch = math.ceil(batches_per_epoch / spec.grad_accumulation)
        self.total_steps = spec.max_steps or steps_per_epoch * spec.epochs
        if self.total_steps > MAX_STEPS:
            raise SpecError(f"the job would take {self.total_steps} optimizer steps "
                            f"({steps_per_epoch} an epoch, {spec.epochs} epochs); accepted: at "
                            f"most {MAX_STEPS}; lower epochs or set max_steps")
        # Progress, all of it saved in a checkpoint.
        self.step = 0  # optimizer steps done
        self.micro = 0  # micro-batches done in the current accumulation window
        self.epoch, self.position = 0, 0  # next example: order(epoch)[position]
        self.tokens = 0
        self.losses: list[float] = []  # per optimizer step
        self.versions: list[int] = []
        self.metrics: dict = {}
        self.checkpoint_requested = False  # set to publish a version at the next step
        self._evaluation: Evaluation | None = None  # of the version being published
        self.awaiting_ranks = False  # a spanning job's share is done; its step waits for the ranks
        self._window_loss = 0.0
        self._pending: list[Example] = []  # examples of the micro-batch not yet started
        self._normaliser = 0
        # those started whose backward is not done
        self.pieces = ExamplePieces(model, self.lora, self._next_run)
        self._resume()

    @property
    def finished(self) -> bool:
        """Every optimizer step taken (its last version may still be on its way: `done`)."""
        return self.step >= self.total_steps

    @property
    def has_work(self) -> bool:
        """Always, while it is in the engine: its next examples, its version's evaluation, or
        its wait for the other ranks (which the steps go on for)."""
        return True

    @property
    def partial_examples(self) -> int:
        """Examples forwarded in part: the rest of them runs in later steps."""
        return self.pieces.partial_examples

    def plan(self, seconds: float, cost: Cost, max_tokens: int, split: bool = True,
             at_least_one: bool = False) -> TrainingWork:
        """The training work that fits in `seconds` by `cost`, with at most `max_tokens`
        forward rows, from the current micro-batch's examples (ExamplePieces.plan). While a
        version is being published: the next examples of its evaluation that fit, and no
        training."""
        work = TrainingWork()
        if self._evaluation is not None:
            work.evaluation = self._evaluation.take(
                lambda tokens: tokens <= max_tokens and cost(tokens, 0, 0) <= seconds,
                at_least_one)
            return work
        if not self.pieces.runs and not self._pending:
            self._start_micro_batch()
        self.pieces.plan(work, seconds, cost, max_tokens, split, at_least_one)
        return work

    def train(self, work: TrainingWork, hidden: torch.Tensor | None,
              logits: Callable[[torch.Tensor], torch.Tensor], rows: TrainingRows | None) -> bool:
        """After the step's forward pass: the losses of the forwarded pieces, from their rows'
        hidden states (R, hidden), `logits` and the pass's `rows`, then the planned backward.
        Returns True when an optimizer step was taken."""
        if work.evaluation:
            self._evaluation.run(work.evaluation, self.model)
            return False
        loss, tokens = self.pieces.train(work, hidden, logits, rows)
        self._window_loss += loss
        self.tokens += tokens
        if self.pieces.runs or self._pending:
            return False
        self.micro += 1
        if self.micro < self.spec.grad_accumulation and not self._epoch_ends():
            return False
        if self.span is not None:
            self.awaiting_ranks = True
            return False
        self._optimizer_step()
        return True

    def run(self, work: TrainingWork, hidden: torch.Tensor | None,
            logits: Callable[[torch.Tensor], torch.Tensor], rows: TrainingRows | None,
            evaluate_at_once: bool = False) -> Published | None:
        """`train`, then what follows an optimizer step (`after_optimizer_step`), or, after
        a share of a version's evaluation, the version once the evaluation is done."""
        if self.train(work, hidden, logits, rows):
            return self.after_optimizer_step(evaluate_at_once)
        return self._publish_ready() if work.evaluation else None

    def after_optimizer_step(self, evaluate_at_once: bool) -> Published | None:
        """Begins a version when one is due; its evaluation runs in the work that `plan`
        gives next (so that it never holds up the requests), or here with
        `evaluate_at_once` (ranks in lockstep, which step together). Returns the version
        once it is saved."""
        if self.should_checkpoint():
            self.begin_checkpoint()
            if evaluate_at_once:
                self.evaluate_now()
        return self._publish_ready()

    def work_failed(self, error: BaseException) -> bool:
        """A job ends on the first failure of its work; its versions published so far stay."""
        return True

    def _publish_ready(self) -> Published | None:
        return self.checkpoint() if self.checkpoint_ready else None

    def _next_run(self) -> ExampleRun | None:
        """The micro-batch's next example not started, with its loss: cross-entropy over its
        target tokens, normalised by the micro-batch's."""
        if not self._pending:
            return None
        example = self._pending.pop(0)
        targets, normaliser = shifted_targets([example], self.model.device), self._normaliser

        def loss(logits: torch.Tensor, start: int, n: int) -> torch.Tensor:
            return F.cross_entropy(logits, targets[start:start + n], ignore_index=-100,
                                   reduction="sum") / normaliser

        return ExampleRun(example.token_ids, loss)

    def synced_optimizer_step(self, all_reduce_sum) -> None:
        """The optimizer step of a spanning job, called on every rank at once: the ranks'
        partial gradients and window losses summed (`all_reduce_sum(tensor)` in place)."""
        params = list(self.lora.parameters())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        loss = torch.tensor([self._window_loss], device=params[0].device)
        flat = torch.cat([p.grad.flatten() for p in params] + [loss])
        all_reduce_sum(flat)
        for p, g in zip(params, flat[:-1].split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))
        self._window_loss = float(flat[-1])
        self.awaiting_ranks = False
        self._optimizer_step()

    def should_checkpoint(self) -> bool:
        every = self.spec.checkpoint_every
        return self.finished or self.checkpoint_requested or (every > 0
                                                              and self.step % every == 0)

    def begin_checkpoint(self) -> None:
        """Starts publishing the next version: its evaluation runs in the steps to come
        (`plan` gives its examples), and `checkpoint` saves it once `checkpoint_ready`."""
        self._evaluation = Evaluation(self.eval_examples, self.general_examples, self.lora,
                                      self._general_loss_base)

    @property
    def done(self) -> bool:
        """Every optimizer step taken, and the last version published."""
        return self.finished and not self.publishing

    @property
    def publishing(self) -> bool:
        """A version is on its way out: the job trains no more until it is published."""
        return self._evaluation is not None

    @property
    def checkpoint_ready(self) -> bool:
        return self._evaluation is not None and self._evaluation.done

    def evaluate_now(self) -> None:
        """The rest of the evaluation at once (ranks in lockstep, which step together)."""
        self._evaluation.run(self._evaluation.take_all(), self.model)

    def adapter(self) -> LoraAdapter:
        """The current weights as a PEFT adapter (a copy: training goes on)."""
        return lora_snapshot(self.lora, self.spec.lora)

    def checkpoint(self) -> Published:
        """Publishes the next version with its training state, once its evaluation is done
        (`checkpoint_ready`)."""
        parent = self.versions[-1] if self.versions else None
        version = (parent or 0) + 1
        evaluated = self._evaluation.metrics()
        self._general_loss_base = evaluated["general_loss_base"]
        self.metrics = {"train_loss": self.losses[-1] if self.losses else None, **evaluated}
        provenance = {"base_fingerprint": self.base_fingerprint, "parent_version": parent,
                      "dataset_fingerprint": self.dataset_fingerprint,
                      "hyperparameters": self.spec.hyperparameters(), "job_id": self.job_id,
                      "step": self.step, "metrics": self.metrics}
        self.versions.append(version)  # the saved state already counts this version
        adapter = self.adapter()
        try:
            save_checkpoint(self.spec.adapter_dir, version, adapter, self._progress(),
                            self.optimizer, provenance)
        except BaseException:
            self.versions.pop()
            raise
        self.checkpoint_requested = False
        self._evaluation = None
        return Published(version, self.spec.adapter_dir / f"v{version}", adapter)

    def _start_micro_batch(self) -> None:
        if self.micro == 0:
            self.optimizer.zero_grad(set_to_none=True)
            self._window_loss = 0.0
        order = self.order(self.epoch)
        self._pending = [self.train_examples[i]
                         for i in order[self.position:self.position + self.spec.batch_size]]
        self.position += len(self._pending)
        targets = sum(sum(e.loss_mask) for e in self._pending)
        self._normaliser = targets * self.spec.grad_accumulation
        if self.span is not None:
            rank, world_size = self.span
            self._pending = self._pending[rank::world_size]

    def _epoch_ends(self) -> bool:
        return self.position >= len(self.train_examples)

    def _optimizer_step(self) -> None:
        max_norm = self.spec.optimizer.max_grad_norm
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.lora.parameters(), max_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(self.step)
        self.optimizer.step()
        self.losses.append(self._window_loss)  # before the step count: see Job._report_progress
        self.micro = 0
        self.step += 1
        if self._epoch_ends():
            self.epoch, self.position = self.epoch + 1, 0

    def _lr(self, step: int) -> float:
        """Linear warmup, then constant, linear or cosine decay to 0 at total_steps."""
        spec, peak = self.spec, self.spec.optimizer.lr
        if step < spec.warmup_steps:
            return peak * (step + 1) / spec.warmup_steps
        if spec.schedule == "constant":
            return peak
        progress = (step - spec.warmup_steps) / max(1, self.total_steps - spec.warmup_steps)
        if spec.schedule == "linear":
            return peak * max(0.0, 1.0 - progress)
        return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def order(self, epoch: int) -> list[int]:
        """The examples' order in `epoch`: a shuffle fixed by the seed and the epoch."""
        order = list(range(len(self.train_examples)))
        random.Random(self.spec.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _progress(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "position": self.position,
                "tokens": self.tokens, "losses": self.losses, "versions": self.versions,
                "dropout_rng": self.lora.generator.get_state().tolist()}

    def _resume(self) -> None:
        version = discard_incomplete(self.spec.adapter_dir)
        if not version:
            return
        load_lora_weights(self.lora, self.spec.lora, self.model,
                          self.spec.adapter_dir / f"v{version}")
        state = load_checkpoint(self.spec.adapter_dir, version, self.optimizer)
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.tokens, self.losses = state["tokens"], state["losses"]
        self.versions = state["versions"]
        self.lora.generator.set_state(torch.tensor(state["dropout_rng"], dtype=torch.uint8))


def _check_span(examples: int, batch_size: int, world_size: int) -> None:
    """Every micro-batch of a spanning job must give each rank at least one example."""
    last = examples % batch_size or batch_size
    if min(batch_size, last) < world_size:
        raise ValueError(
            f"a job spanning {world_size} ranks needs at least {world_size} examples in every "
            f"micro-batch; batch_size {batch_size} over {examples} training examples leaves "
            f"{min(batch_size, last)}; raise batch_size or run the job on one rank")


def _general_text(tokenizer, max_length: int) -> list[Example]:
    """Paragraphs of general knowledge shipped with cotune: the retention probe."""
    text = resources.files("cotune").joinpath("data/general_text.txt").read_text()
    examples = []
    for paragraph in filter(None, text.splitlines()):
        ids = tokenizer(paragraph).input_ids[:max_length]
        examples.append(Example(ids, [False] + [True] * (len(ids) - 1)))
    return examples
