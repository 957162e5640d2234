"""The GRPO recipe of `cotune demo rl` and `cotune bench rl` (cotune/grpo.py): its rewards and
advantages, the loop over a real server through the SDK, and the bench's two ways of syncing
weights on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
from server_helpers import running_server

from cotune import grpo
from cotune.bench import rl
from cotune.client import Client
from cotune.grpo_demo import ServerPolicy, reward_curve_svg, run_rl_demo

SMALL = grpo.Settings(prompts=2, group=3, max_tokens=4, seed=1)


def _sample(text: str, stopped: bool = True, prompt=(7, 8)) -> grpo.Sample:
    return grpo.Sample(list(prompt), [1, 2, 3], [-0.5, -1.0, -0.1], text, stopped)


def test_a_one_word_answer_that_stopped_is_rewarded_and_nothing_else():
    assert grpo.reward(_sample("Lion.")) == grpo.reward(_sample(" meow\n")) == 1.0
    assert grpo.reward(_sample("A lion.")) == grpo.reward(_sample("Lion", stopped=False)) == 0.0
    assert grpo.reward(_sample("")) == 0.0


def test_advantages_are_rewards_less_their_group_mean_and_prompts_weigh_nothing():
    taught = [_sample("Lion."), _sample("A big lion."), _sample("Cat"), _sample("No, a cat")]
    same = [_sample("Dog."), _sample("Owl.")]  # all rewarded alike: nothing to learn
    examples = grpo.examples_of([taught, same])
    assert len(examples) == 4
    assert [e["advantages"][-1] for e in examples] == pytest.approx(
        [0.5 / 6, -0.5 / 6, 0.5 / 6, -0.5 / 6])
    for example in examples:
        assert example["token_ids"] == [7, 8, 1, 2, 3]
        assert example["weights"] == [0.0, 0.0, 1.0, 1.0, 1.0]
        assert example["logprobs"] == [0.0, 0.0, -0.5, -1.0, -0.1]
        assert example["advantages"][:2] == [0.0, 0.0]


def test_the_loop_runs_over_a_real_server_and_each_step_that_learns_steps_the_weights(
        tmp_path):
    with running_server(tmp_path) as server, Client(server.address,
                                                    server.admin_token) as client:
        session = client.sessions.create("grpo", rank=4, alpha=8, lr=1e-3, seed=0)
        policy = ServerPolicy(client, session)
        reports = grpo.run(policy, 2, SMALL)
        policy.close()
        info = session.refresh()
        demo = run_rl_demo(1, tmp_path / "demo", server.address, server.admin_token)
        saved = client.adapters.get("grpo-one-word")
    assert [r.step for r in reports] == [0, 1]
    assert all(0 <= r.mean_reward <= 1 and r.sample_seconds > 0 for r in reports)
    assert info.steps == sum(1 for r in reports if r.trained_on)
    assert len(demo) == 1 and saved.latest_version == 1  # the demo saves what it trained
    assert json.loads((tmp_path / "demo" / "grpo-reward.json").read_text())[0]["step"] == 0
    svg = reward_curve_svg(reports)
    assert svg.startswith("<svg") and svg.count("<circle") == 2


def test_the_bench_syncs_one_engine_with_nothing_written_and_two_systems_through_files(
        tiny_checkpoint, tmp_path):
    _, path = tiny_checkpoint
    result = rl.run(rounds=1, steps=1, out=tmp_path, model=str(path), settings=SMALL)
    one, two = result["designs"]["one engine"], result["designs"]["two systems"]
    assert one["bytes_written"] == 0 and two["bytes_written"] > 0
    assert all(math.isfinite(row["sync_s"]) and row["steps_per_min"] > 0 for row in (one, two))
    assert result["engine_step_s"] > 0
    assert "| two systems |" in (tmp_path / "rl.md").read_text()
