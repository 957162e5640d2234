"""The ranks of a sharded base step in lockstep.

Every collective of a step (the all-gather of a layer's partitions) must be entered by every
rank in the same order, yet each rank runs its own engine over its own requests and jobs. So
each model pass is a *round* the ranks agree on first: a rank about to run a forward pass (or
the backward of one) announces it, and a rank with nothing to do joins the round by
gathering the same layers in the same order without computing (`mirror`). A step ends when
every rank is idle; then the jobs that span ranks take their optimizer steps together.

    engine step                          ranks
    begin_step()                         gather the head (embeddings, final norm, lm_head)
    forward    -> round(FORWARD)         gather layer 0, 1, ... once each
    backward   -> round(BACKWARD)        gather layer L-1, ..., 0 once each (recompute)
    end_step() -> rounds until all idle, synced optimizer steps, release the head
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

FORWARD, BACKWARD, IDLE = 0, 1, 2
MAX_SPANNING_JOBS = 16  # jobs spanning ranks at once; their readiness is one fixed vector


class LockstepError(RuntimeError):
    """The ranks disagree on the step's protocol (a bug, never a user error)."""


class Lockstep:
    """The step protocol of one rank. `mirror(op)` gathers and releases the layers as a pass
    of kind `op` would; `gather_head()` returns a context holding the head gathered."""

    def __init__(self, mirror: Callable[[int], None], gather_head: Callable[[], object]):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        # NCCL reduces only tensors on the device; gloo those on the host
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
        self._mirror, self._gather_head = mirror, gather_head
        self._head = None
        self._spanning: dict[int, object] = {}  # slot -> Trainer

    def agree(self, has_work: bool, closing: bool) -> tuple[bool, bool]:
        """Called by every rank between steps: (whether any rank has work, whether any rank
        is closing). The runtime steps all ranks when any has work, and stops all of them
        when any stops: a sharded base serves as one."""
        flags = torch.tensor([int(has_work), int(closing)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def begin_step(self) -> None:
        self._head = self._gather_head()
        self._head.__enter__()

    def round(self, op: int) -> None:
        """Called by the model before a pass of kind `op` (FORWARD or BACKWARD)."""
        self._join(op)

    def end_step(self, engine) -> None:
        """Joins the other ranks' passes until every rank is idle, then takes the optimizer
        steps of the spanning jobs that every rank has finished its share of."""
        self._idle_rounds()
        for trainer in self._ready_spanning(engine):
            trainer.synced_optimizer_step(self._sum)
            engine.after_optimizer_step(trainer)  # a checkpoint's evaluation runs forwards
            self._idle_rounds()
        self._head.__exit__(None, None, None)
        self._head = None

    def register_spanning(self, trainer) -> int:
        """A job that spans ranks, created on every rank in the same order: its slot."""
        free = [s for s in range(MAX_SPANNING_JOBS) if s not in self._spanning]
        if not free:
            raise ValueError(f"at most {MAX_SPANNING_JOBS} jobs span the ranks at once; wait "
                             "for one to end or run the job on one rank")
        self._spanning[free[0]] = trainer
        return free[0]

    def _ready_spanning(self, engine) -> list:
        """Spanning jobs whose optimizer step every rank awaits (collective: all ranks)."""
        for slot, trainer in list(self._spanning.items()):
            if trainer not in engine.trainers:  # ended on this rank
                del self._spanning[slot]
        ready = torch.zeros(MAX_SPANNING_JOBS, dtype=torch.int64, device=self.device)
        for slot, trainer in self._spanning.items():
            ready[slot] = int(trainer.awaiting_ranks)
        dist.all_reduce(ready, op=dist.ReduceOp.MIN)
        return [self._spanning[int(s)] for s in ready.cpu().nonzero().flatten()]

    def _idle_rounds(self) -> None:
        while True:
            counts = self._join(IDLE)
            if counts[IDLE] == self.world_size:
                return
            self._mirror(FORWARD if counts[FORWARD] else BACKWARD)

    def _join(self, op: int) -> list[int]:
        """Ranks entering a round of each kind (FORWARD, BACKWARD, IDLE), this one as `op`."""
        counts = torch.zeros(3, dtype=torch.int64, device=self.device)
        counts[op] = 1
        dist.all_reduce(counts)
        counts = counts.tolist()
        if counts[FORWARD] and counts[BACKWARD]:
            raise LockstepError(f"rank {self.rank}: ranks entered a forward and a backward "
                                f"pass in the same round ({counts})")
        return counts

    @staticmethod
    def _sum(tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor)
