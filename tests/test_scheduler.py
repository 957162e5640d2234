"""Scheduling decisions: the measured step-time model, tenant fairness, the training floor
and SLO accounting."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from conftest import tiny_tokenizer
from engine_helpers import run_to_completion

from cotune import FinetuneSpec, LoraSettings
from cotune.engine.engine import Engine, EngineConfig
from cotune.engine.kv_cache import PagedKVCache
from cotune.engine.sampling import SamplingParams
from cotune.engine.scheduler import Scheduler, SchedulerConfig, StepBudget
from cotune.engine.sequence import Sequence
from cotune.engine.step_time import StepTimeModel
from cotune.engine.trainer import Trainer
from cotune.engine.waiting import WaitingQueue
from cotune.model.config import ModelConfig
from cotune.model.loading import load_model


def test_step_time_model_recovers_a_known_cost_and_sizes_budgets():
    model = StepTimeModel()
    rng = random.Random(0)
    for i in range(96):
        serve, train = rng.randint(0, 300), rng.choice([0, rng.randint(1, 200)])
        passes = rng.choice([0, 1, 1, 2])
        back = rng.randint(passes, 200) if passes else 0
        forward = 0.03 + 3e-4 * train if train else 0.0
        backward = 0.05 * passes + 6e-4 * back
        if i % 16 == 5:
            backward += 1.0  # an optimizer step, say: dropped from the fit
        model.observe(serve, 0.01 + 2e-4 * serve + forward + backward + rng.uniform(0, 1e-4),
                      train, forward, back, passes, backward)
    a, *rest = model.coefficients
    assert a == pytest.approx(0.01, abs=2e-3)
    assert rest == pytest.approx([2e-4, 0.03, 3e-4, 0.05, 6e-4], rel=0.05)
    assert model.inference_budget(0.05, cap=1000) == pytest.approx(200, abs=10)
    # a few-token piece costs its pass's fixed part: nowhere near free
    assert model.training_cost(1, 0, 0) == pytest.approx(0.03 + 3e-4, rel=0.05)
    assert model.training_cost(10, 20, 1) == pytest.approx(0.03 + 0.003 + 0.05 + 0.012,
                                                           rel=0.05)
    assert model.predict(100) == pytest.approx(0.03, rel=0.05)
    assert model.predict(100, 10, 20, 2) == pytest.approx(0.03 + 0.033 + 0.1 + 0.012,
                                                          rel=0.05)


def test_step_seconds_spend_what_earlier_steps_saved_and_keep_ttft():
    scheduler = Scheduler(SchedulerConfig(ttft_target_s=2.0, tpot_target_s=0.25),
                          PagedKVCache(CONFIG, num_blocks=100, block_size=4))
    now = 100.0

    def request(name, outputs, first_token_ago=None, arrived_ago=0.0, tenant="default"):
        seq = Sequence(name, [1] * 4, SamplingParams(max_tokens=32), arrival=now - arrived_ago,
                       tenant=tenant)
        seq.output_ids = [1] * outputs
        seq.first_token_time = None if first_token_ago is None else now - first_token_ago
        return seq

    assert scheduler.step_seconds(now) == 1.0  # nobody waits: half the TTFT target
    scheduler.running.append(request("ahead", 8, first_token_ago=1.0))  # 8 x 0.25 - 1.0
    assert scheduler.step_seconds(now) == pytest.approx(1.0)
    scheduler.running.append(request("behind", 2, first_token_ago=0.4))  # 2 x 0.25 - 0.4
    assert scheduler.step_seconds(now) == pytest.approx(0.1)
    scheduler.running.pop()
    scheduler.waiting.append(request("queued", 0, arrived_ago=1.5))  # (2.0 - 1.5) / 2
    assert scheduler.step_seconds(now) == pytest.approx(0.25)
    scheduler.waiting.append(request("next", 0, arrived_ago=1.0))  # behind "queued"
    assert scheduler.step_seconds(now) == pytest.approx(0.25)
    # another tenant's oldest counts too, and a request put back after it had tokens
    scheduler.waiting.append(request("other", 0, arrived_ago=1.9, tenant="b"))
    assert scheduler.step_seconds(now) == pytest.approx(0.05)
    scheduler.waiting.put_back(request("preempted", 4, first_token_ago=1.2))  # 4 x 0.25 - 1.2
    assert scheduler.step_seconds(now) < 0


def test_a_prompt_gets_the_share_of_each_step_that_keeps_its_ttft_target(tiny_checkpoint):
    """A step of the TPOT target fits 3 tokens here, one beside two decoding requests; a
    40-token prompt then asks for a quarter of itself in its first step (a 0.4 s TTFT target
    is 4 steps of 0.1 s), not a token a step, and gets what the longest step allows (half the
    TTFT target, 0.2 s: 6 tokens; the two decodes ride beside them)."""
    _, base = tiny_checkpoint
    engine = Engine(load_model(base), config=EngineConfig(tpot_target_s=0.1, ttft_target_s=0.4))
    # 10 ms a step and 30 ms a token: (0.1 - 0.01) / 0.03 = 3 tokens within the target
    engine.step_time = StepTimeModel(prior=(0.01, 0.03, 0.01, 1.5e-3, 0.02, 3e-3))
    decoding = [engine.add([5, 6], SamplingParams(max_tokens=64, ignore_eos=True))
                for _ in range(2)]
    while any(not seq.output_ids for seq in decoding):
        engine.step()
    new = engine.add(list(range(3, 43)), SamplingParams(max_tokens=4))
    engine.step()
    # 40 / 4 steps of 0.1 s, bounded by (0.2 - 0.01) / 0.03 tokens (a token a step: 1)
    assert new.computed == 6
    steps = 1
    while not new.output_ids:
        engine.step()
        steps += 1
    assert steps <= 10  # against 40 at a token a step


CONFIG = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=1,
                     num_heads=1, num_kv_heads=1, head_dim=8)


def test_a_tenants_burst_does_not_starve_another_tenant():
    scheduler = Scheduler(SchedulerConfig(max_batched_tokens=8, max_running=100),
                          PagedKVCache(CONFIG, num_blocks=100, block_size=4))
    burst = [Sequence(f"a{i}", [1] * 4, SamplingParams(max_tokens=4), tenant="a")
             for i in range(10)]
    for seq in burst:
        scheduler.add(seq)
    _execute(scheduler, scheduler.schedule())  # admits two of a's requests (8 tokens)
    late = Sequence("b0", [1] * 4, SamplingParams(max_tokens=4), tenant="b")
    scheduler.add(late)
    plan = scheduler.schedule()  # two decodes of a, then 6 tokens of prefill
    admitted = [c.seq.id for c in plan.chunks if c.seq.pending > 1]
    assert admitted[0] == "b0"  # before the rest of the burst


def test_past_the_decode_limit_each_tenant_decodes_its_fair_share():
    """One tenant's 30 decoding requests and another's 2, 8 decodes a step at most: the light
    tenant decodes every step; the flood gets the rest, each of its requests in turn. One
    tenant alone decodes everything (its own requests only slow each other)."""
    scheduler = Scheduler(SchedulerConfig(max_batched_tokens=64, max_running=100),
                          PagedKVCache(CONFIG, num_blocks=200, block_size=4))
    flood = [Sequence(f"a{i}", [1] * 2, SamplingParams(max_tokens=50), tenant="a")
             for i in range(30)]
    light = [Sequence(f"b{i}", [1] * 2, SamplingParams(max_tokens=50), tenant="b")
             for i in range(2)]
    for seq in flood:
        scheduler.add(seq)
    _execute(scheduler, scheduler.schedule())  # 30 prefills of 2 tokens
    # one tenant: all of them
    assert scheduler.schedule(StepBudget(decode_limit=8)).num_tokens == 30
    for seq in flood:  # as if that step ran
        seq.computed += 1
        seq.output_ids.append(0)
    for seq in light:
        scheduler.add(seq)
    _execute(scheduler, scheduler.schedule())  # the light tenant's prefills, the flood's decodes
    decoded = Counter()
    for step in range(15):
        plan = scheduler.schedule(StepBudget(decode_limit=8))
        tenants = Counter(c.seq.tenant for c in plan.chunks)
        assert tenants == {"b": 2, "a": 6}, tenants
        decoded.update(c.seq.id for c in plan.chunks if c.seq.tenant == "a")
        _execute(scheduler, plan)
        for chunk in plan.chunks:
            chunk.seq.last_token_time = step + 1.0
    assert sorted(decoded.values()) == [3] * 30  # 90 decodes over 30 requests, in turn


def test_a_tenant_with_one_request_decodes_every_step_beside_another_tenants_flood(
        tiny_checkpoint):
    """Decodes that cannot keep the TPOT target together (targets no step meets): the light
    tenant's prompt is prefilled whole in a step the flood's decodes do not fill, and its
    request decodes in every step, at once from its first token; the flood's
    requests share what is left, in turn, and its late prompts wait for room its own decodes
    leave (they do not lengthen the steps that light's request decodes in)."""
    _, base = tiny_checkpoint
    engine = Engine(load_model(base), config=EngineConfig(tpot_target_s=1e-6,
                                                          ttft_target_s=1e-6))
    reports = []
    engine.on_step = reports.append

    def flooding(count: int) -> list:
        return [engine.add([3 + i] * 4, SamplingParams(max_tokens=30, ignore_eos=True),
                           tenant="flood") for i in range(count)]

    flood = flooding(6)
    for _ in range(3):  # the flood's prompts, then decodes
        engine.step()
    light = engine.add([40] * 4, SamplingParams(max_tokens=8, ignore_eos=True), tenant="light")
    reports[:] = []
    engine.step()  # its prompt, whole, and its first token; of the flood's decodes a share
    assert len(light.output_ids) == 1
    assert (reports[0].prefill_tokens, reports[0].decode_tokens) == (4, 1)
    late = flooding(3)  # more of the flood's prompts, late at once
    steps, before, reports[:] = 0, sum(len(s.output_ids) for s in flood), []
    while not light.is_finished:
        engine.step()
        steps += 1
    assert steps == 7  # a token every step
    # the flood's share meanwhile: a decode a step, in turn (not its 6 a step), no prefill
    assert sum(len(s.output_ids) for s in flood) - before <= steps
    assert max(len(s.output_ids) for s in flood) - min(len(s.output_ids) for s in flood) <= 2
    assert all(r.prefill_tokens == 0 for r in reports)
    run_to_completion(engine)
    assert all(len(s.output_ids) == 30 for s in flood + late)


def _execute(scheduler, plan):
    """What the engine does after a forward pass: the chunk is cached, a token sampled."""
    for chunk in plan.chunks:
        scheduler.cache.commit(chunk.seq.id, chunk.num_tokens)
        chunk.seq.computed += chunk.num_tokens
        chunk.seq.output_ids.append(0)


def test_training_keeps_its_floor_while_serving_is_busy_and_slos_are_counted(
        tiny_checkpoint, tmp_path):
    _, base = tiny_checkpoint
    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"text": "the cat sat on the mat {i}"}}\n' for i in range(12)))
    engine = Engine(load_model(base), config=EngineConfig(
        max_batched_tokens=64, tpot_target_s=1e-6))
    spec = FinetuneSpec(name="floor", data=str(data), output_dir=str(tmp_path / "out"),
                        lora=LoraSettings(rank=2, alpha=4), batch_size=2, epochs=1,
                        min_share=0.2)
    trainer = Trainer(spec, engine.model, tiny_tokenizer(), "job")
    engine.add_trainer(trainer)
    for i in range(6):
        engine.add([3 + i] * 20, SamplingParams(max_tokens=10))
    run_to_completion(engine)
    counters, slo = engine.scheduler.counters, engine.slo_counts
    # An impossible TPOT target leaves no room: training moves on its floor share alone.
    assert trainer.finished and counters["training_tokens"] >= trainer.tokens > 0
    assert slo["default", "tpot", "missed"] == 6 and slo["default", "ttft", "met"] == 6
    assert slo["default", "both", "missed"] == 6


