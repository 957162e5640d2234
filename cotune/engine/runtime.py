"""`cotune.Runtime`: the embedded co-runtime. One base model in this process serves requests
on many adapters; a background thread runs engine steps while there is work.

    rt = Runtime.load("default")
    rt.generate([Request(prompt="Hi", adapter="./my-adapter")])
    for delta in rt.stream(Request(prompt="Hi")): print(delta.text, end="")
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cotune.adapters.peft_format import AdapterError, LoraAdapter
from cotune.engine.engine import Engine, EngineConfig, StepOutput
from cotune.engine.finetune_spec import FinetuneSpec
from cotune.engine.job import Job, JobState
from cotune.engine.sampling import SamplingParams, TokenLogprob
from cotune.engine.sequence import Sequence
from cotune.engine.trainer import Trainer
from cotune.model.default_model import resolve_model_path
from cotune.model.loading import checkpoint_fingerprint, load_model
from cotune.model.tokenizer import load_tokenizer, stop_token_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SYNC_POLL_S = 0.05  # how often idle ranks of a sharded base ask each other for work


class EngineStopped(RuntimeError):
    """The runtime takes no more work: it was closed, or its engine stopped on an error."""


@dataclass
class Request:
    """A generation request: prompt text or token ids, an adapter (a PEFT directory or a name
    registered with `Runtime.register_adapter`; None for the base model), and sampling."""

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    adapter: str | None = None
    # The PEFT directory of `adapter`, for callers that resolve names themselves (the server,
    # from its registry): `adapter` is then only its key, and needs no registration.
    adapter_path: Path | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None
    ignore_eos: bool = False
    request_id: str | None = None
    tenant: str = "default"  # waiting requests are admitted tenant by tenant

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, seed=self.seed, stop=tuple(self.stop),
            stop_token_ids=tuple(self.stop_token_ids), ignore_eos=self.ignore_eos,
            logprobs=self.logprobs)


@dataclass
class Delta:
    """Tokens and text a stream yields as they are sampled."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob | None]
    finish_reason: str | None = None


