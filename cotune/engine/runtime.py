"""`cotune.Runtime`: the embedded co-runtime. One base model in this process serves requests
on many adapters; a background thread runs engine steps while there is work.

The engine thread owns the engine. Other threads reach it through its inbox (requests,
aborts, jobs started and cancelled, checkpoint requests), which it applies between steps,
and hear from it through one queue per request: no caller waits for a step, and no lock is
held while a step computes. A small lock guards only the runtime's own tables (the requests'
queues, the jobs, whether it is open), for a few statements at a time.

    rt = Runtime.load("default")
    rt.generate([Request(prompt="Hi", adapter="./my-adapter")])
    for delta in rt.stream(Request(prompt="Hi")): print(delta.text, end="")
"""

from __future__ import annotations

import atexit
import functools
import itertools
import queue
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cotune.adapters.peft_format import AdapterError, LoraAdapter
from cotune.engine.engine import Engine, EngineConfig
from cotune.engine.finetune_spec import FinetuneSpec
from cotune.engine.forwarded import StepOutput
from cotune.engine.inbox import Inbox
from cotune.engine.job import Job, JobState
from cotune.engine.sampling import SamplingParams, TokenLogprob
from cotune.engine.sequence import Sequence
from cotune.engine.session import Session, SessionClosed
from cotune.engine.session_handle import SessionHandle
from cotune.engine.session_spec import SessionSpec
from cotune.engine.trainer import Published, Trainer
from cotune.model.default_model import resolve_model_path
from cotune.model.loading import checkpoint_fingerprint, load_model
from cotune.model.quantization import check_quantization
from cotune.model.tokenizer import load_tokenizer, stop_token_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, known in DTYPES.items() if known == dtype)
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
    # an RL session whose live weights it samples from (instead of an adapter)
    session: SessionHandle | None = None

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
    weights_version: int | None = None  # of the session it samples from