def test_waiting_queue_admits_in_the_order_of_preempted_then_least_served_then_oldest():
    rng = random.Random(7)
    queue, seqs = WaitingQueue(), []
    for i in range(60):  # arrivals in order, as the engine queues them; ties of service
        seq = Sequence(f"r{i}", [1], SamplingParams(), tenant=rng.choice("abcd"), arrival=i)
        seqs.append(seq)
        queue.append(seq)
    for seq in rng.sample(seqs, 6):  # some run and are preempted
        queue.remove(seq)
        seq.preemptions = 1
        queue.put_back(seq)
    for seq in rng.sample([s for s in seqs if s.preemptions == 0], 5):  # aborted
        queue.remove(seq)
    served = Counter({"a": 5.0, "b": 0.0, "c": 5.0})  # "d" never served
    expected = sorted(queue, key=lambda s: (s.preemptions == 0, served[s.tenant], s.arrival))
    order = []
    # removing as it goes, as admission does
    for seq in queue.in_admission_order(served):
        order.append(seq)
        queue.remove(seq)
    assert order == expected and len(order) == 55 and not queue


def test_the_prefill_floor_of_late_prompts_is_bounded_by_the_longest_step():
    """A flood of prompts already past their TTFT deadline asks the floor for all of its
    tokens at once; the step stays within half the TTFT target (what `step_seconds` assumes),
    so a request decoding beside them is held back one bounded step, not one flood-sized. A
    prompt with time left gets only its share."""
    config = SchedulerConfig(max_batched_tokens=4096, max_running=100, ttft_target_s=2.0,
                             tpot_target_s=0.25)
    scheduler = Scheduler(config, PagedKVCache(CONFIG, num_blocks=1000, block_size=4))
    now = 100.0
    decoding = Sequence("light", [1] * 4, SamplingParams(max_tokens=50), tenant="b")
    scheduler.add(decoding)
    _execute(scheduler, scheduler.schedule())
    assert scheduler.decoding == 1

    step_time = StepTimeModel(prior=(0.0, 0.01, 0.0, 0.0, 0.0, 0.0))  # 10 ms a token

    def tokens_within(seconds: float) -> int:
        return step_time.inference_budget(seconds, config.max_batched_tokens)

    fresh = Sequence("fresh", [1] * 80, SamplingParams(max_tokens=4), arrival=now, tenant="a")
    scheduler.add(fresh)
    budget = scheduler.slo_budget(step_time, now)
    # the TPOT budget covers 1 decode + 80/8 of the prompt
    assert (budget.tokens, budget.decode_limit) == (25, None)
    for i in range(20):
        scheduler.add(Sequence(f"late{i}", [1] * 200, SamplingParams(max_tokens=4),
                               arrival=now - 5, tenant=f"t{i}"))
    # not 1 + 10 + 20 * 200
    assert scheduler.slo_budget(step_time, now).tokens == \
        1 + tokens_within(config.ttft_target_s / 2)


