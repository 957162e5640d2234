"""A training lane (EngineConfig.training_threads): jobs train on a thread of their own beside
the serving steps. The job learns what it would in the steps, its versions are served at
once, serving is unchanged, and cancels, stops and failures behave as in the steps."""

from __future__ import annotations

import time

import pytest
import torch
from test_finetune import _spec

from cotune import JobState, OptimizerSettings, Request, Runtime
from cotune.engine.engine import Engine, EngineConfig
from cotune.engine.job import JobFailed
from cotune.model.loading import load_model
from cotune.server.metrics import Metrics

PROMPTS = [[5, 6, 7, 8, 9], [1, 2], [44, 45, 46, 47], [12] * 9]


def _requests(adapter: str | None = None) -> list[Request]:
    return [Request(prompt_token_ids=p, adapter=adapter, max_tokens=6, ignore_eos=True)
            for p in PROMPTS]


def _weights(job) -> dict[str, torch.Tensor]:
    return {f"{name}.{part}": tensor.detach().clone()
            for name in job.trainer.lora.module_names()
            for part, tensor in zip("AB", job.trainer.lora.weights(name)[:2])}


def test_a_job_on_the_lane_learns_what_it_learns_in_the_steps_while_requests_are_served(
        tiny_checkpoint, tmp_path):
    _, base = tiny_checkpoint
    spec = dict(epochs=1, checkpoint_every=1)
    for run in ("steps", "lane"):
        (tmp_path / run).mkdir()
    with Runtime.load(base) as rt:
        alone = [c.token_ids for c in rt.generate(_requests())]
        in_steps = rt.finetune(_spec(tmp_path / "steps", **spec)).wait(timeout=300)
    with Runtime.load(base, training_threads=1) as rt:
        assert rt.engine.lane is not None
        job = rt.finetune(_spec(tmp_path / "lane", **spec))
        served = []
        while job.state is JobState.RUNNING:  # requests all along
            served.append([c.token_ids for c in rt.generate(_requests())])
        assert job.wait(timeout=300).state is JobState.SUCCEEDED, job.error
        assert served and all(tokens == alone for tokens in served)
        # each version at once by name, from the weights it saved
        last = f"facts@v{job.trainer.versions[-1]}"
        by_name = rt.generate(_requests(last))
        by_files = rt.generate(_requests(str(tmp_path / "lane/out/facts" /
                                             f"v{job.trainer.versions[-1]}")))
        assert [c.token_ids for c in by_name] == [c.token_ids for c in by_files]
    assert job.trainer.versions == in_steps.trainer.versions == list(
        range(1, in_steps.trainer.total_steps + 1))
    assert job.trainer.losses == pytest.approx(in_steps.trainer.losses, rel=1e-4)
    expected = _weights(in_steps)
    for name, tensor in _weights(job).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-6)


def test_a_cancelled_job_leaves_the_lane_and_publishes_nothing_more(tiny_checkpoint,
                                                                     tmp_path):
    _, base = tiny_checkpoint
    with Runtime.load(base, training_threads=1) as rt:
        job = rt.finetune(_spec(tmp_path, epochs=5000, checkpoint_every=1))
        deadline = time.monotonic() + 120
        while not job.versions:
            assert time.monotonic() < deadline, "no version was published"
            time.sleep(0.01)
        job.cancel()
        assert job.wait(timeout=60).state is JobState.CANCELLED and not rt.engine.trainers
        announced = job.versions
        time.sleep(1.0)  # the lane's pass in progress ends (saving at most one more version)
        saved = list(job.trainer.versions)
        time.sleep(0.5)  # and no other pass follows
        assert job.trainer.versions == saved and job.versions == announced
        assert [c.completion_tokens for c in rt.generate(_requests("facts"))] == [6] * 4


def test_a_version_asked_for_before_a_stop_is_announced_before_the_job_ends(tiny_checkpoint,
                                                                           tmp_path):
    _, base = tiny_checkpoint
    rt = Runtime.load(base, training_threads=1)
    job = rt.finetune(_spec(tmp_path, epochs=5000, checkpoint_every=0))  # no version alone
    stream = job.subscribe()
    deadline = time.monotonic() + 120
    while job.trainer.step < 2:
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.01)
    rt.checkpoint_jobs(timeout=60)  # what a server does on SIGTERM, then it closes
    rt.close()
    events = []
    while (event := stream.get(timeout=10)) is not None:
        events.append(event)
    kinds = [e.kind for e in events]
    assert "checkpoint" in kinds and kinds[-1] == "state", kinds
    assert events[kinds.index("checkpoint")].data["version"] == 1
    assert job.state is JobState.CANCELLED and job.versions == ["facts@v1"]
    assert (tmp_path / "out/facts/v1/adapter_model.safetensors").is_file()


