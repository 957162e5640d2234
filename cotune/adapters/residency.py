"""Which adapter occupies which device slot of the base model's LoRA pools."""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path

from cotune.adapters.peft_format import AdapterError, LoraAdapter, load_peft_adapter
from cotune.model.llama import LORA_TARGETS, CausalLM


class ResidentAdapters:
    """Loads PEFT adapters into the slot pools of every VirtualizedLinear of `model`.

    A load is validated completely before any slot is written, so a refused adapter leaves
    the pools and the table of resident adapters exactly as they were. Adapters in use by a
    request are pinned (`acquire` / `release`); when the pool is full, the least recently
    used unpinned adapter makes room.
    """

    def __init__(self, model: CausalLM, num_slots: int, max_rank: int,
                 targets: tuple[str, ...] = LORA_TARGETS):
        self.max_rank = max_rank
        self.modules = model.lora_modules(targets)
        for module in self.modules.values():
            module.allocate_slots(num_slots, max_rank)
        self.base_modules = {name: (m.in_features, m.out_features)
                             for name, m in self.modules.items()}
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._pins: Counter[str] = Counter()
        self._free = list(range(num_slots))
        # Called as on_load(seconds) after an adapter is placed in a slot (read from disk, or
        # handed over by a job), on_evict() after an eviction: the server's metrics.
        self.on_load: Callable[[float], None] | None = None
        self.on_evict: Callable[[], None] | None = None

    @property
    def num_slots(self) -> int:
        return len(self._free) + len(self._slot_of)

    @property
    def num_resident(self) -> int:
        return len(self._slot_of)

    def slot_of(self, key: str) -> int | None:
        return self._slot_of.get(key)

    def acquire(self, key: str, path: str | Path) -> int:
        """Makes the adapter resident and pins it until `release`; returns its slot."""
        slot = self.load(key, path)
        self._pins[key] += 1
        return slot

    def release(self, key: str) -> None:
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]

    def load(self, key: str, path: str | Path) -> int:
        """Makes the PEFT adapter at `path` resident under `key`; returns its slot."""
        if key in self._slot_of:
            self._slot_of.move_to_end(key)
            return self._slot_of[key]
        started = time.perf_counter()
        adapter = load_peft_adapter(path, self.base_modules, self.max_rank)
        return self.place(key, adapter, started)

    def place(self, key: str, adapter: LoraAdapter, started: float | None = None) -> int:
        """Writes an adapter into a free slot; returns the slot. Everything is checked before
        the first write, so a refusal changes nothing. `started`: when its load began (a
        perf_counter time), for the load time reported."""
        started = time.perf_counter() if started is None else started
        self._check_fits(key, adapter)
        if not self._free:
            idle = next((k for k in self._slot_of if not self._pins[k]), None)
            if idle is None:
                raise AdapterError(
                    f"no free adapter slot for {key!r}: all {len(self._slot_of)} slots hold "
                    "adapters in use; retry later or start with more slots")
            self.evict(idle)
        slot = min(self._free)  # low slots first: the adapters of a step then tend to sit
        self._free.remove(slot)  # side by side, which the LoRA ops read without a gather
        for name, module in self.modules.items():
            lora = adapter.modules.get(name)
            if lora is None:
                module.clear_slot(slot)
            else:
                module.load_slot(slot, lora.a, lora.b, lora.scale)
        self._slot_of[key] = slot
        if self.on_load is not None:
            self.on_load(time.perf_counter() - started)
        return slot

    def _check_fits(self, key: str, adapter: LoraAdapter) -> None:
        for name, lora in adapter.modules.items():
            if name not in self.modules:
                raise AdapterError(f"adapter {key!r} targets {name!r}, which carries no LoRA pool "
                                   f"here; pools exist for {len(self.modules)} modules such as "
                                   f"{next(iter(self.modules), 'none')!r}")
            d_in, d_out = self.base_modules[name]
            rank = lora.a.shape[0]
            if lora.a.shape != (rank, d_in) or lora.b.shape != (d_out, rank):
                raise AdapterError(f"adapter {key!r}, module {name!r}: A {tuple(lora.a.shape)} "
                                   f"and B {tuple(lora.b.shape)} do not fit ({d_in} -> {d_out})")
            if rank > self.max_rank:
                raise AdapterError(f"adapter {key!r}: rank {rank} exceeds max_rank "
                                   f"{self.max_rank}; lower the rank or raise --max-rank")

    def evict(self, key: str) -> None:
        slot = self._slot_of.pop(key)
        for module in self.modules.values():
            module.clear_slot(slot)
        self._free.append(slot)
        if self.on_evict is not None:
            self.on_evict()