@pytest.mark.parametrize("isolation", [1.5, 3.0, 0.0])
def test_beside_a_flood_a_light_tenants_step_stays_within_its_isolation_bound(isolation):
    """30 decoding requests of one tenant beside one of another's. The TPOT target would let
    a step hold all 31 decodes (0.25 s); the light tenant alone would step in 56 ms. Its steps
    take at most `isolation` times that: the flood decodes the rest of such a step, and the
    light request decodes in every one. 0: no bound (every decode, as the target allows)."""
    config = SchedulerConfig(max_batched_tokens=512, max_running=100, tenant_isolation=isolation)
    scheduler = Scheduler(config, PagedKVCache(CONFIG, num_blocks=400, block_size=4))
    step_time = StepTimeModel(prior=(0.05, 0.006, 0.0, 0.0, 0.0, 0.0))
    for i in range(30):
        scheduler.add(Sequence(f"a{i}", [1] * 2, SamplingParams(max_tokens=50), tenant="flood"))
    scheduler.add(Sequence("b", [1] * 2, SamplingParams(max_tokens=50), tenant="light"))
    _execute(scheduler, scheduler.schedule())
    for seq in scheduler.running:
        seq.first_token_time = 0.0
    assert scheduler.decoding == 31
    for _ in range(5):
        plan = scheduler.schedule(scheduler.slo_budget(step_time, now=0.0))
        tenants = Counter(c.seq.tenant for c in plan.chunks)
        assert tenants["light"] == 1
        if isolation:
            assert step_time.predict(plan.num_tokens) <= isolation * step_time.predict(1)
            assert tenants["flood"] >= 1
        else:
            assert tenants["flood"] == 30
        _execute(scheduler, plan)


