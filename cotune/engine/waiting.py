"""The requests waiting to run, kept in the order the scheduler admits them, so that a step
never sorts or scans the whole queue: preempted requests first (they already waited), then
tenant by tenant, each tenant's requests in the order they arrived."""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from collections.abc import Callable, Iterator

from cotune.engine.sequence import Sequence


class WaitingQueue:
    def __init__(self):
        self._preempted: deque[Sequence] = deque()
        self._tenants: dict[str, deque[Sequence]] = {}  # each in arrival order
        self._members: set[Sequence] = set()

    def __len__(self) -> int:
        return len(self._members)

    def __bool__(self) -> bool:
        return bool(self._members)

    def __contains__(self, seq: Sequence) -> bool:
        return seq in self._members

    def __iter__(self) -> Iterator[Sequence]:
        return itertools.chain(self._preempted, *self._tenants.values())

    def tenants(self) -> set[str]:
        """The tenants with requests waiting."""
        return {s.tenant for s in self._preempted} | set(self._tenants)

    def append(self, seq: Sequence) -> None:
        """A new request, behind its tenant's earlier ones."""
        self._tenants.setdefault(seq.tenant, deque()).append(seq)
        self._members.add(seq)

    def put_back(self, seq: Sequence) -> None:
        """A preempted request, ahead of every request that has not run yet."""
        self._preempted.appendleft(seq)
        self._members.add(seq)

    def remove(self, seq: Sequence) -> None:
        self._members.remove(seq)
        if seq in self._preempted:
            self._preempted.remove(seq)
            return
        queue = self._tenants[seq.tenant]
        queue.remove(seq)
        if not queue:
            del self._tenants[seq.tenant]

    def in_admission_order(self, served: Counter[str],
                           include: Callable[[str], bool] = lambda tenant: True
                           ) -> Iterator[Sequence]:
        """The requests of the tenants `include` accepts: preempted ones first, then the
        tenant served least recently (`served`: its recent tokens) first, each tenant's
        oldest request first. The caller may remove the request it was given before taking
        the next."""
        yield from sorted((s for s in self._preempted if include(s.tenant)),
                          key=lambda s: (served[s.tenant], s.arrival))
        by_served = sorted((t for t in self._tenants if include(t)), key=lambda t: served[t])
        for _, tied in itertools.groupby(by_served, key=lambda t: served[t]):
            # copies: the caller removes what it admits
            yield from heapq.merge(*(tuple(self._tenants[t]) for t in tied),
                                   key=lambda s: s.arrival)

    def oldest(self) -> Iterator[Sequence]:
        """The preempted requests and each tenant's oldest: among them, every deadline of the
        queue that is nearest."""
        yield from self._preempted
        for queue in self._tenants.values():
            yield queue[0]
