"""The workers behind the router: a channel to each, the calls in flight on it, and its health.

Every worker is checked each `interval` seconds with grpc.health.v1. SERVING puts it in
rotation; NOT_SERVING (draining, a failed engine) takes it out and lets its calls finish; no
answer within `timeout` (a crashed or hung process) takes it out and cancels its calls in
flight, which the router answers UNAVAILABLE naming the worker, so that clients retry them
elsewhere. A call that a worker answers UNAVAILABLE takes it out at once, until a health
check finds it SERVING again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cotune.router.metrics import RouterMetrics

log = logging.getLogger("cotune.router")
MAX_MESSAGE_BYTES = 64 << 20  # as the workers accept
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   # a worker whose node vanished is noticed without waiting for TCP
                   ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000)]


@dataclass(eq=False)
class Worker:
    id: str
    address: str
    channel: grpc.Channel
    healthy: bool = False
    failure: str = ""  # why its calls were cancelled, for their UNAVAILABLE
    in_flight: int = 0
    forwarded: int = 0  # calls ever, a tie-break among equally loaded workers
    retired: bool = False  # discovery dropped it: closed when its last call ends
    calls: set = field(default_factory=set)  # upstream calls to cancel when it fails

    def describe(self) -> str:
        return self.id if self.id == self.address else f"{self.id} ({self.address})"


class Pool:
    def __init__(self, metrics: RouterMetrics, interval: float, timeout: float,
                 on_health: Callable[[int], None]):
        self.metrics, self.interval, self.timeout = metrics, interval, timeout
        self._on_health = on_health  # called with the number of healthy workers
        self._workers: dict[str, Worker] = {}
        self._lock = threading.RLock()  # a done call's callback may run in the caller's thread
        self._stop = threading.Event()
        self._checked = threading.Condition(self._lock)
        self._rounds = 0

    # --- membership, from discovery -----------------------------------------------------

    def set_workers(self, addresses: dict[str, str]) -> None:
        """The workers now known, id -> host:port. New ones join after their first health
        check; gone ones leave rotation and keep their calls until they end."""
        with self._lock:
            for worker_id, worker in list(self._workers.items()):
                if addresses.get(worker_id) != worker.address:
                    del self._workers[worker_id]
                    self._retire(worker)
            for worker_id, address in addresses.items():
                if worker_id not in self._workers:
                    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
                    self._workers[worker_id] = Worker(worker_id, address, channel)
                    log.info("worker %s at %s joined", worker_id, address)
            self._count_healthy()

    def _retire(self, worker: Worker) -> None:
        log.info("worker %s left", worker.describe())
        worker.retired, worker.healthy = True, False
        try:
            self.metrics.worker_up.remove(worker.id)
        except KeyError:  # it left before its first health check
            pass
        if worker.in_flight == 0:
            worker.channel.close()

    # --- choosing -----------------------------------------------------------------------

    def healthy(self) -> list[Worker]:
        with self._lock:
            return [w for w in self._workers.values() if w.healthy]

    def get(self, worker_id: str) -> Worker | None:
        with self._lock:
            return self._workers.get(worker_id)

    def describe(self) -> str:
        with self._lock:
            return ", ".join(f"{w.describe()}: {w.failure or 'not serving'}"
                             for w in self._workers.values()) or "none discovered"

    # --- calls --------------------------------------------------------------------------

    @contextmanager
    def calling(self, worker: Worker):
        """Counts a call on `worker` while it runs."""
        with self._lock:
            worker.in_flight += 1
            worker.forwarded += 1
        self.metrics.in_flight.labels(worker.id).inc()
        try:
            yield
        finally:
            self.metrics.in_flight.labels(worker.id).dec()
            with self._lock:
                worker.in_flight -= 1
                if worker.retired and worker.in_flight == 0:
                    worker.channel.close()

    def track(self, worker: Worker, call) -> None:
        """`call` (a grpc future or stream) is cancelled if `worker` fails before it ends."""
        with self._lock:
            if worker.failure:
                call.cancel()
            else:
                worker.calls.add(call)
                call.add_done_callback(lambda _: self._untrack(worker, call))

    def _untrack(self, worker: Worker, call) -> None:
        with self._lock:
            worker.calls.discard(call)

    def unavailable(self, worker: Worker, reason: str) -> None:
        """A call on `worker` was answered UNAVAILABLE: out of rotation until it is SERVING."""
        with self._lock:
            if worker.healthy:
                log.warning("worker %s out of rotation: %s", worker.describe(), reason)
                self._set_healthy(worker, False)

    # --- health -------------------------------------------------------------------------

    def start(self) -> None:
        threading.Thread(target=self._check_forever, daemon=True, name="health").start()

    def stop(self) -> None:
        self._stop.set()

    def wait_checked(self, timeout: float) -> bool:
        """Waits for a health round to complete (start-up: the router serves after one)."""
        with self._checked:
            return self._checked.wait_for(lambda: self._rounds > 0, timeout)

    def _check_forever(self) -> None:
        with futures.ThreadPoolExecutor(8, thread_name_prefix="health") as pool:
            while True:
                with self._lock:
                    workers = list(self._workers.values())
                answers = list(pool.map(self._check, workers))
                with self._lock:
                    for worker, (serving, error) in zip(workers, answers):
                        if not worker.retired:
                            self._apply(worker, serving, error)
                    self._count_healthy()
                    self._rounds += 1
                    self._checked.notify_all()
                if self._stop.wait(self.interval):
                    return

    def _check(self, worker: Worker) -> tuple[bool, str]:
        """(SERVING?, the error when it did not answer)."""
        try:
            response = health_pb2_grpc.HealthStub(worker.channel).Check(
                health_pb2.HealthCheckRequest(), timeout=self.timeout)
        except grpc.RpcError as e:
            return False, f"health check failed: {e.code().name}: {e.details()}"
        return response.status == health_pb2.HealthCheckResponse.SERVING, ""

    def _apply(self, worker: Worker, serving: bool, error: str) -> None:
        if serving:
            if not worker.healthy:
                log.info("worker %s in rotation", worker.describe())
            worker.failure = ""
            self._set_healthy(worker, True)
            return
        if worker.healthy:
            log.warning("worker %s out of rotation: %s", worker.describe(),
                        error or "health NOT_SERVING")
        self._set_healthy(worker, False)
        if error and not worker.failure:
            worker.failure = error
            for call in list(worker.calls):  # a worker that does not answer ends its calls
                call.cancel()
            worker.calls.clear()

    def _set_healthy(self, worker: Worker, healthy: bool) -> None:
        if worker.healthy and not healthy:
            self.metrics.failures.labels(worker.id).inc()
        worker.healthy = healthy
        self.metrics.worker_up.labels(worker.id).set(int(healthy))
        self._count_healthy()

    def _count_healthy(self) -> None:
        count = sum(w.healthy for w in self._workers.values())
        self.metrics.healthy.set(count)
        self._on_health(count)