@pytest.mark.parametrize("isolation", [1.5, 0.0])
def test_a_light_tenants_prompt_is_prefilled_before_a_heavy_tenants_even_one_served_less(
        isolation):
    """A flood's 30 decodes and a long prompt half prefilled; a light tenant's new prompt. The
    step's budget counts the light prompt whole, and it is prefilled whole, before the flood's
    prompt, though the flood was served fewer tokens of late (which orders the tenants
    otherwise): a light request never waits a step more for a flood's prompts."""
    config = SchedulerConfig(max_batched_tokens=512, max_running=100, tenant_isolation=isolation)
    scheduler = Scheduler(config, PagedKVCache(CONFIG, num_blocks=400, block_size=4))
    step_time = StepTimeModel(prior=(0.05, 0.006, 0.0, 0.0, 0.0, 0.0))
    for i in range(30):
        scheduler.add(Sequence(f"a{i}", [1] * 2, SamplingParams(max_tokens=50), tenant="flood"))
    _execute(scheduler, scheduler.schedule())
    long = Sequence("long", [1] * 100, SamplingParams(max_tokens=50), tenant="flood")
    scheduler.add(long)
    _execute(scheduler, scheduler.schedule(StepBudget(tokens=40)))  # 30 decodes, 10 of its
    assert 1 < long.pending < 100
    light = Sequence("b", [1] * 6, SamplingParams(max_tokens=4), tenant="light")
    scheduler.add(light)
    scheduler.tenant_tokens.update({"light": 1000.0, "flood": 0.0})
    budget = scheduler.slo_budget(step_time, now=0.0)
    assert budget.heavy == {"flood"}
    plan = scheduler.schedule(budget)
    prefills = [(c.seq.id, c.num_tokens) for c in plan.chunks if c.seq.pending > 1]
    assert prefills[0] == ("b", 6)