@dataclass
class Completion:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop", "length" or "abort"
    prompt_tokens: int
    logprobs: list[TokenLogprob | None] | None = None
    ttft_s: float | None = None  # arrival to first token

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Runtime:
    def __init__(self, engine: Engine, model_path: Path | None = None):
        self.engine, self.model_path = engine, model_path
        self.base_fingerprint = "" if model_path is None else checkpoint_fingerprint(model_path)
        self._adapters: dict[str, tuple[str, Path]] = {}  # name -> (residency key, directory)
        self._jobs: dict[Trainer, Job] = {}
        self._job_ids = itertools.count(1)
        engine.on_version = self._published
        engine.on_job_end = self._job_ended
        self._lock = threading.Condition()
        self._listeners: dict[Sequence, queue.Queue] = {}
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="cotune-engine", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, model: str | Path = "default", *, dtype: str = "float32",
             device: str = "cpu", **engine_options) -> Runtime:
        """A runtime on `model` ('default', a checkpoint directory or a .gguf file); options
        are the fields of EngineConfig (max_rank, num_slots, kv_cache_tokens, ...)."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; accepted: {', '.join(DTYPES)}")
        path = resolve_model_path(model)
        tokenizer = load_tokenizer(path)
        base = load_model(path, dtype=DTYPES[dtype], device=device)
        engine = Engine(base, tokenizer, stop_token_ids(path, tokenizer),
                        EngineConfig(**engine_options))
        return cls(engine, path)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def register_adapter(self, name: str, path: str | Path) -> None:
        """Makes `name` usable as a request's adapter for the PEFT directory `path`."""
        if not Path(path, "adapter_config.json").is_file():
            raise FileNotFoundError(f"{path} is not a PEFT adapter directory "
                                    "(no adapter_config.json)")
        self._adapters[name] = (name, Path(path))

    def finetune(self, spec: FinetuneSpec, job_id: str | None = None,
                 span_ranks: bool = False, serve_by_name: bool = True) -> Job:
        """Starts training a new adapter in the same steps that serve requests (or resumes it
        from the newest version under spec.output_dir). The data is read and checked before
        this returns. Each version it publishes is servable at once as `name@v{k}`, and
        `name` names the newest, from the weights in memory (no file is read). With
        `serve_by_name` False the caller serves the versions under keys of its own (the
        server: `tenant/name@vR`, R its registry's number): the runtime names and caches
        none, and the caller caches each with `cache_adapter` from the weights that come
        with the job's "checkpoint" event. With `span_ranks` (a sharded base) the job's
        micro-batches are split over the ranks and their gradients summed: call it on every
        rank, with the same spec, in the same order as the other spanning jobs."""
        job_id = job_id or f"job-{next(self._job_ids)}"
        sync = self.engine.step_sync
        if span_ranks and sync is None:
            raise ValueError("span_ranks needs a base sharded over ranks (cotune serve under "
                             "torchrun); this runtime holds a whole base")
        trainer = Trainer(spec, self.engine.model, self.tokenizer, job_id,
                          self.base_fingerprint,
                          span=(sync.rank, sync.world_size) if span_ranks else None)
        job = Job(job_id, trainer, self._cancel_job, serve_by_name)
        with self._lock:
            self._check_open()
            if span_ranks:
                sync.register_spanning(trainer)
            self._jobs[trainer] = job
            self.engine.add_trainer(trainer)
            self._lock.notify_all()
        return job

    def cache_adapter(self, key: str, adapter: LoraAdapter) -> None:
        """Keeps `adapter` in host memory under `key`, so that the first request for `key`
        reads no file: for a caller that serves a job's versions under keys of its own
        (`finetune(serve_by_name=False)`). Safe from any thread."""
        self.engine.adapters.host.put(key, adapter)

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Runs all requests together (they share steps); completions in request order.
        Every request is checked before any runs: one bad request fails the call."""
        prepared = [self._prepare(r) for r in requests]  # all checked before any is queued
        with self._lock:
            seqs, sinks = self._submit(prepared)
        self._await_adapters(seqs)
        return [self._collect(seq, sink) for seq, sink in zip(seqs, sinks)]

    def stream(self, request: Request) -> Iterator[Delta]:
        """Yields the request's tokens and text as they are sampled; closing the iterator
        early aborts the request."""
        prepared = [self._prepare(request)]
        with self._lock:
            (seq,), (sink,) = self._submit(prepared)
        self._await_adapters([seq])
        finished = False
        try:
            while not finished:
                outputs, finished = self._next_outputs(sink)
                yield Delta(seq.id, [o.token_id for o in outputs], "".join(o.text for o in outputs),
                            [o.logprob for o in outputs], seq.finish_reason if finished else None)
        finally:
            if not finished:
                self.abort(seq.id)

    def abort(self, request_id: str) -> bool:
        """Stops a running or queued request; False when no such request is in flight."""
        with self._lock:
            for seq, sink in list(self._listeners.items()):
                if seq.id == request_id:
                    self.engine.abort(seq)
                    del self._listeners[seq]
                    sink.put(None)
                    return True
        return False

    def checkpoint_jobs(self, timeout: float) -> None:
        """Has every running job publish a version at its next optimizer step, waiting up to
        `timeout` seconds: before a stop, so that a resumed job loses no step."""
        with self._lock:
            jobs = list(self._jobs.values())
            for job in jobs:
                job.trainer.checkpoint_requested = True
        deadline = time.monotonic() + timeout
        for job in jobs:
            while job.trainer.checkpoint_requested and job.state is JobState.RUNNING \
                    and time.monotonic() < deadline:
                time.sleep(0.02)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _submit(self, prepared: list):
        """Queues prepared requests (called with the lock held; tokenizing happened before,
        outside it, so the engine's steps never wait for it)."""
        self._check_open()
        seqs, sinks = [], []
        try:
            for prompt_ids, params, adapter, request_id, tenant in prepared:
                seqs.append(self.engine.add(prompt_ids, params, adapter, request_id, tenant))
        except BaseException:
            for seq in seqs:
                self.engine.abort(seq)
            raise
        for seq in seqs:
            sinks.append(queue.Queue())
            self._listeners[seq] = sinks[-1]
        self._lock.notify_all()
        return seqs, sinks

    def _await_adapters(self, seqs: list[Sequence]) -> None:
        """Waits, outside the lock, for the disk->host loads of the requests' adapters (begun
        on a loader thread when they were queued, overlapping the engine's steps): an invalid
        adapter file fails the call here with its AdapterError, and aborts its requests."""
        try:
            for seq in seqs:
                if seq.adapter_load is not None:
                    seq.adapter_load.result()
        except BaseException:
            for seq in seqs:
                self.abort(seq.id)
            raise

    def _prepare(self, request: Request):
        if (request.prompt is None) == (request.prompt_token_ids is None):
            raise ValueError("a request needs exactly one of prompt or prompt_token_ids")
        ids = request.prompt_token_ids
        if ids is None:
            ids = self.tokenizer(request.prompt).input_ids
        adapter = self._adapter(request.adapter) if request.adapter_path is None \
            else (request.adapter, request.adapter_path)
        return list(ids), request.sampling_params(), adapter, request.request_id, request.tenant

    def _adapter(self, name: str | None):
        if name is None:
            return None
        if name in self._adapters:
            return self._adapters[name]
        path = Path(name)
        if path.is_dir():
            return str(path.resolve()), path
        raise FileNotFoundError(f"adapter {name!r} is neither a registered adapter name nor a "
                                "PEFT adapter directory")

    def _collect(self, seq: Sequence, sink: queue.Queue) -> Completion:
        text, finished = [], False
        while not finished:
            outputs, finished = self._next_outputs(sink)
            text.extend(o.text for o in outputs)
        ttft = None if seq.first_token_time is None else seq.first_token_time - seq.arrival
        return Completion(seq.id, list(seq.output_ids), "".join(text), seq.finish_reason,
                          len(seq.prompt_ids), list(seq.logprobs) if seq.params.logprobs
                          is not None else None, ttft)

    def _next_outputs(self, sink: queue.Queue) -> tuple[list[StepOutput], bool]:
        """Blocks for the next token(s) of one request: (outputs, whether it has ended).
        An aborted request ends with its finish_reason "abort"; an engine failure raises."""
        outputs = [sink.get()]
        while not sink.empty():
            outputs.append(sink.get())
        if outputs[-1] is None:
            if self._error is not None:
                raise EngineStopped(f"the engine stopped on an error: {self._error!r}") \
                    from self._error
            return outputs[:-1], True
        return outputs, outputs[-1].finished

    @property
    def running(self) -> bool:
        """Whether the engine still steps (False once closed, failed, or, with a sharded
        base, stopped with the other ranks)."""
        return self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        """What stopped the engine, if it stopped on an error."""
        return self._error

    def _check_open(self) -> None:
        if self._error is not None:
            raise EngineStopped(f"the engine stopped on an error: {self._error!r}; start "
                                "the runtime again") from self._error
        if self._closed:
            raise EngineStopped("the runtime is closed")

    def _loop(self) -> None:
        threads = self.engine.config.num_threads or max(1, (os.cpu_count() or 1) // 2)
        torch.set_num_threads(threads)
        sync = self.engine.step_sync
        while True:
            with self._lock:
                if sync is None:
                    while not self._closed and not self.engine.has_work:
                        self._lock.wait()
                else:  # the ranks agree before every step: an idle rank asks now and then
                    self._lock.wait_for(lambda: self._closed or self.engine.has_work,
                                        SYNC_POLL_S)
                closing, has_work = self._closed, self.engine.has_work
            if sync is not None:
                try:  # outside the lock: new requests queue meanwhile
                    has_work, closing = sync.agree(has_work, closing)
                except BaseException as e:  # a rank is gone: this one stops too
                    with self._lock:
                        self._error = e
                        self._fail_all(e)
                    return
            with self._lock:
                if closing:  # one rank stops: a sharded base stops as one
                    self._closed = True
                    self._fail_all(None)
                    return
                if not has_work:
                    continue
                try:
                    self.engine.step(on_output=self._deliver)
                    for job in self._jobs.values():
                        job._report_progress()
                except BaseException as e:  # fail every waiter rather than hang them
                    self._error = e
                    self._fail_all(e)
                    return

    def _deliver(self, outputs: list[StepOutput]) -> None:
        for output in outputs:
            sink = self._listeners.get(output.seq)
            if sink is not None:
                sink.put(output)
                if output.finished:
                    del self._listeners[output.seq]

    def _published(self, trainer: Trainer, version: int, path: Path) -> None:
        """A job published a version. Served by name, it is servable now as `name@v{version}`
        straight from the trainer's weights, before its event goes out; either way the
        event carries those weights, for a caller that serves the version under its own key."""
        job = self._jobs.get(trainer)
        adapter = trainer.adapter()
        if job is None or job.serve_by_name:
            key = f"{trainer.spec.name}@v{version}"
            self._adapters[key] = (key, path)
            self._adapters[trainer.spec.name] = (key, path)
            self.cache_adapter(key, adapter)
            try:
                self.engine.adapters.place(key, adapter)
            except AdapterError:  # every slot busy: the first request copies it from host
                pass
        if job is not None:
            job._report_progress()  # the step that published comes before its checkpoint
            job._published(version, path, adapter)

    def _job_ended(self, trainer: Trainer, error: BaseException | None) -> None:
        job = self._jobs.pop(trainer, None)
        if job is not None:
            job._end(JobState.FAILED if error else JobState.SUCCEEDED, error)

    def _cancel_job(self, job: Job) -> None:
        with self._lock:
            self.engine.remove_trainer(job.trainer)
            if self._jobs.pop(job.trainer, None) is not None:
                job._end(JobState.CANCELLED)

    def _fail_all(self, error: BaseException | None) -> None:
        for trainer, job in list(self._jobs.items()):
            self.engine.remove_trainer(trainer)
            job._end(JobState.CANCELLED if error is None else JobState.FAILED, error)
        self._jobs.clear()
        for seq, sink in self._listeners.items():
            self.engine.abort(seq)
            sink.put(None)
        self._listeners.clear()
