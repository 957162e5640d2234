"""Which tokens run in the next step: continuous batching over the paged KV cache.

Called by the engine once per step (`schedule`), and when requests arrive (`add`), are
aborted (`abort`) or finish (`finish`). Decode tokens of running sequences come first (they
set the time per output token), then chunks of prefills (time to first token) within the
step's token budget. When the cache is full, the most recently arrived running sequence is
preempted: its blocks are freed and it recomputes from its tokens later. Waiting requests
are admitted tenant by tenant, the tenant served least recently first, so one tenant's
burst cannot starve the others.

A waiting request runs only once the engine admits it (`admit`: its adapter is loaded into a
device slot then, so a queued request holds no slot). One whose adapter is still loading is
passed over for the next; one refused a slot `max_slot_waits` steps running holds back the
requests behind it until a slot frees, so that nobody starves.
"""

from __future__ import annotations

import enum
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from cotune.engine.kv_cache import PagedKVCache
from cotune.engine.sequence import SeqState, Sequence
from cotune.engine.step_time import StepTimeModel
from cotune.engine.waiting import WaitingQueue


@dataclass
class SchedulerConfig:
    max_batched_tokens: int = 512  # tokens per step (decode + prefill), the hard cap
    max_running: int = 128  # sequences in the cache at once
    ttft_target_s: float = 2.0  # time to first token a request should get
    tpot_target_s: float = 0.25  # time per output token a running request should get
    tenant_memory: float = 0.99  # per step, how much of a tenant's served tokens is remembered
    max_slot_waits: int = 8  # steps a request refused an adapter slot lets others pass it
    # While a tenant floods, the longest step beside another tenant's few requests, as a
    # multiple of the step those requests would take alone (0: no bound, only fair shares).
    # Off by default: where a step's fixed cost is high (a CPU), short steps cost the
    # flooding tenant most of its throughput (benchmarks/README, fairness)
    tenant_isolation: float = 0.0


class Admission(enum.Enum):
    """Whether a waiting request can run now, as the engine's `admit` answers."""

    READY = "ready"  # its adapter (if any) holds a device slot for it
    LOADING = "loading"  # its adapter is still on its way from disk
    NO_SLOT = "no_slot"  # every device slot holds an adapter in use (or hot)
    FAILED = "failed"  # its adapter could not be loaded: the request ends


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens fed this step, starting at seq.computed

    @property
    def samples(self) -> bool:
        """This chunk feeds the last pending token, so the step samples the next one."""
        return self.num_tokens == self.seq.pending


@dataclass
class StepPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass(frozen=True)
class StepBudget:
    """What the SLOs allow the next step (`Scheduler.slo_budget`), for `Scheduler.schedule`."""

    tokens: int | None = None  # decode and prefill tokens at most (None: the hard cap)
    # how many decodes the step may hold when more are ready and several tenants are at work
    # (each tenant's fair share of them: `_fair_decodes`); None: all
    decode_limit: int | None = None
    tenants: int = 0  # how many are at work, when counted (0: counted when needed)
    # tenants past their fair share: their prompts take what the others' leave
    heavy: frozenset[str] = frozenset()


def _always_ready(seq: Sequence) -> Admission:
    return Admission.READY