def test_a_light_tenant_between_requests_keeps_the_flood_bounded_for_a_ttft_target():
    """An interactive client sends its next request soon after the last ends: for a TTFT
    target after a tenant last had work, the flood's steps stay bounded as if it were there
    (a step in progress is what its next request would wait out); past that, they are not."""
    config = SchedulerConfig(max_batched_tokens=512, max_running=100, ttft_target_s=2.0,
                             tenant_isolation=1.5)
    scheduler = Scheduler(config, PagedKVCache(CONFIG, num_blocks=400, block_size=4))
    step_time = StepTimeModel(prior=(0.05, 0.006, 0.0, 0.0, 0.0, 0.0))
    for i in range(30):
        scheduler.add(Sequence(f"a{i}", [1] * 2, SamplingParams(max_tokens=50), tenant="flood"))
    light = Sequence("b", [1] * 2, SamplingParams(max_tokens=50), tenant="light")
    scheduler.add(light)
    _execute(scheduler, scheduler.schedule())
    for seq in scheduler.running:
        seq.first_token_time = 0.0
    bounded = scheduler.slo_budget(step_time, now=10.0)
    scheduler.abort(light)  # its request ended
    between = scheduler.slo_budget(step_time, now=11.5)
    assert (between.tokens, between.decode_limit) == (bounded.tokens, bounded.decode_limit) \
        == (5, 5)  # the flood's
    alone = scheduler.slo_budget(step_time, now=12.5)
    # one tenant, past the target: every decode, in the step the TPOT target allows
    assert (alone.tokens, alone.decode_limit) == (
        step_time.inference_budget(config.tpot_target_s, 512), None)


def test_step_time_model_tells_decode_rows_from_prefill_tokens():
    """Steps whose mix of decodes and prompt tokens moves: the fit of the rows recovers each
    one's cost, and sizes the decodes a step of given seconds holds beside a prompt."""
    model = StepTimeModel()
    rng = random.Random(1)
    for _ in range(64):
        decodes, prefill = rng.randint(0, 40), rng.choice([0, rng.randint(1, 120)])
        if decodes + prefill:
            seconds = 0.02 + 3e-3 * decodes + 5e-4 * prefill + rng.uniform(0, 1e-4)
            model.observe(decodes + prefill, seconds, decode_tokens=decodes)
    assert model.rows == pytest.approx((0.02, 3e-3, 5e-4, 0.0), rel=0.05, abs=1e-3)
    assert model.predict_rows(10, 100) == pytest.approx(0.02 + 0.03 + 0.05, rel=0.05)
    assert model.decodes_within(0.1, 100) == pytest.approx(10, abs=1)


def test_step_time_model_remembers_small_steps_through_a_flood_of_large_ones():
    """Rows that cost less the more there are (a CPU's GEMMs: the second row of a step costs
    more than the tenth), a few small steps, then hundreds of a flood's steps of 8-16 rows: the
    fit still tells what one decode costs alone within 5% (from the flood's steps alone it
    is 30% off here; a light tenant's isolated steps are sized by it), and the decodes a step
    of given seconds holds are the most whose predicted time fits."""
    def seconds(decodes: int, prefill: int) -> float:
        return 0.03 + 1e-3 * decodes + 2e-4 * prefill + 0.03 * math.log(decodes + prefill)

    model, rng = StepTimeModel(), random.Random(2)
    for _ in range(16):  # a light tenant alone: its decodes and prompts
        decodes, prefill = rng.choice([(1, 0), (0, rng.randint(10, 20))])
        model.observe(decodes + prefill, seconds(decodes, prefill), decode_tokens=decodes)
    for _ in range(400):
        decodes, prefill = rng.randint(8, 16), rng.choice([0, 0, rng.randint(10, 20)])
        model.observe(decodes + prefill, seconds(decodes, prefill) + rng.uniform(0, 1e-3),
                      decode_tokens=decodes)
    assert model.predict_rows(1, 0) == pytest.approx(seconds(1, 0), rel=0.05)
    assert model.predict_rows(0, 16) == pytest.approx(seconds(0, 16), rel=0.05)
    within = model.decodes_within(0.2, 16)
    assert model.predict_rows(within, 16) <= 0.2 < model.predict_rows(within + 1, 16)
    assert model.decodes_within(model.predict_rows(0, 16) - 1e-3, 16) == 0
