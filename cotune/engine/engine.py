"""The engine: one base model, its paged KV cache, adapter slots and scheduler. Each `step`
is one forward pass over every scheduled token, whatever adapter each row uses."""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from cotune.adapters.residency import ResidentAdapters
from cotune.engine.detokenizer import IncrementalDetokenizer
from cotune.engine.kv_cache import PagedBatch, PagedKVCache
from cotune.engine.sampling import Sampler, SamplingParams, TokenLogprob
from cotune.engine.scheduler import (
    Admission,
    ScheduledChunk,
    Scheduler,
    SchedulerConfig,
    StepPlan,
)
from cotune.engine.sequence import Sequence
from cotune.engine.step_time import StepTimeModel
from cotune.engine.trainer import Trainer, TrainingChunk
from cotune.model.llama import CausalLM, ForwardBatch
from cotune.model.lora_routing import LoraRouting

IDLE_WAIT_S = 0.005  # a step with nothing to compute waits this long at most for a load


@dataclass
class EngineConfig:
    max_rank: int = 64  # largest LoRA rank a slot holds
    num_slots: int = 32  # adapters resident at once
    host_cache_mb: int = 1024  # parsed adapters kept in host memory, between disk and slots
    hot_slot_share: float = 0.25  # slots the busiest adapters keep against a scan of cold ones
    kv_cache_tokens: int = 16384  # tokens the paged KV cache holds over all sequences
    block_size: int = 16  # tokens per KV block
    max_batched_tokens: int = 512  # tokens per step, the hard cap
    max_running: int = 128  # sequences in the cache at once
    ttft_target_s: float = 2.0  # serving SLOs that size each step
    tpot_target_s: float = 0.25
    # The share of step time training keeps however busy serving is: jobs never starve, and
    # steps with no room for training (by the SLOs) mostly stay pure serving.
    train_floor_share: float = 0.1
    # torch threads for the engine's steps (process-wide); None: half the cores. Steps are
    # many small ops: on a 2-core machine, 2 threads run a background engine at half speed.
    num_threads: int | None = None

    @property
    def torch_threads(self) -> int:
        """The torch threads the engine's steps run on (`num_threads`, or half the cores)."""
        return self.num_threads or max(1, (os.cpu_count() or 1) // 2)


@dataclass
class StepOutput:
    seq: Sequence
    token_id: int
    text: str  # text that became final with this token
    logprob: TokenLogprob | None
    finished: bool


@dataclass(frozen=True)
class StepReport:
    """What one step computed, and how long it took."""

    decode_tokens: int
    prefill_tokens: int
    training_tokens: int
    seconds: float


class Engine:
    def __init__(self, model: CausalLM, tokenizer=None, stop_token_ids: set[int] = frozenset(),
                 config: EngineConfig | None = None, step_sync=None):
        """`step_sync`: with a base sharded over ranks, the ranks' lockstep
        (cotune.distributed.lockstep.Lockstep); every step begins and ends through it."""
        self.model, self.tokenizer = model, tokenizer
        self.step_sync = step_sync
        self.config = config = config or EngineConfig()
        self.stop_token_ids = set(stop_token_ids)
        num_blocks = -(-config.kv_cache_tokens // config.block_size)
        weight = model.model.embed_tokens.weight
        self.cache = PagedKVCache(model.config, num_blocks, config.block_size,
                                  dtype=weight.dtype, device=weight.device)
        self.scheduler = Scheduler(SchedulerConfig(
            config.max_batched_tokens, config.max_running, config.ttft_target_s,
            config.tpot_target_s), self.cache, admit=self._admit, release=self._release)
        self.step_time = StepTimeModel()
        self._recent_steps: deque[tuple[float, bool]] = deque(maxlen=64)
        self.adapters = ResidentAdapters(model, config.num_slots, config.max_rank,
                                         host_cache_bytes=config.host_cache_mb << 20,
                                         hot_share=config.hot_slot_share)
        self.sampler = Sampler()
        self._ids = itertools.count()
        self.trainers: list[Trainer] = []
        # Pausing one side turns co-serving into time slicing (the baseline benchmarks
        # compare against); neither is paused in normal operation.
        self.serving_paused = self.training_paused = False
        # Called as on_version(trainer, version, path) after a job publishes a version, and
        # on_job_end(trainer, error) when a job finishes (error None) or fails.
        self.on_version: Callable[[Trainer, int, Path], None] | None = None
        self.on_job_end: Callable[[Trainer, BaseException | None], None] | None = None
        # Called as on_step(StepReport) after every step that computed anything.
        self.on_step: Callable[[StepReport], None] | None = None

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self.trainers)

    def add_trainer(self, trainer: Trainer) -> None:
        """Starts training a job in the steps to come."""
        self.trainers.append(trainer)

    def remove_trainer(self, trainer: Trainer) -> None:
        if trainer in self.trainers:
            self.trainers.remove(trainer)

    def add(self, prompt_ids: list[int], params: SamplingParams,
            adapter: tuple[str, str | Path] | None = None, request_id: str | None = None,
            tenant: str = "default") -> Sequence:
        """Queues a request: `prepare`, then `enqueue`."""
        seq = self.prepare(prompt_ids, params, adapter, request_id, tenant)
        self.enqueue(seq)
        return seq

    def prepare(self, prompt_ids: list[int], params: SamplingParams,
                adapter: tuple[str, str | Path] | None = None, request_id: str | None = None,
                tenant: str = "default") -> Sequence:
        """A request checked and ready to queue; `adapter` is (key, PEFT directory) or None for
        the base model. Everything but the adapter's file is checked here; the adapter's
        disk->host load starts now, in the background (`seq.adapter_load`), and a request
        whose adapter fails to load ends with finish_reason "error". Safe from any thread
        while the engine steps: it reads no state that a step changes."""
        self._check_prompt(prompt_ids, params)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none")
        request_id = request_id or f"req-{next(self._ids)}"
        seq = Sequence(request_id, list(prompt_ids), params, tenant=tenant,
                       adapter=None if adapter is None else adapter[0])
        self.scheduler.check_fits(seq)
        if adapter is not None:
            seq.adapter_load = self.adapters.prefetch(*adapter)
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.prompt_ids, params.stop)
        return seq

    def enqueue(self, seq: Sequence) -> None:
        """Queues a prepared request for the steps to come (between steps only)."""
        self.scheduler.add(seq)

    def abort(self, seq: Sequence) -> None:
        if not seq.is_finished:
            self.scheduler.abort(seq)
            seq.finish_reason = "abort"
            self._release(seq)

    def step(self, on_output: Callable[[list[StepOutput]], None] | None = None
             ) -> list[StepOutput]:
        """One forward pass over the scheduled inference tokens and a chunk of training
        rows. Inference rows are sampled and handed to `on_output` before backward runs over
        the training rows. Returns one output per new token. With a sharded base every rank
        calls it together, with work or not (see Lockstep)."""
        if self.step_sync is None:
            return self._step(on_output)
        self.step_sync.begin_step()
        outputs = self._step(on_output)
        self.step_sync.end_step(self)
        return outputs

    def _step(self, on_output) -> list[StepOutput]:
        started = time.perf_counter()
        plan = StepPlan() if self.serving_paused else self.scheduler.schedule(
            self._inference_budget())
        # Rows of one adapter side by side: fewer segments for the LoRA ops.
        chunks = sorted(plan.chunks, key=lambda c: -1 if c.seq.slot is None else c.seq.slot)
        training = None if self.training_paused else self._training_chunk(
            self._training_room(plan.num_tokens))
        if not chunks and training is None:
            self._await_loads()
            return []
        decode_tokens = sum(c.num_tokens for c in chunks if c.seq.pending == 1)
        with torch.set_grad_enabled(training is not None):
            hidden = self.model(self._batch(chunks, training))  # (T, hidden)
        inference_rows = plan.num_tokens
        with torch.no_grad():
            outputs = self._sample(chunks, hidden[:inference_rows].detach())
        if on_output is not None:
            on_output(outputs)  # streamed before backward: the stream must not wait
        if training is not None:
            self._train(*training, hidden[inference_rows:])
        train_tokens = 0 if training is None else training[1].num_tokens
        seconds = time.perf_counter() - started
        self.step_time.observe(plan.num_tokens, train_tokens, seconds)
        self._recent_steps.append((seconds, training is not None))
        if self.on_step is not None:
            self.on_step(StepReport(decode_tokens, plan.num_tokens - decode_tokens, train_tokens,
                                    seconds))
        return outputs

    def _inference_budget(self) -> int:
        """While requests decode, the largest step that keeps their time per output token;
        otherwise the cap (prefills then finish as fast as they can). When even the running
        decodes alone cannot meet the target, no budget can: the cap then gives the most
        throughput."""
        cap = self.config.max_batched_tokens
        decodes = self.scheduler.decoding
        if not decodes:
            return cap
        budget = self.step_time.inference_budget(self.config.tpot_target_s, cap)
        return cap if budget <= decodes else budget

    def _training_room(self, inference_tokens: int) -> int:
        """Training tokens the SLOs leave in this step: all of the cap when nothing is served,
        else what still fits in the TPOT target beside the inference tokens."""
        cap = self.config.max_batched_tokens - inference_tokens
        if not self.scheduler.has_work:
            return self.config.max_batched_tokens
        return self.step_time.training_budget(self.config.tpot_target_s, inference_tokens, cap)

    def _training_chunk(self, room: int):
        """(trainer, chunk) of the job whose turn it is, or None. Training fills the room
        serving leaves, and never less than the floor."""
        # a spanning job whose share of the micro-batch is done waits for the other ranks
        ready = [t for t in self.trainers if not t.awaiting_ranks]
        if not ready:
            return None
        trainer = ready[0]
        self.trainers.remove(trainer)
        self.trainers.append(trainer)  # round robin over jobs
        if room < trainer.next_example_tokens() and self._training_share() >= \
                self.config.train_floor_share:
            self.trainers.insert(0, self.trainers.pop())  # its turn stays for the next step
            return None
        chunk = trainer.next_chunk(room)  # at least one example: the floor
        self.scheduler.counters["training_tokens"] += chunk.num_tokens
        return trainer, chunk

    def _training_share(self) -> float:
        """The share of recent step time spent in steps that trained."""
        total = sum(seconds for seconds, _ in self._recent_steps)
        trained = sum(seconds for seconds, training in self._recent_steps if training)
        return trained / total if total else 0.0

    def _batch(self, chunks: list[ScheduledChunk], training) -> ForwardBatch:
        lens = [c.num_tokens for c in chunks]
        ids = [c.seq.token_ids[c.seq.computed:c.seq.computed + c.num_tokens] for c in chunks]
        seq_ids = [c.seq.id for c in chunks]
        adapters = [c.seq.slot for c in chunks]
        if training is not None:  # training rows: whole examples, no cache
            trainer, chunk = training
            for example in chunk.examples:
                lens.append(len(example.token_ids))
                ids.append(example.token_ids)
                seq_ids.append(None)
                adapters.append(trainer.lora)
        return ForwardBatch(
            token_ids=torch.tensor([t for row_ids in ids for t in row_ids]),
            seq_lens=lens,
            kv=PagedBatch(self.cache, seq_ids, lens),
            lora=LoraRouting.from_sequences(lens, adapters),
        )

    def _sample(self, chunks: list[ScheduledChunk], hidden: torch.Tensor) -> list[StepOutput]:
        ends = torch.tensor([c.num_tokens for c in chunks], dtype=torch.int64).cumsum(0) - 1
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        for chunk in chunks:
            self.cache.commit(chunk.seq.id, chunk.num_tokens)
            chunk.seq.computed += chunk.num_tokens
        if not sampling:
            return []
        logits = self.model.logits(hidden[ends[sampling]])  # (sampling rows, vocab)
        seqs = [chunks[i].seq for i in sampling]
        tokens, logprobs = self.sampler.sample(logits, [s.params for s in seqs],
                                               [s.generator for s in seqs])
        return [self._advance(s, t, lp) for s, t, lp in zip(seqs, tokens, logprobs)]

    def _train(self, trainer: Trainer, chunk: TrainingChunk, hidden: torch.Tensor) -> None:
        """Backward over the training rows only; optimizer step, versions, job end. A job
        that fails ends alone: serving and other jobs go on."""
        try:
            loss = trainer.loss(self.model.logits(hidden), chunk)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()}")
            loss.backward()
            stepped = trainer.after_chunk(chunk, loss.item())
        except Exception as e:  # noqa: BLE001 - the job reports it; the engine goes on
            self._end_job(trainer, e)
            return
        if stepped:
            self.after_optimizer_step(trainer)

    def after_optimizer_step(self, trainer: Trainer) -> None:
        """Publishes a version when one is due and ends a finished job; called after each
        optimizer step (by _train, or by the step sync for a job spanning ranks)."""
        try:
            if trainer.should_checkpoint():
                version = trainer.checkpoint()
                if self.on_version is not None:
                    self.on_version(trainer, version, trainer.spec.adapter_dir / f"v{version}")
            error = None
        except Exception as e:  # noqa: BLE001 - the job reports it; the engine goes on
            error = e
        if error is not None or trainer.finished:
            self._end_job(trainer, error)

    def _end_job(self, trainer: Trainer, error: BaseException | None) -> None:
        self.remove_trainer(trainer)
        if self.on_job_end is not None:
            self.on_job_end(trainer, error)

    def _advance(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> StepOutput:
        now = time.monotonic()
        seq.first_token_time = seq.first_token_time or now
        seq.last_token_time = now
        seq.output_ids.append(token)
        seq.logprobs.append(logprob)
        text = seq.detokenizer.add(token) if seq.detokenizer else ""
        params = seq.params
        if (token in params.stop_token_ids or (not params.ignore_eos and token in
                                                self.stop_token_ids)
                or (seq.detokenizer is not None and seq.detokenizer.stopped)):
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= params.max_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self._count_slo(seq)
            if seq.detokenizer is not None and not seq.detokenizer.stopped:
                text += seq.detokenizer.finish()
            self.scheduler.finish(seq)
            self._release(seq)
        return StepOutput(seq, token, text, logprob, seq.finish_reason is not None)

    def _count_slo(self, seq: Sequence) -> None:
        """Counts whether a finished request met its TTFT and TPOT targets."""
        counters, config = self.scheduler.counters, self.config
        ttft = seq.first_token_time - seq.arrival
        tokens = len(seq.output_ids)
        tpot = (seq.last_token_time - seq.first_token_time) / (tokens - 1) if tokens > 1 else 0.0
        ttft_met, tpot_met = ttft <= config.ttft_target_s, tpot <= config.tpot_target_s
        counters[f"slo_ttft_{'met' if ttft_met else 'missed'}"] += 1
        counters[f"slo_tpot_{'met' if tpot_met else 'missed'}"] += 1
        counters[f"slo_both_{'met' if ttft_met and tpot_met else 'missed'}"] += 1

    def _admit(self, seq: Sequence) -> Admission:
        """Called by the scheduler when `seq` is about to run: pins its adapter in a slot."""
        if seq.adapter is None or seq.slot is not None:
            return Admission.READY
        load = seq.adapter_load
        if load.done() and load.exception() is not None:  # its caller reads the error there
            seq.finish_reason = "error"
            return Admission.FAILED
        seq.slot = self.adapters.try_acquire(seq.adapter, load)
        if seq.slot is not None:
            return Admission.READY
        return Admission.NO_SLOT if load.done() else Admission.LOADING

    def _await_loads(self) -> None:
        """Called by a step with nothing to compute: waits a little for an adapter that
        waiting requests need, so that the caller's loop does not spin against the loader
        thread (briefly: a request that needs no load may arrive meanwhile)."""
        loads = [s.adapter_load for s in self.scheduler.waiting
                 if s.adapter_load is not None and not s.adapter_load.done()]
        if loads:
            wait(loads, timeout=IDLE_WAIT_S, return_when=FIRST_COMPLETED)

    def _release(self, seq: Sequence) -> None:
        """Unpins the slot of a sequence that ended or was preempted."""
        if seq.slot is not None:
            self.adapters.release(seq.adapter)
            seq.slot = None

    def _check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        config = self.model.config
        if not prompt_ids:
            raise ValueError("a request needs a non-empty prompt")
        bad = [t for t in prompt_ids if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                             f"[0, {config.vocab_size})")
        total = len(prompt_ids) + params.max_tokens
        if total > config.max_position_embeddings:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens plus max_tokens {params.max_tokens} "
                f"exceeds the model's context of {config.max_position_embeddings} tokens; "
                "shorten the prompt or lower max_tokens")