@dataclass
class Completion:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop", "length" or "abort"
    prompt_tokens: int
    logprobs: list[TokenLogprob | None] | None = None
    ttft_s: float | None = None  # arrival to first token
    weights_version: int | None = None  # of the session it sampled from, every token

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Runtime:
    def __init__(self, engine: Engine, model_path: Path | None = None):
        self.engine, self.model_path = engine, model_path
        self.base_fingerprint = "" if model_path is None else checkpoint_fingerprint(model_path)
        self._adapters: dict[str, tuple[str, Path]] = {}  # name -> (residency key, directory)
        self._jobs: dict[Trainer, Job] = {}
        self._sessions: dict[str, SessionHandle] = {}
        self._session_ids = itertools.count(1)
        self._job_ids = itertools.count(1)
        engine.on_version = self._published
        engine.on_job_end = self._job_ended
        self._inbox = Inbox()
        engine.on_lane_pass = self._inbox.wake
        engine.containment.on_failure = self._fail_request
        self._lock = threading.Lock()  # the tables below; never held across engine work
        self._listeners: dict[Sequence, queue.SimpleQueue] = {}
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="cotune-engine", daemon=True)
        self._thread.start()
        # A runtime still open when the interpreter exits stops at a step boundary first: torn
        # down in the middle of a torch op, its thread would abort the process.
        self._close_at_exit = functools.partial(_close_if_alive, weakref.ref(self))
        atexit.register(self._close_at_exit)

    @classmethod
    def load(cls, model: str | Path = "default", *, dtype: str | None = None,
             quantize: str | None = None, device: str = "cpu", kernels: str | None = None,
             **engine_options) -> Runtime:
        """A runtime on `model` ('default', a checkpoint directory or a .gguf file); options
        are the fields of EngineConfig (max_rank, num_slots, kv_cache_tokens, ...). `kernels`:
        the LoRA ops' implementation (kernels.choice; None: $COTUNE_KERNELS, or auto).
        `quantize`: 'int8' or 'int4' stores the base's decoder projections in 8 or 4 bits
        (model.quantized). `dtype` (of the rest, and of the activations) defaults to
        float32, or with `quantize` to bfloat16, in which the packed CPU matmuls run fast (in
        float32 they dequantize each projection's weights as they use them)."""
        dtype = dtype or ("float32" if quantize is None else "bfloat16")
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; accepted: {', '.join(DTYPES)}")
        check_quantization(quantize)
        path = resolve_model_path(model)
        tokenizer = load_tokenizer(path)
        base = load_model(path, dtype=DTYPES[dtype], device=device, kernels=kernels,
                          quantize=quantize)
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

        def start() -> None:  # spanning jobs register on every rank in the same step order
            if span_ranks:
                sync.register_spanning(trainer)
            self.engine.add_trainer(trainer)

        with self._lock:
            self._check_open()
            self._jobs[trainer] = job
            self._inbox.put(start)
        return job

    def open_session(self, spec: SessionSpec, session_id: str | None = None) -> SessionHandle:
        """Opens an RL session on a new adapter (or the version spec.init_adapter holds):
        ForwardBackward, Forward, OptimStep and Save run in the same steps that serve
        requests, and `Request(session=...)` samples from its live weights, which each
        OptimStep changes in place (session.py). SpecError or AdapterError when the spec or
        its init adapter is refused."""
        if self.engine.step_sync is not None:
            raise ValueError("RL sessions need a whole base in this process; this runtime's "
                             "base is sharded over ranks")
        session_id = session_id or f"session-{next(self._session_ids)}"
        model = self.engine.model
        session = Session(spec, model, session_id, self.base_fingerprint)
        handle = SessionHandle(session, self._post, self._close_session,
                               model.config.vocab_size, model.config.max_position_embeddings)
        with self._lock:
            self._check_open()
            if session_id in self._sessions:
                raise ValueError(f"a session {session_id!r} is already open")
            self._sessions[session_id] = handle
            self._inbox.put(functools.partial(self.engine.add_session, session))
        return handle

    def _post(self, command) -> None:
        """Runs `command` on the engine's thread at its next step boundary (EngineStopped
        once the runtime is closed)."""
        with self._lock:
            self._check_open()
            self._inbox.put(command)

    def _close_session(self, handle: SessionHandle) -> None:
        with self._lock:
            if self._sessions.pop(handle.id, None) is None:
                return  # the runtime stopped, and ended it
            self._inbox.put(functools.partial(self.engine.remove_session, handle.session,
                                              SessionClosed(f"session {handle.id} was closed")))

    def cache_adapter(self, key: str, adapter: LoraAdapter) -> None:
        """Keeps `adapter` in host memory under `key`, so that the first request for `key`
        reads no file: for a caller that serves a job's versions under keys of its own
        (`finetune(serve_by_name=False)`). Safe from any thread."""
        self.engine.adapters.host.put(key, adapter)

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Runs all requests together (they share steps); completions in request order.
        Every request is checked before any runs: one bad request fails the call."""
        seqs, sinks = self._submit([self._prepare(r) for r in requests])
        self._await_adapters(seqs)
        try:
            return [self._collect(seq, sink) for seq, sink in zip(seqs, sinks)]
        except BaseException:  # one failed: the call fails, and its other requests stop
            for seq in seqs:
                self.abort(seq.id)
            raise

    def stream(self, request: Request) -> Iterator[Delta]:
        """Yields the request's tokens and text as they are sampled; closing the iterator
        early aborts the request."""
        (seq,), (sink,) = self._submit([self._prepare(request)])
        self._await_adapters([seq])
        finish_reason = None
        try:
            while finish_reason is None:
                outputs, finish_reason = self._next_outputs(sink)
                yield Delta(seq.id, [o.token_id for o in outputs], "".join(o.text for o in outputs),
                            [o.logprob for o in outputs], finish_reason, seq.weights_version)
        finally:
            if finish_reason is None:
                self.abort(seq.id)

    def abort(self, request_id: str) -> bool:
        """Stops a running or queued request; False when no such request is in flight. Its
        caller's stream ends now, with finish_reason "abort"; the engine lets go of it at the
        next step boundary."""
        with self._lock:
            for seq, sink in self._listeners.items():
                if seq.id == request_id:
                    del self._listeners[seq]
                    sink.put(None)
                    self._inbox.put(functools.partial(self.engine.abort, seq))
                    return True
        return False

    def checkpoint_jobs(self, timeout: float) -> None:
        """Has every running job publish a version at its next optimizer step, waiting up to
        `timeout` seconds: before a stop, so that a resumed job loses no step."""
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:  # a flag the trainer reads at its optimizer steps, and clears
            job.trainer.checkpoint_requested = True
        deadline = time.monotonic() + timeout
        for job in jobs:
            while job.trainer.checkpoint_requested and job.state is JobState.RUNNING \
                    and time.monotonic() < deadline:
                time.sleep(0.02)

    def close(self) -> None:
        """Stops the engine at its next step boundary (requests in flight end with "abort",
        running jobs with CANCELLED) and waits for its thread."""
        atexit.unregister(self._close_at_exit)
        with self._lock:
            self._closed = True
        self._inbox.wake()
        self._thread.join()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _submit(self, prepared: list):
        """Queues prepared requests, all or none: each is checked here, in the caller's
        thread, and they reach the engine together at its next step boundary."""
        seqs = []
        for request, weights_version in prepared:
            seqs.append(self.engine.prepare(*request))
            seqs[-1].weights_version = weights_version
        sinks = [queue.SimpleQueue() for _ in seqs]

        def enqueue() -> None:
            for seq in seqs:
                self.engine.enqueue(seq)

        with self._lock:
            self._check_open()  # under the lock: a stop ends only the requests it finds here
            self._listeners.update(zip(seqs, sinks))
            self._inbox.put(enqueue)
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
        """(Engine.prepare's arguments, the session's weights version it samples from)."""
        if (request.prompt is None) == (request.prompt_token_ids is None):
            raise ValueError("a request needs exactly one of prompt or prompt_token_ids")
        if request.session is not None and request.adapter is not None:
            raise ValueError("a request samples from an adapter or from a session's live "
                             "weights, not both")
        ids = request.prompt_token_ids
        if ids is None:
            ids = self.tokenizer(request.prompt).input_ids
        weights_version = None
        if request.session is not None:  # the version live now, to its last token
            live = request.session.live()
            adapter, weights_version = (live.key, live.adapter), live.version
        elif request.adapter_path is None:
            adapter = self._adapter(request.adapter)
        else:
            adapter = (request.adapter, request.adapter_path)
        return (list(ids), request.sampling_params(), adapter, request.request_id,
                request.tenant), weights_version

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

    def _collect(self, seq: Sequence, sink: queue.SimpleQueue) -> Completion:
        """The request's whole completion, from what reached its queue (not from `seq`, which
        the engine thread may still change after an abort)."""
        received, finish_reason = [], None
        while finish_reason is None:
            outputs, finish_reason = self._next_outputs(sink)
            received += outputs
        ttft = None if seq.first_token_time is None else seq.first_token_time - seq.arrival
        logprobs = None if seq.params.logprobs is None else [o.logprob for o in received]
        return Completion(seq.id, [o.token_id for o in received],
                          "".join(o.text for o in received), finish_reason,
                          len(seq.prompt_ids), logprobs, ttft, seq.weights_version)

    def _next_outputs(self, sink: queue.SimpleQueue) -> tuple[list[StepOutput], str | None]:
        """Blocks for the next token(s) of one request: (outputs, its finish_reason once it
        has ended, else None). An aborted request ends with "abort"; an engine failure
        raises, and so does the error the engine failed this request alone with."""
        outputs = [sink.get()]
        while not sink.empty():
            outputs.append(sink.get())
        failed = [o for o in outputs if isinstance(o, BaseException)]
        if failed:
            raise failed[0]
        if None in outputs:  # aborted, or the engine stopped: whatever came after is dropped
            if self._error is not None:
                raise EngineStopped(f"the engine stopped on an error: {self._error!r}") \
                    from self._error
            return outputs[:outputs.index(None)], "abort"
        last = outputs[-1]
        return outputs, last.seq.finish_reason if last.finished else None

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
        torch.set_num_threads(self.engine.config.torch_threads)
        sync = self.engine.step_sync
        while True:
            try:
                self._inbox.apply()  # what callers asked for takes effect here, between steps
                if not (self._closed or self.engine.has_work):
                    if sync is None:
                        self._inbox.wait()
                        continue
                    # the ranks agree before every step: an idle rank asks now and then
                    self._inbox.wait(SYNC_POLL_S)
                    self._inbox.apply()
                closing, has_work = self._closed, self.engine.has_work
                if sync is not None:  # a rank that stops or fails stops the others too
                    has_work, closing = sync.agree(has_work, closing)
                if closing:
                    self._stop(None)
                    return
                if has_work:
                    self.engine.step(on_output=self._deliver)
                    with self._lock:
                        jobs = list(self._jobs.values())
                    for job in jobs:
                        job._report_progress()
            except BaseException as e:  # fail every waiter rather than hang them
                self._stop(e)
                return

    def _deliver(self, outputs: list[StepOutput]) -> None:
        """Hands each new token to its request's queue (engine thread, before backward)."""
        with self._lock:
            for output in outputs:
                sink = self._listeners.get(output.seq)
                if sink is not None:
                    sink.put(output)
                    if output.finished:
                        del self._listeners[output.seq]

    def _fail_request(self, seq: Sequence, error: BaseException) -> None:
        """The engine failed one request alone (engine thread): its caller gets `error`."""
        with self._lock:
            sink = self._listeners.pop(seq, None)
        if sink is not None:
            sink.put(error)

    def _published(self, trainer: Trainer, published: Published) -> None:
        """A job published a version. Served by name, it is servable now as `name@v{version}`
        straight from the weights it saved, before its event goes out; either way the event
        carries those weights, for a caller that serves the version under its own key."""
        with self._lock:
            job = self._jobs.get(trainer)
        version, path, adapter = published.version, published.path, published.adapter
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
        with self._lock:
            job = self._jobs.pop(trainer, None)
        if job is not None:
            job._end(JobState.FAILED if error else JobState.SUCCEEDED, error)

    def _cancel_job(self, job: Job) -> None:
        """Job.cancel, from any thread: the job stops at the next step boundary."""

        def cancel() -> None:
            self.engine.remove_trainer(job.trainer)
            with self._lock:
                ended = self._jobs.pop(job.trainer, None) is not None
            if ended:
                job._end(JobState.CANCELLED)

        self._inbox.put(cancel)

    def _stop(self, error: BaseException | None) -> None:
        """The engine thread's last act (closed, failed, or the other ranks gone): every
        request in flight and every job ends, and nothing more is taken (a version that a
        training lane saved meanwhile is announced first)."""
        self.engine.close()
        with self._lock:
            self._closed = True
            self._error = error
        self._inbox.apply()  # what was asked before the stop reaches the engine, and ends below
        with self._lock:
            jobs, self._jobs = self._jobs, {}
            listeners, self._listeners = self._listeners, {}
            sessions, self._sessions = self._sessions, {}
        ended = EngineStopped("the runtime stopped" if error is None else
                              f"the engine stopped on an error: {error!r}")
        for handle in sessions.values():
            handle.ended(ended)
            self.engine.remove_session(handle.session, ended)
        for trainer, job in jobs.items():
            self.engine.remove_trainer(trainer)
            job._end(JobState.CANCELLED if error is None else JobState.FAILED, error)
        for seq, sink in listeners.items():
            self.engine.abort(seq)
            sink.put(None)


def _close_if_alive(runtime: weakref.ref[Runtime]) -> None:
    if (alive := runtime()) is not None:
        alive.close()
