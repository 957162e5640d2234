"""The engine thread never blocks its callers. While a step computes (held here inside the
step until the test lets it go), aborts, job starts, cancels and checkpoint requests return
at once, and take effect at the next step boundary."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from cotune import FinetuneSpec, JobState, LoraSettings, Request, Runtime
from cotune.engine.runtime import EngineStopped

PROMPT = [5, 6, 7, 8]


@pytest.fixture
def held(tiny_checkpoint):
    """(runtime, inside, go_on): its engine waits inside each step that computed anything
    (after streaming that step's tokens) until `go_on` is set; `inside` is set meanwhile."""
    with Runtime.load(tiny_checkpoint[1]) as rt:
        inside, go_on = threading.Event(), threading.Event()

        def hold(_report) -> None:
            inside.set()
            go_on.wait(120)

        rt.engine.on_step = hold
        try:
            yield rt, inside, go_on
        finally:
            go_on.set()


def returns_at_once(call, *args):
    """call(*args) on another thread; its result, failing if it waits for the held step."""
    result = []
    thread = threading.Thread(target=lambda: result.append(call(*args)), daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), f"{call.__name__} waited for the step in progress"
    return result[0]


def finetune_spec(tmp_path) -> FinetuneSpec:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"the cat sat on mat {i}"}) + "\n"
                            for i in range(8)))
    return FinetuneSpec(name="held", data=str(data), output_dir=str(tmp_path / "out"),
                        lora=LoraSettings(rank=4, alpha=8, targets=("q_proj", "v_proj")),
                        batch_size=2, epochs=1000, seed=0)


def test_an_abort_ends_the_stream_while_the_step_still_computes(held):
    rt, inside, go_on = held
    deltas = []
    stream = rt.stream(Request(prompt_token_ids=PROMPT, max_tokens=50, ignore_eos=True,
                               request_id="long"))
    reader = threading.Thread(target=lambda: deltas.extend(stream), daemon=True)
    reader.start()
    assert inside.wait(60)
    assert returns_at_once(rt.abort, "long") is True
    reader.join(10)
    assert not reader.is_alive() and not go_on.is_set()
    assert deltas[-1].finish_reason == "abort"
    assert returns_at_once(rt.abort, "long") is False  # no longer in flight
    go_on.set()
    rt.engine.on_step = None
    assert rt.generate([Request(prompt_token_ids=PROMPT, max_tokens=3,
                                ignore_eos=True)])[0].completion_tokens == 3
    cache = rt.engine.cache  # the aborted request's blocks went back at a step boundary
    assert cache.free_blocks == cache.num_blocks


def test_jobs_start_cancel_and_checkpoint_without_waiting_for_the_step(held, tmp_path):
    rt, inside, go_on = held
    job = returns_at_once(rt.finetune, finetune_spec(tmp_path))
    assert job.state is JobState.RUNNING
    assert inside.wait(60)  # the job's first step is held
    returns_at_once(rt.checkpoint_jobs, 0.1)
    returns_at_once(job.cancel)
    assert job.state is JobState.RUNNING and not go_on.is_set()  # until the step ends
    go_on.set()
    assert job.wait(timeout=60).state is JobState.CANCELLED
    assert not rt.engine.trainers


def test_closing_ends_every_request_even_those_that_never_reached_a_step(held):
    rt, inside, go_on = held
    outcomes = {}

    def run(name: str, max_tokens: int) -> None:
        try:
            outcomes[name] = rt.generate([Request(prompt_token_ids=PROMPT, max_tokens=max_tokens,
                                                  ignore_eos=True)])[0].finish_reason
        except EngineStopped:  # it came after the close
            outcomes[name] = "refused"

    threads = [threading.Thread(target=run, args=("held", 200), daemon=True)]
    threads[0].start()
    assert inside.wait(60)
    threads.append(threading.Thread(target=run, args=("queued", 5), daemon=True))
    threads[1].start()
    threads.append(threading.Thread(target=rt.close, daemon=True))
    threads[2].start()
    go_on.set()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()
    assert outcomes["held"] == "abort"
    assert outcomes["queued"] in ("abort", "refused")


EXIT_WITH_A_BUSY_RUNTIME = """
import sys, time
from cotune import FinetuneSpec, LoraSettings, Runtime
runtime = Runtime.load(sys.argv[1])
job = runtime.finetune(FinetuneSpec(name="busy", data=sys.argv[2], output_dir=sys.argv[3],
                                    lora=LoraSettings(rank=2, alpha=4), epochs=10_000))
while job.metrics["tokens"] == 0:
    time.sleep(0.01)
print(job.state.value, flush=True)  # and exits, the engine in the middle of its steps
"""


def test_an_interpreter_exits_cleanly_with_a_runtime_left_open_mid_step(tiny_checkpoint,
                                                                        tmp_path):
    _, base = tiny_checkpoint
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"the cat sat on the mat {i}"}) + "\n"
                            for i in range(8)))
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", EXIT_WITH_A_BUSY_RUNTIME, str(base),
                               str(data), str(tmp_path / "out")], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == "running"
