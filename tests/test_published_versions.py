"""What the server's JobManager makes of a job's events. A version the job publishes is served
from the weights the engine already holds: it is cached under the key the server looks it up
by (`tenant/name@vR`, R the registry's version), so no request for it reads its files from
disk. Its progress reports training tokens per second from the progress it records."""

from __future__ import annotations

import json

from server_helpers import tiny_adapter_dir

from cotune.adapters.sql_registry import SqliteRegistry
from cotune.engine.runtime import Request, Runtime
from cotune.server.inference_service import InferenceService
from cotune.server.jobs import JobManager, LiveJob
from cotune.server.metrics import Metrics

DATA = "".join(json.dumps({"prompt": f"the cat {i}", "completion": " sat on the mat"}) + "\n"
               for i in range(8)).encode()
JOB = dict(max_steps=4, checkpoint_every=2, batch_size=2, seed=3)


def test_a_version_a_server_job_publishes_is_served_without_a_disk_load(tiny_checkpoint,
                                                                        tmp_path):
    _, base = tiny_checkpoint
    registry = SqliteRegistry(tmp_path / "registry")
    try:
        tenant = registry.create_tenant("acme")
        # The registry numbers the job's versions after one uploaded before: R = K + 1.
        registry.publish_version("acme", "facts", tiny_adapter_dir(tmp_path / "uploaded"),
                                 {"source": "upload"})
        with Runtime.load(base, num_slots=2) as rt:
            jobs = JobManager(rt, registry, tmp_path / "jobs", Metrics(), "worker")
            record = jobs.create(tenant, "facts", JOB, DATA)
            jobs.join(timeout=300)
            assert registry.get_job("acme", record.id).state == "succeeded"
            versions = [v.version for v in registry.list_versions("acme", "facts")
                        if v.provenance.get("job_id") == record.id]
            assert versions == [2, 3]
            # The key and directory exactly as Generate resolves them (only the registry is used).
            server = InferenceService(None, registry, rt, None, None, None, max_logprobs=20)
            host = rt.engine.adapters.host
            loads = host.loads
            for version in versions:
                _, (key, path) = server._adapter(tenant, f"facts@v{version}")
                assert key in host
                rt.generate([Request(prompt_token_ids=[9, 10, 11], max_tokens=2, adapter=key,
                                     adapter_path=path)])
            assert host.loads == loads  # no version was read from disk
    finally:
        registry.close()


def test_tokens_per_second_count_from_the_previous_report_of_this_run_only():
    resumed = {"step": 4, "total_steps": 9, "loss": 1.0, "tokens": 400}  # from a run before
    live = LiveJob(None, None, None, ("acme", "facts"), progress=dict(resumed))
    report = dict(resumed, step=5, tokens=450)
    assert live.advance(report, time=100.0) == 0.0  # no earlier report of this run
    assert live.advance(dict(report, step=6, tokens=530), time=102.0) == 40.0
    assert live.progress == dict(resumed, step=6, tokens=530)