class Scheduler:
    """`admit(seq)` is called when a waiting sequence is about to run, `release(seq)` when a
    running one is preempted (it gives back what admission took)."""

    def __init__(self, config: SchedulerConfig, cache: PagedKVCache,
                 admit: Callable[[Sequence], Admission] = _always_ready,
                 release: Callable[[Sequence], None] = lambda seq: None):
        self.config, self.cache = config, cache
        self.admit, self.release = admit, release
        self.slot_waits: Counter[Sequence] = Counter()  # steps refused a slot, in a row
        self.waiting = WaitingQueue()
        self.running: list[Sequence] = []
        self.counters: Counter[str] = Counter()  # decisions, for metrics
        self.tenant_tokens: Counter[str] = Counter()  # recent tokens served, decaying
        self._last_work: dict[str, float] = {}  # tenant -> when it last had work (slo_budget)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queues a new sequence, one that `check_fits` accepted."""
        self.waiting.append(seq)

    def check_fits(self, seq: Sequence) -> None:
        """Refuses a sequence that could never fit in the cache (safe from any thread: it
        reads only the cache's fixed size)."""
        need = -(-(len(seq.prompt_ids) + seq.params.max_tokens) // self.cache.block_size)
        if need > self.cache.num_blocks:
            capacity = self.cache.num_blocks * self.cache.block_size
            raise ValueError(
                f"request {seq.id} needs {len(seq.prompt_ids) + seq.params.max_tokens} tokens "
                f"of KV cache (prompt + max_tokens) but the whole cache holds {capacity}; "
                "shorten the prompt, lower max_tokens, or start with a larger KV cache")

    def abort(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.finish(seq)

    def finish(self, seq: Sequence) -> None:
        """Frees a sequence's cache blocks; called when it ends for any reason."""
        if seq in self.running:
            self.running.remove(seq)
        self.slot_waits.pop(seq, None)
        self.cache.free(seq.id)
        seq.state = SeqState.FINISHED

    def slo_budget(self, step_time: StepTimeModel, now: float) -> StepBudget:
        """The next step's budget, for `schedule`, from the measured step time.

        One tenant at work: while requests decode, the largest step that keeps their time per
        output token, and at least the prefill floor; past what the target allows (or with
        no decodes), the cap, which then gives the most throughput.

        Several tenants at work (decoding, or with prompts to prefill, or with requests
        within the last TTFT target: an interactive client sends its next request soon): a
        tenant past its fair share of the decodes the TPOT target allows is heavy, the others
        light. The step keeps the light tenants' work whole (their decodes and prompts, as
        they would run alone), and the heavy ones get the rest of a step no longer than
        `tenant_isolation` times the light work's own step (half of it for their prompts
        while they have some): one tenant's flood then makes its own tokens slower, not the
        few requests of another tenant. Without heavy tenants, a TPOT target the decodes
        cannot keep is kept with each tenant's fair share of them. Either way the light
        tenants' prompts are prefilled before the heavy ones' (which would otherwise come
        first whenever their tenant was served less of late)."""
        c = self.config
        cap, decodes = c.max_batched_tokens, self.decoding
        tenants = self._tenants_at_work(now)
        if not decodes:
            return StepBudget(cap)
        budget = step_time.inference_budget(c.tpot_target_s, cap)
        if len(tenants) > 1:
            limit = max(1, budget)
            isolated = self._isolated_budget(step_time, tenants, limit) \
                if c.tenant_isolation else None
            if isolated is not None:
                return isolated
            share = fair_share(limit, len(tenants))
            heavy = {tenant for tenant, count in tenants.items() if count > share}
            if heavy or budget <= decodes:
                # the prompts of tenants within their share are prefilled whole, as they
                # would be alone; those of a tenant past it wait for room its decodes leave
                return StepBudget(min(cap, limit + self.prompt_tokens(excluding=heavy)),
                                  limit, len(tenants), frozenset(heavy))
        if budget > decodes:
            floor = min(self._prefill_floor(now),
                        step_time.inference_budget(self.max_step_seconds, cap))
            return StepBudget(min(cap, max(budget, decodes + floor)))
        return StepBudget(cap)

    def _isolated_budget(self, step_time: StepTimeModel, tenants: Counter[str], limit: int
                         ) -> StepBudget | None:
        """`slo_budget`'s answer while light and heavy tenants are at work, None otherwise.
        Light: a tenant within its share of the decodes of an isolated step (one a single
        decode would take, times `tenant_isolation`); heavy: the others. The step keeps the
        light tenants' work whole, and the heavy ones get the rest of a step no longer than
        `tenant_isolation` times the light work's own, within `limit`, the TPOT target's
        decodes."""
        c = self.config
        step = c.tenant_isolation * step_time.predict_rows(1, 0)
        share = fair_share(step_time.decodes_within(step, 0), len(tenants))
        heavy = {tenant for tenant, count in tenants.items() if count > share}
        if not heavy or len(heavy) == len(tenants):
            return None
        light = sum(count for tenant, count in tenants.items() if tenant not in heavy)
        prompts = self.prompt_tokens(excluding=heavy)  # the light tenants', prefilled whole
        # light's step alone (a decode's, while it is between requests)
        alone = step_time.predict_rows(light or int(not prompts), prompts)
        isolated = step_time.decodes_within(c.tenant_isolation * alone, prompts)
        # the heavy tenants' decodes; a room their decodes leave (as their requests end)
        # goes to their prompts, so that they keep about as many requests running as it holds
        room = max(len(heavy), min(isolated, limit) - light)
        return StepBudget(min(c.max_batched_tokens, light + room + prompts), light + room,
                          len(tenants), frozenset(heavy))

    def _tenants_at_work(self, now: float) -> Counter[str]:
        """`tenant_decodes`, and (with 0) the tenants that had work within the last TTFT
        target."""
        tenants = self.tenant_decodes()
        for tenant in tenants:
            self._last_work[tenant] = now
        horizon = now - self.config.ttft_target_s
        for tenant, when in list(self._last_work.items()):
            if when < horizon:
                del self._last_work[tenant]
            else:
                tenants.setdefault(tenant, 0)
        return tenants

    def _prefill_floor(self, now: float) -> int:
        """Prefill tokens a step takes at least: of each prompt awaiting its first token
        (being prefilled, or the nearest deadlines of the queue), the share that finishes it
        within its TTFT target if every step until then takes the TPOT target. Without it, a
        TPOT budget just above the running decodes would feed a prompt a token or two a step.
        The caller bounds it by the longest step (`max_step_seconds`): prompts already late
        would otherwise ask for all of their tokens at once, and that step would hold back
        every running request."""
        c = self.config
        floor = 0
        for seq in itertools.chain(self.running, self.waiting.oldest()):
            if seq.first_token_time is None:
                left = c.ttft_target_s - (now - seq.arrival)
                steps = max(1, int(left / c.tpot_target_s))
                floor += -(-seq.pending // steps)
        return floor

    def schedule(self, budget: StepBudget = StepBudget()) -> StepPlan:
        """The chunks of the next step, within `budget` (default: the hard cap, every
        decode)."""
        cap = self.config.max_batched_tokens
        tokens = cap if budget.tokens is None else budget.tokens
        plan = StepPlan()
        tokens -= self._schedule_decodes(plan, budget.decode_limit, budget.tenants)
        self._schedule_prefills(plan, min(tokens, cap - plan.num_tokens), budget.heavy)
        self.counters["steps"] += 1
        self.counters["decode_tokens"] += sum(c.num_tokens for c in plan.chunks
                                              if c.seq.pending == 1)
        self.counters["prefill_tokens"] += sum(c.num_tokens for c in plan.chunks
                                               if c.seq.pending > 1)
        for tenant in list(self.tenant_tokens):
            self.tenant_tokens[tenant] *= self.config.tenant_memory
        for chunk in plan.chunks:
            self.tenant_tokens[chunk.seq.tenant] += chunk.num_tokens
        return plan

    @property
    def max_step_seconds(self) -> float:
        """The longest any step may take: half the TTFT target."""
        return self.config.ttft_target_s / 2

    def step_seconds(self, now: float) -> float:
        """The longest the next step may take with every request still on its SLOs. A
        decoding request keeps the mean time per output token it has had within the TPOT
        target: what earlier, shorter steps saved may be spent now. A request without its
        first token keeps half of what is left of its TTFT target for the steps after this
        one. And no step takes over half the TTFT target: a request that arrives meanwhile
        waits it out. Negative when a request is already late."""
        c = self.config
        limit = self.max_step_seconds
        for seq in itertools.chain(self.running, self.waiting.oldest()):
            if seq.first_token_time is None:
                limit = min(limit, (c.ttft_target_s - (now - seq.arrival)) / 2)
            else:
                limit = min(limit, c.tpot_target_s * len(seq.output_ids)
                            - (now - seq.first_token_time))
        return limit

    @property
    def decoding(self) -> int:
        """Running sequences waiting for their next token (TPOT bounds their steps)."""
        return sum(s.pending == 1 for s in self.running)

    def tenant_decodes(self) -> Counter[str]:
        """Each tenant with requests running or waiting: how many of its running sequences
        wait for their next token (0 for a tenant whose requests all await their first)."""
        decodes = Counter({tenant: 0 for tenant in self.waiting.tenants()})
        decodes.update({s.tenant: 0 for s in self.running})
        decodes.update(s.tenant for s in self.running if s.pending == 1)
        return decodes

    def prompt_tokens(self, excluding: set[str]) -> int:
        """Prompt tokens still to prefill, of every tenant but those `excluding`."""
        return sum(s.pending for s in itertools.chain(self.running, self.waiting)
                   if s.first_token_time is None and s.tenant not in excluding)

    def _schedule_decodes(self, plan: StepPlan, limit: int | None, tenants: int) -> int:
        """Every running sequence's next token, within the hard cap; past `limit` decodes,
        each tenant's fair share of them. A running request is never paused for a new one,
        only for another tenant's share."""
        used, cap = 0, self.config.max_batched_tokens
        ready = [s for s in self.running if s.state is SeqState.RUNNING and s.pending == 1]
        if limit is not None and len(ready) > limit:
            ready = _fair_decodes(ready, limit, tenants or len(self.tenant_decodes()))
        for seq in ready:
            if seq.state is not SeqState.RUNNING or used >= cap:  # preempted meanwhile
                continue
            while not self.cache.reserve(seq.id, 1):
                victim = self.running[-1]
                self._preempt(victim, plan)
                if victim is seq:
                    break
            else:
                plan.chunks.append(ScheduledChunk(seq, 1))
                used += 1
        return used

    def _schedule_prefills(self, plan: StepPlan, budget: int, heavy: frozenset[str]) -> None:
        """Prompts within `budget`: those of the tenants not `heavy` first, then the heavy
        ones'. Of each, sequences already running with a partial prefill continue first (the
        tenant served least recently first), then new ones are admitted."""
        partial = sorted((s for s in self.running if s.pending > 1),
                         key=lambda s: self.tenant_tokens[s.tenant])
        groups = [lambda t: t not in heavy, lambda t: t in heavy] if heavy else [lambda t: True]
        for group in groups:
            for seq in partial:
                if budget > 0 and group(seq.tenant):
                    chunk = self._reserve_chunk(seq, budget)
                    if chunk:
                        plan.chunks.append(ScheduledChunk(seq, chunk))
                        budget -= chunk
            budget = self._admit_prefills(plan, budget, group)
            if budget is None:
                return

    def _admit_prefills(self, plan: StepPlan, budget: int, group: Callable[[str], bool]
                        ) -> int | None:
        """Admits waiting requests of the tenants in `group` (the tenant served least recently
        first, each one's oldest first) with a first chunk each, within `budget`: what is
        left of it, or None when no request behind may pass (a full cache, or one that waited
        too long for an adapter slot)."""
        for seq in self.waiting.in_admission_order(self.tenant_tokens, group):
            if budget <= 0:
                return budget
            if len(self.running) >= self.config.max_running:
                return None
            chunk = self._reserve_chunk(seq, budget)
            if not chunk:
                return None
            verdict = self.admit(seq)
            if verdict is not Admission.READY:
                self.cache.free(seq.id)
                self.counters[f"admission_{verdict.value}"] += 1
                if verdict is Admission.FAILED:
                    self.waiting.remove(seq)
                    self.finish(seq)
                elif verdict is Admission.NO_SLOT:
                    self.slot_waits[seq] += 1
                    if self.slot_waits[seq] > self.config.max_slot_waits:
                        return None  # the running adapters drain until a slot frees for it
                continue
            self.slot_waits.pop(seq, None)
            self.waiting.remove(seq)
            seq.state = SeqState.RUNNING
            self.running.append(seq)
            plan.chunks.append(ScheduledChunk(seq, chunk))
            budget -= chunk
        return budget

    def _reserve_chunk(self, seq: Sequence, budget: int) -> int:
        """The largest chunk of seq's pending tokens, up to `budget`, that the cache can take."""
        chunk = min(seq.pending, budget)
        room = self.cache.free_blocks * self.cache.block_size + self._slack(seq)
        chunk = min(chunk, room)
        if chunk <= 0 or not self.cache.reserve(seq.id, chunk):
            return 0
        return chunk

    def _slack(self, seq: Sequence) -> int:
        """Free token rows left in the last block the sequence already holds."""
        held = len(self.cache.tables.get(seq.id, ())) * self.cache.block_size
        return held - self.cache.lengths.get(seq.id, 0)

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        """Frees a running sequence's blocks; it recomputes its tokens when readmitted."""
        self.running.remove(seq)
        self.release(seq)
        plan.chunks = [c for c in plan.chunks if c.seq is not seq]
        self.cache.free(seq.id)
        seq.computed = 0
        seq.state = SeqState.WAITING
        seq.preemptions += 1
        self.waiting.put_back(seq)
        plan.preempted.append(seq)
        self.counters["preemptions"] += 1


def fair_share(limit: int, tenants: int) -> int:
    """Each tenant's share of a step's `limit` decodes: at least one."""
    return max(1, limit // tenants)


def _fair_decodes(ready: list[Sequence], limit: int, active: int) -> list[Sequence]:
    """`limit` of the `ready` decodes (or more: every tenant gets at least one), shared
    fairly between the `active` tenants (those with work, decoding or not): a tenant with no
    more than its share (limit / active) decodes
    all of its requests; the others split the rest evenly, each one's requests that waited
    longest for a token first. One tenant's flood of requests then makes its own tokens
    slower, not the steps of a tenant with a few (what S-LoRA's virtual token counters do
    at admission, done at every step)."""
    tenants: dict[str, list[Sequence]] = {}
    for seq in ready:
        tenants.setdefault(seq.tenant, []).append(seq)
    if active < 2:
        return ready
    share = fair_share(limit, active)
    chosen = [s for seqs in tenants.values() if len(seqs) <= share for s in seqs]
    over = [sorted(seqs, key=lambda s: s.last_token_time or 0.0)
            for seqs in tenants.values() if len(seqs) > share]
    room = max(limit - len(chosen), len(over))
    taken = [0] * len(over)
    while room > 0 and any(n < len(seqs) for n, seqs in zip(taken, over)):
        for i, seqs in enumerate(over):  # one each in turn
            if room > 0 and taken[i] < len(seqs):
                taken[i] += 1
                room -= 1
    return chosen + [s for n, seqs in zip(taken, over) for s in seqs[:n]]
