"""Which worker gets a call. Only the fields a decision needs are parsed from the request's
bytes (adapter, request id, job id); the call itself is forwarded as it came.

- Generate: the workers in rendezvous order of the adapter's name (without its version, and
  without the tenant, which only the token names and the router does not read), the first
  with fewer than `spill_threshold` calls in flight; base-model requests to the least loaded.
- Abort: the worker that runs that request id for that caller (learnt from the Generate call,
  its request or its first response).
- CreateJob: the worker with the fewest unfinished jobs placed by this router; GetJob,
  CancelJob and WatchJob: the job's owner (placed here, else asked of any worker: Job.owner).
- CreateSession: the least loaded worker; every call on the session (GetSession, CloseSession,
  ForwardBackward, Forward, OptimStep, SaveVersion, and Generate with its id): the worker that
  holds it in memory (placed here, else found by asking each worker for it).
- Everything else: the least loaded worker (the workers share one registry).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from cotune.router.hashing import first_unloaded, rendezvous_order
from cotune.router.metrics import RouterMetrics
from cotune.router.pool import Pool, Worker
from cotune.v1 import inference_pb2, training_pb2

GENERATE = "/cotune.v1.InferenceService/Generate"
ABORT = "/cotune.v1.InferenceService/Abort"
CREATE_JOB = "/cotune.v1.TrainingService/CreateJob"
GET_JOB = "/cotune.v1.TrainingService/GetJob"
CANCEL_JOB = "/cotune.v1.TrainingService/CancelJob"
WATCH_JOB = "/cotune.v1.TrainingService/WatchJob"
CREATE_SESSION = "/cotune.v1.TrainingService/CreateSession"
GET_SESSION = "/cotune.v1.TrainingService/GetSession"
CLOSE_SESSION = "/cotune.v1.TrainingService/CloseSession"
# calls on one session; the session's id is field 1 of each one's request
SESSION_CALLS = {GET_SESSION, CLOSE_SESSION} | {
    f"/cotune.v1.TrainingService/{name}"
    for name in ("ForwardBackward", "Forward", "OptimStep", "SaveVersion")}
SESSIONS_KEPT = 65536  # session -> worker entries this router remembers, the newest
TERMINAL = {training_pb2.JOB_STATE_SUCCEEDED, training_pb2.JOB_STATE_FAILED,
            training_pb2.JOB_STATE_CANCELLED}
OWNER_LOOKUP_TIMEOUT_S = 10.0


class NoWorker(Exception):
    """No worker can take the call (the router answers UNAVAILABLE)."""


@dataclass
class Caller:
    authorization: str  # opaque to the router: it keys the caller's request ids
    metadata: tuple[tuple[str, str], ...]  # forwarded as it came
    timeout: float | None


@dataclass
class Route:
    worker: Worker
    learn: Callable[[bytes], None] | None = None  # called with each response message
    end: Callable[[], None] | None = None  # called once when the call is over


class Routes:
    def __init__(self, pool: Pool, spill_threshold: int, metrics: RouterMetrics):
        self.pool, self.spill_threshold, self.metrics = pool, spill_threshold, metrics
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], str] = {}  # (caller, request id) -> worker id
        self._owners: dict[str, str] = {}  # job id -> worker id
        self._placed: dict[str, set[str]] = defaultdict(set)  # worker id -> unfinished jobs
        self._sessions: OrderedDict[str, str] = OrderedDict()  # session id -> worker id

    def route(self, method: str, request: bytes | None, caller: Caller) -> Route:
        """Raises NoWorker when no worker is healthy."""
        workers = self.pool.healthy()
        if not workers:
            raise NoWorker(f"no worker is healthy ({self.pool.describe()}); retry shortly")
        try:
            if method == GENERATE:
                return self._generate(inference_pb2.GenerateRequest.FromString(request),
                                      workers, caller)
            if method == ABORT:
                request_id = inference_pb2.AbortRequest.FromString(request).request_id
                with self._lock:
                    worker_id = self._requests.get((caller.authorization, request_id))
                return Route(self._healthy(worker_id) or _least_loaded(workers))
            if method == CREATE_JOB:
                return self._create_job(workers)
            if method in (CANCEL_JOB, WATCH_JOB):
                request_id = training_pb2.WatchJobRequest.FromString(request).id  # same shape
                owner = self._owner(request_id, workers, caller)
                return Route(owner or _least_loaded(workers), self._learn_job_state(method))
            if method == GET_JOB:
                return Route(_least_loaded(workers), self._learn_job_state(method))
            if method == CREATE_SESSION:
                return self._create_session(_least_loaded(workers))
            if method in SESSION_CALLS:
                session_id = training_pb2.GetSessionRequest.FromString(request).id
                worker = self._session_worker(session_id, workers, caller)
                learn = self._forget_session if method == CLOSE_SESSION else None
                return Route(worker or _least_loaded(workers), learn)
        except DecodeError:
            pass  # a worker answers it INVALID_ARGUMENT, as it would without the router
        return Route(_least_loaded(workers))

    def _generate(self, request, workers: list[Worker], caller: Caller) -> Route:
        name = request.adapter.split("@", 1)[0]
        if request.session:  # its live weights are in one worker's memory
            worker = self._session_worker(request.session, workers, caller) or \
                _least_loaded(workers)
        elif name:
            order = rendezvous_order(name, workers, lambda w: w.id)
            worker = first_unloaded(order, lambda w: w.in_flight, self.spill_threshold)
            if worker is not order[0]:
                self.metrics.spills.inc()
        else:
            worker = _least_loaded(workers)
        keys = []

        def remember(request_id: str) -> None:
            key = (caller.authorization, request_id)
            with self._lock:
                self._requests[key] = worker.id
            keys.append(key)

        def learn(response: bytes) -> None:
            if not keys:  # the worker named the request in its first message
                remember(inference_pb2.GenerateResponse.FromString(response).request_id)

        def end() -> None:
            with self._lock:
                for key in keys:
                    if self._requests.get(key) == worker.id:
                        del self._requests[key]

        if request.request_id:
            remember(request.request_id)
        return Route(worker, learn, end)

    def _create_job(self, workers: list[Worker]) -> Route:
        with self._lock:
            worker = min(workers, key=lambda w: (len(self._placed[w.id]), w.in_flight,
                                                 w.forwarded))

        def learn(response: bytes) -> None:
            job = training_pb2.Job.FromString(response)
            with self._lock:
                self._owners[job.id] = worker.id
                if job.state not in TERMINAL:
                    self._placed[worker.id].add(job.id)
        return Route(worker, learn)

    def _learn_job_state(self, method: str) -> Callable[[bytes], None]:
        """Forgets the owner and placement of a job whose response shows it finished."""
        def learn(response: bytes) -> None:
            if method == WATCH_JOB:
                event = training_pb2.JobEvent.FromString(response)
                job_id, state = event.job_id, event.state  # 0 when not a state event
            else:
                job = training_pb2.Job.FromString(response)
                job_id, state = job.id, job.state
            if state in TERMINAL:
                with self._lock:
                    self._owners.pop(job_id, None)  # any worker answers for a finished job
                    for jobs in self._placed.values():
                        jobs.discard(job_id)
        return learn

    def _owner(self, job_id: str, workers: list[Worker], caller: Caller) -> Worker | None:
        """The healthy worker that runs `job_id`, or None (not found, not the caller's, or its
        owner is not in rotation: any worker then answers from the shared registry)."""
        with self._lock:
            worker_id = self._owners.get(job_id)
        if worker_id is None:
            ask = _least_loaded(workers)
            try:
                response = ask.channel.unary_unary(GET_JOB)(
                    training_pb2.GetJobRequest(id=job_id).SerializeToString(),
                    metadata=caller.metadata,
                    timeout=min(caller.timeout or OWNER_LOOKUP_TIMEOUT_S,
                                OWNER_LOOKUP_TIMEOUT_S))
            except grpc.RpcError:
                return None  # the call itself then gets the worker's answer
            job = training_pb2.Job.FromString(response)
            if job.state in TERMINAL:
                return None
            worker_id = job.owner
            with self._lock:
                self._owners[job_id] = worker_id
        return self._healthy(worker_id)

    def _create_session(self, worker: Worker) -> Route:
        def learn(response: bytes) -> None:
            self._remember_session(training_pb2.Session.FromString(response).id, worker.id)
        return Route(worker, learn)

    def _remember_session(self, session_id: str, worker_id: str) -> None:
        with self._lock:
            self._sessions[session_id] = worker_id
            self._sessions.move_to_end(session_id)
            while len(self._sessions) > SESSIONS_KEPT:
                self._sessions.popitem(last=False)

    def _forget_session(self, response: bytes) -> None:
        with self._lock:
            self._sessions.pop(training_pb2.Session.FromString(response).id, None)

    def _session_worker(self, session_id: str, workers: list[Worker],
                        caller: Caller) -> Worker | None:
        """The healthy worker that holds `session_id`, or None (no worker has it for this
        caller: any worker then answers NOT_FOUND)."""
        with self._lock:
            worker_id = self._sessions.get(session_id)
        if worker_id is None and session_id:
            for worker in workers:  # a session this router did not place: who has it?
                try:
                    worker.channel.unary_unary(GET_SESSION)(
                        training_pb2.GetSessionRequest(id=session_id).SerializeToString(),
                        metadata=caller.metadata,
                        timeout=min(caller.timeout or OWNER_LOOKUP_TIMEOUT_S,
                                    OWNER_LOOKUP_TIMEOUT_S))
                except grpc.RpcError:
                    continue
                self._remember_session(session_id, worker.id)
                worker_id = worker.id
                break
        return self._healthy(worker_id)

    def _healthy(self, worker_id: str | None) -> Worker | None:
        worker = None if worker_id is None else self.pool.get(worker_id)
        return worker if worker is not None and worker.healthy else None


def _least_loaded(workers: list[Worker]) -> Worker:
    return min(workers, key=lambda w: (w.in_flight, w.forwarded))
