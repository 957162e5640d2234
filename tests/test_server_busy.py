"""A busy engine never blocks the server: on the real SmolLM2, with a fine-tuning job of long
examples training, 20 concurrent generations all complete, unary calls and health keep
answering in well under a second, and SIGTERM stops the server within its grace period and
a step."""

from __future__ import annotations

import json
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_helpers import start_server
from wire import Caller

from cotune.v1 import inference_pb2, training_pb2

pytestmark = pytest.mark.slow

# long examples: each training step is a long forward and backward on this CPU
LONG_DATA = "\n".join(json.dumps({"prompt": f"Write about the sea, part {i}.",
                                  "completion": " The sea is wide and deep." * 24})
                      for i in range(8)).encode()
GRACE_S = 5


def test_a_training_server_answers_generations_unary_calls_and_sigterm(tmp_path):
    server = start_server(tmp_path, "--model", "default", "--grace-period", str(GRACE_S),
                          "--ttft-target", "3", "--tpot-target", "0.5")
    caller = Caller(server.address, server.admin_token)
    try:
        # a floor: the job keeps moving however little room the requests leave
        job = caller.create_job("sea", LONG_DATA, max_steps=100_000, batch_size=1,
                                min_share=0.2)
        health = health_pb2_grpc.HealthStub(caller.channel)
        while caller.training.GetJob(training_pb2.GetJobRequest(id=job.id),
                                     metadata=caller.metadata).step < 1:
            time.sleep(0.2)  # the job is under way: its steps now run beside the requests

        latencies, stop = {"GetJob": [], "ListJobs": [], "health": []}, threading.Event()

        def probe() -> None:
            calls = {
                "GetJob": lambda: caller.training.GetJob(
                    training_pb2.GetJobRequest(id=job.id), metadata=caller.metadata, timeout=30),
                "ListJobs": lambda: caller.training.ListJobs(
                    training_pb2.ListJobsRequest(), metadata=caller.metadata, timeout=30),
                "health": lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=30)}
            while not stop.is_set():
                for name, call in calls.items():
                    started = time.monotonic()
                    call()
                    latencies[name].append(time.monotonic() - started)
                time.sleep(0.05)

        results, errors = [], []

        def generate(i: int) -> None:
            try:
                results.append(caller.generate(f"Tell me about the number {i}.", max_tokens=48))
            except grpc.RpcError as e:
                errors.append(e)

        before = caller.training.GetJob(training_pb2.GetJobRequest(id=job.id),
                                        metadata=caller.metadata)  # as of its last step
        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        generators = [threading.Thread(target=generate, args=(i,)) for i in range(20)]
        for thread in generators:
            thread.start()
        for thread in generators:
            thread.join(600)
        stop.set()
        prober.join(60)

        assert not errors, errors[0]
        assert len(results) == 20
        assert all(r[-1].finish_reason in (inference_pb2.FINISH_REASON_LENGTH,
                                           inference_pb2.FINISH_REASON_STOP) for r in results)
        for name, seconds in latencies.items():
            print(f"{name}: {len(seconds)} calls, slowest {max(seconds) * 1000:.0f} ms")
            assert seconds and max(seconds) < 1.0, (name, sorted(seconds)[-5:])

        # it trains on beside the requests (on this CPU, on a training lane): optimizer
        # steps go on (the generations, which may stop early, can take less than one)
        deadline = time.monotonic() + 60
        while (record := caller.training.GetJob(training_pb2.GetJobRequest(id=job.id),
                                                metadata=caller.metadata)).step <= before.step:
            assert time.monotonic() < deadline, record
            time.sleep(0.2)
        assert record.state == training_pb2.JOB_STATE_RUNNING

        stopped = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(GRACE_S + 30) == 0  # the grace, a step and the exit
        print(f"SIGTERM to exit: {time.monotonic() - stopped:.1f} s")
    finally:
        caller.close()
        server.stop(signal.SIGKILL)
