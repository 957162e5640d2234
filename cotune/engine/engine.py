"""The engine: one base model, its paged KV cache, adapter slots and scheduler. Each `step`
is one forward pass over every scheduled token, whatever adapter each row uses."""

from __future__ import annotations

import itertools
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cotune.adapters.peft_format import AdapterError, LoraAdapter
from cotune.adapters.residency import ResidentAdapters
from cotune.engine.adapter_admission import AdapterAdmission
from cotune.engine.containment import Containment, Quarantine, non_finite_rows
from cotune.engine.detokenizer import IncrementalDetokenizer
from cotune.engine.example_pieces import TrainingWork
from cotune.engine.forwarded import Forwarded, StepOutput
from cotune.engine.kv_cache import PagedKVCache
from cotune.engine.sampling import Sampler, SamplingParams, TokenLogprob
from cotune.engine.scheduler import (
    ScheduledChunk,
    Scheduler,
    SchedulerConfig,
    StepPlan,
)
from cotune.engine.sequence import Sequence
from cotune.engine.session import Session
from cotune.engine.step_batch import step_batch
from cotune.engine.step_time import StepTimeModel
from cotune.engine.trainer import Published, Trainer
from cotune.engine.training_lane import LanePass, TrainingLane
from cotune.engine.training_plan import TrainingPlan
from cotune.engine.trains_in_steps import TrainsInSteps
from cotune.model.llama import CausalLM
from cotune.model.training_rows import TrainingRows


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
    tenant_isolation: float = 0.0  # SchedulerConfig.tenant_isolation
    # The window over which a job's share of step time is measured against its floor
    # (FinetuneSpec.min_share).
    share_window_s: float = 10.0
    # torch threads for the engine's steps (process-wide); None: half the cores. Steps are
    # many small ops: on a 2-core machine, 2 threads run a background engine at half speed.
    num_threads: int | None = None
    # The baseline that co-serving is measured against: alternate phases of this many
    # seconds, serving only then training only (each phase yields at once when the other
    # side has nothing to do). None: co-serving, both in the same steps.
    time_slice_s: float | None = None
    # torch threads of a training lane (training_lane.py): jobs train on a thread of their
    # own beside the serving steps, on cores the steps leave idle (a CPU with more cores
    # than num_threads). 0: jobs train in the serving steps' passes, in the room the
    # requests' SLOs leave (what a GPU wants).
    training_threads: int = 0

    @property
    def torch_threads(self) -> int:
        """The torch threads the engine's steps run on (`num_threads`, or half the cores)."""
        return self.num_threads or max(1, (os.cpu_count() or 1) // 2)

    def idle_cores(self, device: str) -> int:
        """The cores the serving steps leave idle on `device`, which a training lane can
        use: on a CPU, those beyond `torch_threads`; none on a GPU."""
        if torch.device(device).type != "cpu":
            return 0
        return max(0, (os.cpu_count() or 1) - self.torch_threads)


@dataclass(frozen=True)
class StepReport:
    """What one step computed, and how long it took."""

    decode_tokens: int
    prefill_tokens: int
    training_tokens: int  # forwarded for training
    backward_tokens: int
    seconds: float
    training_seconds: float  # the backward, and the training rows' share of the forward


class Engine:
    def __init__(self, model: CausalLM, tokenizer=None, stop_token_ids: set[int] = frozenset(),
                 config: EngineConfig | None = None, step_sync=None):
        """`step_sync`: with a base sharded over ranks, the ranks' lockstep
        (cotune.distributed.lockstep.Lockstep); every step begins and ends through it."""
        self.model, self.tokenizer = model, tokenizer
        self.step_sync = step_sync
        self.config = config = config or EngineConfig()
        if config.training_threads and (step_sync is not None or config.time_slice_s):
            raise ValueError("a training lane (training_threads) trains beside the serving "
                             "steps: it cannot run with a base sharded over ranks, whose "
                             "ranks step together, nor with time slicing; set "
                             "training_threads to 0")
        self.stop_token_ids = set(stop_token_ids)
        num_blocks = -(-config.kv_cache_tokens // config.block_size)
        weight = model.model.embed_tokens.weight
        self.cache = PagedKVCache(model.config, num_blocks, config.block_size,
                                  dtype=weight.dtype, device=weight.device)
        self.adapters = ResidentAdapters(model, config.num_slots, config.max_rank,
                                         host_cache_bytes=config.host_cache_mb << 20,
                                         hot_share=config.hot_slot_share)
        self.quarantine = Quarantine()
        self.admission = AdapterAdmission(self.adapters, self.quarantine)
        self.scheduler = Scheduler(SchedulerConfig(
            config.max_batched_tokens, config.max_running, config.ttft_target_s,
            config.tpot_target_s, tenant_isolation=config.tenant_isolation), self.cache,
            admit=self.admission.admit, release=self.admission.release)
        # A request that the engine fails alone, or refuses for its adapter, is reported
        # through containment.on_failure.
        self.containment = Containment(model, self.scheduler, self.quarantine, self._forward,
                                       self.abort)
        self.admission.on_refused = self.containment.report_failure
        self.step_time = StepTimeModel()
        self.sampler = Sampler()
        # finished requests by (tenant, "ttft"|"tpot"|"both", "met"|"missed")
        self.slo_counts: Counter[tuple[str, str, str]] = Counter()
        self._ids = itertools.count()
        # What trains in the steps, in turn (trains_in_steps.py): jobs (unless a training
        # lane trains them) and RL sessions; `sessions`: those that are RL sessions.
        self.trainers: list[TrainsInSteps] = []
        self.sessions: list[Session] = []
        # Called as on_version(trainer, published) after a job publishes a version, and
        # on_job_end(trainer, error) when a job finishes (error None) or fails.
        self.on_version: Callable[[Trainer, Published], None] | None = None
        self.on_job_end: Callable[[Trainer, BaseException | None], None] | None = None
        # Called as on_step(StepReport) after every step that computed anything, and as
        # on_training_pass(LanePass) for every pass of the training lane, when the engine
        # takes it at a step boundary.
        self.on_step: Callable[[StepReport], None] | None = None
        self.on_training_pass: Callable[[LanePass], None] | None = None
        # The steps that computed anything and the lane's passes taken, so far: written by
        # the engine's thread only, read by any (health tells a wedged engine by it).
        self.progress = 0
        # Called from the training lane's thread when a pass of it awaits the next step
        # boundary (has_work turned true): wakes an idle loop.
        self.on_lane_pass: Callable[[], None] | None = None
        self.lane = None if not config.training_threads else TrainingLane(
            model, config.training_threads, config.max_batched_tokens, self._lane_passed)
        self.training_plan = TrainingPlan(
            self.scheduler, config.max_batched_tokens, config.share_window_s,
            config.time_slice_s, lane=self.lane is not None, split_examples=step_sync is None)

    @property
    def has_work(self) -> bool:
        """Whether a step has anything to do: requests, work of what trains in the steps, or
        passes of the training lane to take."""
        if self.scheduler.has_work or any(t.has_work for t in self.trainers
                                          if not self.training_plan.lane_trains(t)):
            return True
        return self.lane is not None and self.lane.has_passes

    def add_trainer(self, trainer: Trainer) -> None:
        """Starts training a job in the steps to come (or on the training lane)."""
        self.trainers.append(trainer)
        if self.lane is not None:
            self.lane.add(trainer)

    def remove_trainer(self, trainer: Trainer) -> None:
        """Stops running a job's work (between steps; a job not running is ignored)."""
        if trainer in self.trainers:
            self.trainers.remove(trainer)
            if self.lane is not None:
                self.lane.remove(trainer)

    def add_session(self, session: Session) -> None:
        """Starts running an RL session's operations in the steps to come (never on a
        training lane: Session.may_train_on_lane)."""
        session.on_weights = self._live_weights
        self.sessions.append(session)
        self.trainers.append(session)

    def remove_session(self, session: Session, error: BaseException) -> None:
        """Ends a session: its operations not done fail with `error`, its live weights
        leave their slot once no request samples from them."""
        if session in self.sessions:
            self.sessions.remove(session)
            self.trainers.remove(session)
        session.close(error)
        self.adapters.retire(session.live.key)

    def _live_weights(self, session: Session, previous: str) -> None:
        """A session's OptimStep made new weights: they take a slot now, so that the next
        request samples at once (where every slot is busy, its first request places
        them), and the previous version's slot is let go once no request uses it."""
        self.adapters.retire(previous)
        live = session.live
        try:
            self.adapters.place(live.key, live.adapter)
        except AdapterError:
            pass

    def close(self) -> None:
        """Stops the training lane after its pass in progress and takes what it did (a
        version saved meanwhile is announced). Between steps; a no-op without a lane."""
        if self.lane is not None:
            self.lane.stop()
            self._take_lane_passes()

    def add(self, prompt_ids: list[int], params: SamplingParams,
            adapter: tuple[str, str | Path | LoraAdapter] | None = None,
            request_id: str | None = None,
            tenant: str = "default") -> Sequence:
        """Queues a request: `prepare`, then `enqueue`."""
        seq = self.prepare(prompt_ids, params, adapter, request_id, tenant)
        self.enqueue(seq)
        return seq

    def prepare(self, prompt_ids: list[int], params: SamplingParams,
                adapter: tuple[str, str | Path | LoraAdapter] | None = None,
                request_id: str | None = None, tenant: str = "default") -> Sequence:
        """A request checked and ready to queue; `adapter` is (key, PEFT directory) or None for
        the base model, or (key, weights) for weights in memory (an RL session's live
        version). Everything but the adapter's file is checked here; the adapter's
        disk->host load starts now, in the background (`seq.adapter_load`), and a request
        whose adapter fails to load ends with finish_reason "error". Safe from any thread
        while the engine steps: it reads no state that a step changes."""
        self._check_prompt(prompt_ids, params)
        if adapter is not None:
            self.quarantine.check(adapter[0])
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none")
        request_id = request_id or f"req-{next(self._ids)}"
        seq = Sequence(request_id, list(prompt_ids), params, tenant=tenant,
                       adapter=None if adapter is None else adapter[0])
        self.scheduler.check_fits(seq)
        if adapter is not None:
            self.admission.start_load(seq, adapter[1])
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
            self.admission.release(seq)

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
        if self.lane is not None:
            self._take_lane_passes()
        started = time.perf_counter()
        serving, training = self.training_plan.phase(self.trainers)
        plan = self.scheduler.schedule(self.scheduler.slo_budget(
            self.step_time, time.monotonic())) if serving else StepPlan()
        # Rows of one adapter side by side: fewer segments for the LoRA ops.
        chunks = sorted(plan.chunks, key=lambda c: -1 if c.seq.slot is None else c.seq.slot)
        trainer, work = (self.training_plan.next_work(self.trainers, plan.num_tokens,
                                                      self.step_time)
                         if training else (None, None))
        if not chunks and work is None:
            self.admission.await_loads(self.scheduler.waiting)
            return []
        inference_rows = plan.num_tokens
        decode_tokens = sum(c.num_tokens for c in chunks if c.seq.pending == 1)
        train_rows = 0 if work is None else work.forward_tokens
        try:
            forwarded = self._forward(chunks, work)
        except Exception as error:  # noqa: BLE001 - traced to its rows where it can be
            if self.step_sync is not None:  # ranks pass together: one cannot run apart
                raise
            forwarded, training_error = self.containment.contain(chunks, work, error)
            if training_error is not None:  # the training rows failed alone
                self._work_failed(trainer, training_error)
                work = None
        outputs = forwarded.outputs
        if on_output is not None:
            on_output(outputs)  # streamed before backward: the stream must not wait
        sampled = time.perf_counter()
        if work is not None:
            self._train(trainer, work, forwarded.training_hidden,
                        None if forwarded.batch is None else forwarded.batch.training)
        ended = time.perf_counter()
        seconds = ended - started
        forward_seconds = forwarded.training_seconds(inference_rows)
        backward_seconds = 0.0 if work is None else ended - sampled  # losses, backward
        if work is not None and not work.backward_passes:
            forward_seconds, backward_seconds = forward_seconds + backward_seconds, 0.0
        training_seconds = forward_seconds + backward_seconds
        backward_tokens = 0 if work is None else work.backward_tokens
        self.step_time.observe(inference_rows, seconds, train_rows, forward_seconds,
                               backward_tokens, 0 if work is None else work.backward_passes,
                               backward_seconds, decode_tokens)
        self.training_plan.remember_step(seconds, trainer, training_seconds)
        self.progress += 1
        if self.on_step is not None:
            self.on_step(StepReport(decode_tokens, inference_rows - decode_tokens, train_rows,
                                    backward_tokens, seconds, training_seconds))
        return outputs

    def _forward(self, chunks: list[ScheduledChunk], work: TrainingWork | None) -> Forwarded:
        """One pass over the served chunks and the training rows; the served rows sampled
        (a row whose logits are not finite fails its request alone: Containment.fail_rows)."""
        started = time.perf_counter()
        inference_rows = sum(c.num_tokens for c in chunks)
        hidden = batch = None
        if inference_rows or (work is not None and work.forward_tokens):
            batch = step_batch(self.cache, chunks, work)
            with torch.set_grad_enabled(work is not None and work.needs_grad):
                hidden = self.model(batch)  # (T, hidden)
        seconds = time.perf_counter() - started
        with torch.no_grad():
            outputs = self._sample(chunks, hidden[:inference_rows].detach()) if chunks else []
        return Forwarded(outputs, None if hidden is None else hidden[inference_rows:], batch,
                         seconds)

    def _sample(self, chunks: list[ScheduledChunk], hidden: torch.Tensor) -> list[StepOutput]:
        """Samples the rows that end their prompt or decode, then commits the chunks' keys
        and values (not before: a pass that fails commits nothing). A row whose logits are
        not finite fails its request, and quarantines its adapter."""
        ends = torch.tensor([c.num_tokens for c in chunks], dtype=torch.int64).cumsum(0) - 1
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        tokens = logprobs = seqs = ()
        if sampling:
            logits = self.model.logits(hidden[ends[sampling]])  # (sampling rows, vocab)
            seqs = [chunks[i].seq for i in sampling]
            bad = non_finite_rows(logits)
            if bad:
                self.containment.fail_rows([seqs[i] for i in bad], "its outputs were not "
                                           "finite (NaN or Inf in the logits)")
                keep = [i for i in range(len(seqs)) if not seqs[i].is_finished]
                logits, seqs = logits[keep], [seqs[i] for i in keep]
            tokens, logprobs = self.sampler.sample(logits, [s.params for s in seqs],
                                                   [s.generator for s in seqs])
        for chunk in chunks:
            if not chunk.seq.is_finished:
                self.cache.commit(chunk.seq.id, chunk.num_tokens)
                chunk.seq.computed += chunk.num_tokens
        return [self._advance(s, t, lp) for s, t, lp in zip(seqs, tokens, logprobs)]

    def _train(self, trainer: TrainsInSteps, work: TrainingWork, hidden: torch.Tensor | None,
               rows: TrainingRows | None) -> None:
        """Losses and backward of the training rows only (or a share of a version's
        evaluation); optimizer step, versions, job end. A job whose work fails ends alone,
        a session discards that work (`_work_failed`): serving and the others go on."""
        try:
            published = trainer.run(work, hidden, self.model.logits, rows,
                                    evaluate_at_once=self.step_sync is not None)
        except Exception as e:  # noqa: BLE001 - the job reports it; the engine goes on
            self._work_failed(trainer, e)
            return
        self._conclude(trainer, published, trainer.done)

    def after_optimizer_step(self, trainer: Trainer) -> None:
        """What follows the optimizer step of a job spanning ranks (called by the step sync):
        a version when one is due, evaluated at once (the ranks step together), and the
        job's end once its last version is out."""
        try:
            published = trainer.after_optimizer_step(evaluate_at_once=True)
        except Exception as e:  # noqa: BLE001 - the job reports it; the engine goes on
            self._work_failed(trainer, e)
            return
        self._conclude(trainer, published, trainer.done)

    def _conclude(self, trainer: TrainsInSteps, published: Published | None,
                  done: bool) -> None:
        """Announces a version the job saved, and ends the job when `done` (its state as of
        the work that saved it: a lane may have gone on since)."""
        if published is not None and self.on_version is not None:
            try:
                self.on_version(trainer, published)
            except Exception as e:  # noqa: BLE001 - the job reports it; the engine goes on
                self._work_failed(trainer, e)
                return
        if done:
            self._end_job(trainer, None)

    def _lane_passed(self) -> None:
        if self.on_lane_pass is not None:
            self.on_lane_pass()

    def _take_lane_passes(self) -> None:
        """What the training lane did since the last step: its passes reported and counted,
        its versions announced, its ended jobs ended (those of a job removed meanwhile are
        dropped: its end was reported when it was removed)."""
        for done in self.lane.take_passes():
            self.scheduler.counters["training_tokens"] += done.forward_tokens
            self.progress += 1
            if self.on_training_pass is not None:
                self.on_training_pass(done)
            if done.trainer not in self.trainers:
                continue
            if done.error is not None:
                self._work_failed(done.trainer, done.error)
            else:
                self._conclude(done.trainer, done.published, done.ended)

    def _work_failed(self, trainer: TrainsInSteps, error: BaseException) -> None:
        """The work planned for `trainer` failed: a job ends with `error`, a session discards
        that work and goes on (TrainsInSteps.work_failed)."""
        if trainer.work_failed(error):
            self._end_job(trainer, error)

    def _end_job(self, trainer: Trainer, error: BaseException | None) -> None:
        """A job ends: done (`error` None), or failed."""
        self.remove_trainer(trainer)
        if self.on_job_end is not None:
            self.on_job_end(trainer, error)

    def _advance(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> StepOutput:
        """Appends a sampled token to its request, and ends the request where the token, its
        stop strings or its length say so (its SLOs counted, its blocks and slot freed)."""
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
            self.admission.release(seq)
        return StepOutput(seq, token, text, logprob, seq.finish_reason is not None)

    def _count_slo(self, seq: Sequence) -> None:
        """Counts whether a finished request met its TTFT and TPOT targets, by tenant."""
        counters, config = self.slo_counts, self.config
        ttft = seq.first_token_time - seq.arrival
        tokens = len(seq.output_ids)
        tpot = (seq.last_token_time - seq.first_token_time) / (tokens - 1) if tokens > 1 else 0.0
        ttft_met, tpot_met = ttft <= config.ttft_target_s, tpot <= config.tpot_target_s
        for kind, met in (("ttft", ttft_met), ("tpot", tpot_met), ("both", ttft_met and tpot_met)):
            counters[seq.tenant, kind, "met" if met else "missed"] += 1

    def _check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Refuses an empty prompt, token ids outside the vocabulary, and a prompt whose
        max_tokens would pass the model's context (ValueError naming what was wrong)."""
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