def test_a_job_that_fails_on_the_lane_ends_alone(tiny_checkpoint, tmp_path):
    _, base = tiny_checkpoint
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with Runtime.load(base, training_threads=1) as rt:
        # a learning rate the optimizer's float arithmetic overflows on: its first step fails
        # (no spec accepts it, so it is set past the spec's checks)
        optimizer = OptimizerSettings(max_grad_norm=None)
        object.__setattr__(optimizer, "lr", 1e38)
        diverging = rt.finetune(_spec(tmp_path / "a", epochs=50, optimizer=optimizer))
        healthy = rt.finetune(_spec(tmp_path / "b", name="healthy", max_steps=3))
        with pytest.raises(JobFailed, match=r"job-1 \(facts\) failed: .*overflow"):
            diverging.wait(timeout=120)
        assert healthy.wait(timeout=300).state is JobState.SUCCEEDED, healthy.error
        assert healthy.versions == ["healthy@v1"]
        assert [c.completion_tokens for c in rt.generate(_requests("healthy"))] == [6] * 4


def test_a_lane_is_refused_where_the_serving_steps_must_train(tiny_checkpoint):
    _, base = tiny_checkpoint
    with pytest.raises(ValueError, match="set training_threads to 0"):
        Engine(load_model(base), config=EngineConfig(training_threads=1, time_slice_s=1.0))


def test_by_default_a_lane_gets_the_cores_a_cpus_serving_steps_leave_idle(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert EngineConfig(num_threads=2).idle_cores("cpu") == 6
    assert EngineConfig().idle_cores("cpu") == 4  # half the cores serve
    assert EngineConfig(num_threads=8).idle_cores("cpu") == 0
    assert EngineConfig(num_threads=1).idle_cores("cuda:0") == 0


def test_every_version_is_announced_when_the_lane_runs_passes_ahead_of_the_engine(
        tiny_checkpoint, tmp_path):
    _, base = tiny_checkpoint
    with Runtime.load(base, training_threads=1) as rt:
        lane = rt.engine.lane
        take_passes = lane.take_passes
        job = None

        def after_the_job_is_done():  # the engine takes the lane's passes only at the end
            while job is None or not job.trainer.done:
                time.sleep(0.01)
            return take_passes()

        lane.take_passes = after_the_job_is_done
        job = rt.finetune(_spec(tmp_path, max_steps=3, checkpoint_every=1))
        assert job.wait(timeout=300).state is JobState.SUCCEEDED, job.error
        assert job.trainer.versions == [1, 2, 3]
        assert job.versions == ["facts@v1", "facts@v2", "facts@v3"]


def test_the_lanes_passes_have_metrics_of_their_own_apart_from_the_steps(tiny_checkpoint,
                                                                          tmp_path):
    _, base = tiny_checkpoint
    metrics = Metrics()
    with Runtime.load(base, training_threads=1) as rt:
        metrics.watch(rt)
        job = rt.finetune(_spec(tmp_path, max_steps=3))
        while job.state is JobState.RUNNING:  # requests all along
            rt.generate(_requests())
        assert job.wait(timeout=300).state is JobState.SUCCEEDED, job.error

    def sample(name, **labels):
        return metrics.registry.get_sample_value(name, labels)

    assert sample("cotune_training_pass_duration_seconds_count") >= 3  # a step a pass at most
    assert sample("cotune_training_pass_duration_seconds_sum") > 0
    assert sample("cotune_step_tokens_total", kind="training") == sample(
        "cotune_step_tokens_total", kind="backward") > 0
    assert sample("cotune_step_tokens_total", kind="decode") > 0
    assert sample("cotune_step_training_seconds_total") == 0  # the steps only served
    # what health reads of a wedged engine: both count as progress
    assert rt.engine.progress == sample("cotune_step_duration_seconds_count") + sample(
        "cotune_training_pass_duration_seconds_count")
