"""One fine-tuning job inside the engine: its data, its adapter's weights, AdamW, the
learning-rate schedule, and its versions.

The engine drives it, once per step that has room for training:
  chunk = trainer.next_chunk(budget)       # examples of the current micro-batch
  ... one forward pass over inference rows and the chunk's rows ...
  trainer.loss(logits_of_chunk_rows).backward()
  trainer.after_chunk()                    # optimizer step at accumulation boundaries
A micro-batch may run over several steps in chunks; its loss is normalised by its own
number of target tokens, so the summed gradients equal those of the whole micro-batch.

A job that spans the ranks of a sharded base runs on every rank with the same spec: each rank
takes every world_size-th example of each micro-batch, normalised by the target tokens of the
whole micro-batch, so the sum of the ranks' gradients is the gradient of the whole
micro-batch. At an optimizer step the rank waits (`awaiting_ranks`) until the step sync has
every rank's gradients summed into its own (`synced_optimizer_step`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from importlib import resources

import torch
from torch.nn import functional as F

from cotune.adapters.peft_format import LoraAdapter, LoraModule, load_peft_adapter
from cotune.engine.checkpoint import latest_version, load_checkpoint, save_checkpoint
from cotune.engine.finetune_spec import FinetuneSpec
from cotune.engine.training_data import Example, read_training_data, split_eval
from cotune.model.llama import CausalLM, ForwardBatch
from cotune.model.lora_routing import LoraRouting, TrainableLora


@dataclass
class TrainingChunk:
    examples: list[Example]
    normaliser: int  # target tokens of the whole micro-batch, times grad_accumulation

    @property
    def num_tokens(self) -> int:
        return sum(len(e.token_ids) for e in self.examples)


class Trainer:
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
        self.lora = _init_lora(spec, model)
        opt = spec.optimizer
        self.optimizer = torch.optim.AdamW(self.lora.parameters(), lr=opt.lr, betas=opt.betas,
                                           eps=opt.eps, weight_decay=opt.weight_decay)
        batches_per_epoch = math.ceil(len(self.train_examples) / spec.batch_size)
        steps_per_epoch = math.ceil(batches_per_epoch / spec.grad_accumulation)
        self.total_steps = spec.max_steps or steps_per_epoch * spec.epochs
        # Progress, all of it saved in a checkpoint.
        self.step = 0  # optimizer steps done
        self.micro = 0  # micro-batches done in the current accumulation window
        self.epoch, self.position = 0, 0  # next example: order(epoch)[position]
        self.tokens = 0
        self.losses: list[float] = []  # per optimizer step
        self.versions: list[int] = []
        self.metrics: dict = {}
        self.checkpoint_requested = False  # set to publish a version at the next step
        self.awaiting_ranks = False  # a spanning job's share is done; its step waits for the ranks
        self._window_loss = 0.0
        self._pending: list[Example] = []
        self._normaliser = 0
        self._resume()

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    def next_chunk(self, budget: int) -> TrainingChunk:
        """Examples of the current micro-batch that fit in `budget` tokens (at least one: the
        floor that keeps every job moving)."""
        if not self._pending:
            self._start_micro_batch()
        taken, tokens = [], 0
        for example in self._pending:
            if taken and tokens + len(example.token_ids) > budget:
                break
            taken.append(example)
            tokens += len(example.token_ids)
        return TrainingChunk(taken, self._normaliser)

    def next_example_tokens(self) -> int:
        """Tokens of the example the next chunk starts with."""
        if not self._pending:
            self._start_micro_batch()
        return len(self._pending[0].token_ids)

    def loss(self, logits: torch.Tensor, chunk: TrainingChunk) -> torch.Tensor:
        """Summed next-token cross-entropy of the chunk's targets over the normaliser.
        logits: (chunk tokens, vocab), the chunk's rows in order."""
        targets = _shifted_targets(chunk.examples, logits.device)  # (chunk tokens,)
        loss = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        return loss / chunk.normaliser

    def after_chunk(self, chunk: TrainingChunk, loss: float) -> bool:
        """Records a chunk whose backward ran; takes an optimizer step at the end of an
        accumulation window. Returns True when a step was taken."""
        self._pending = self._pending[len(chunk.examples):]
        self._window_loss += loss
        self.tokens += chunk.num_tokens
        if self._pending:
            return False
        self.micro += 1
        if self.micro < self.spec.grad_accumulation and not self._epoch_ends():
            return False
        if self.span is not None:
            self.awaiting_ranks = True
            return False
        self._optimizer_step()
        return True

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

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Eval loss, and retention: the base model's loss on general text over the adapter's
        (1.0: nothing forgotten; below 1: the adapter made general text less likely)."""
        metrics = {"train_loss": self.losses[-1] if self.losses else None}
        if self.eval_examples:
            metrics["eval_loss"] = self._mean_loss(self.eval_examples, self.lora)
        base = self._mean_loss(self.general_examples, None)
        adapted = self._mean_loss(self.general_examples, self.lora)
        metrics.update(general_loss_base=base, general_loss_adapter=adapted,
                       retention=base / adapted)
        return metrics

    def adapter(self) -> LoraAdapter:
        """The current weights as a PEFT adapter (a copy: training goes on)."""
        lora, modules = self.spec.lora, {}
        for name in self.lora.module_names():
            a, b, scale = self.lora.weights(name)
            modules[name] = LoraModule(a=a.detach().clone(), b=b.detach().clone(), scale=scale)
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
                  "lora_alpha": lora.alpha, "use_rslora": lora.rslora,
                  "target_modules": sorted(lora.targets), "lora_dropout": lora.dropout,
                  "bias": "none", "base_model_name_or_path": None}
        return LoraAdapter(modules=modules, config=config)

    def checkpoint(self) -> int:
        """Publishes the next version with its training state; returns its number."""
        parent = self.versions[-1] if self.versions else None
        version = (parent or 0) + 1
        self.metrics = self.evaluate()
        provenance = {"base_fingerprint": self.base_fingerprint, "parent_version": parent,
                      "dataset_fingerprint": self.dataset_fingerprint,
                      "hyperparameters": self.spec.hyperparameters(), "job_id": self.job_id,
                      "step": self.step, "metrics": self.metrics}
        self.versions.append(version)  # the saved state already counts this version
        try:
            save_checkpoint(self.spec.adapter_dir, version, self.adapter(), self._progress(),
                            self.optimizer, provenance)
        except BaseException:
            self.versions.pop()
            raise
        self.checkpoint_requested = False
        return version

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
        self.step += 1
        self.micro = 0
        self.losses.append(self._window_loss)
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

    def _mean_loss(self, examples: list[Example], lora: TrainableLora | None) -> float:
        total, count = 0.0, 0
        for example in examples:
            n = len(example.token_ids)
            batch = ForwardBatch(torch.tensor(example.token_ids), [n],
                                 lora=LoraRouting.from_sequences([n], [lora]))
            logits = self.model.logits(self.model(batch))
            targets = _shifted_targets([example], logits.device)
            total += F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
            count += sum(example.loss_mask)
        return total / max(1, count)

    def _progress(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "position": self.position,
                "tokens": self.tokens, "losses": self.losses, "versions": self.versions,
                "dropout_rng": self.lora.generator.get_state().tolist()}

    def _resume(self) -> None:
        version = latest_version(self.spec.adapter_dir)
        if not version:
            return
        shapes = {n: (m.in_features, m.out_features)
                  for n, m in self.model.lora_modules(self.spec.lora.targets).items()}
        saved = load_peft_adapter(self.spec.adapter_dir / f"v{version}", shapes,
                                  self.spec.lora.rank)
        with torch.no_grad():
            for name, module in saved.modules.items():
                a, b, _ = self.lora.weights(name)
                a.copy_(module.a)
                b.copy_(module.b)
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


def _init_lora(spec: FinetuneSpec, model: CausalLM) -> TrainableLora:
    """A as PEFT initialises it (Kaiming-uniform, a=sqrt(5): U(-1/sqrt(d_in), 1/sqrt(d_in))),
    B zero, so the new adapter starts as the base model; drawn from the job's seed."""
    generator = torch.Generator().manual_seed(spec.seed)
    modules = {}
    for name, module in model.lora_modules(spec.lora.targets).items():
        bound = 1.0 / math.sqrt(module.in_features)
        a = (torch.rand(spec.lora.rank, module.in_features, generator=generator) * 2 - 1) * bound
        b = torch.zeros(module.out_features, spec.lora.rank)
        modules[name] = (a, b, spec.lora.scale)
    dropout_rng = torch.Generator().manual_seed(spec.seed + 1)
    return TrainableLora(modules, dropout=spec.lora.dropout, generator=dropout_rng).to(
        model.device)


def _shifted_targets(examples: list[Example], device) -> torch.Tensor:
    """(total tokens,) the token each row predicts, -100 where the row predicts nothing:
    row t of an example predicts token t+1 when that token is a target."""
    targets = []
    for example in examples:
        ids, mask = example.token_ids, example.loss_mask
        targets.extend(ids[t + 1] if mask[t + 1] else -100 for t in range(len(ids) - 1))
        targets.append(-100)
    return torch.tensor(targets, device=device)


def _general_text(tokenizer, max_length: int) -> list[Example]:
    """Paragraphs of general knowledge shipped with cotune: the retention probe."""
    text = resources.files("cotune").joinpath("data/general_text.txt").read_text()
    examples = []
    for paragraph in filter(None, text.splitlines()):
        ids = tokenizer(paragraph).input_ids[:max_length]
        examples.append(Example(ids, [False] + [True] * (len(ids) - 1)))
    return examples
