"""Which adapter occupies which device slot of the base model's LoRA pools: the device tier,
over the host tier (`HostCache`) and the store on disk."""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import nullcontext
from pathlib import Path

import torch

from cotune.adapters.host_cache import HostCache
from cotune.adapters.peft_format import AdapterError, LoraAdapter
from cotune.model.llama import CausalLM
from cotune.model.targets import LORA_TARGETS

DEFAULT_HOST_CACHE_BYTES = 1 << 30


class ResidentAdapters:
    """Loads PEFT adapters into the slot pools of every VirtualizedLinear of `model`.

    A load is validated completely before any slot is written, so a refused adapter leaves
    the pools and the table of resident adapters exactly as they were. Adapters in use by a
    request are pinned (`acquire` or `try_acquire`, then `release`) and never evicted. When
    the pool is full, the least recently used unpinned adapter makes room, except the hot
    ones: the `hot_share` of the slots held by the adapters with the most recent traffic
    (two or more of the last `history` acquisitions), so that a scan over many cold adapters
    cannot evict them.
    """

    def __init__(self, model: CausalLM, num_slots: int, max_rank: int,
                 targets: tuple[str, ...] = LORA_TARGETS,
                 host_cache_bytes: int = DEFAULT_HOST_CACHE_BYTES, hot_share: float = 0.25,
                 history: int | None = None):
        if not 0 <= hot_share < 1:
            raise ValueError(f"hot_share must be in [0, 1), got {hot_share}: some slots must "
                             "stay open to adapters that are not hot")
        self.max_rank = max_rank
        self.modules = model.lora_modules(targets)
        for module in self.modules.values():
            module.allocate_slots(num_slots, max_rank)
        self.base_modules = {name: (m.in_features, m.out_features)
                             for name, m in self.modules.items()}
        device = next(iter(self.modules.values())).weight.device if self.modules else None
        cuda = device is not None and device.type == "cuda"
        self.host = HostCache(self.base_modules, max_rank, host_cache_bytes, pin_memory=cuda)
        # Host->device copies on a stream of their own, overlapping the compute stream's work.
        self._copy_stream = torch.cuda.Stream(device) if cuda else None
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._pins: Counter[str] = Counter()
        self._retired: set[str] = set()  # evicted once their last pin is released
        # A free slot serves nothing (rank 0 in every module) but may keep the weights of its
        # last adapter, in the modules `_held` names, until an adapter is placed there.
        self._free = list(range(num_slots))
        self._held: dict[int, tuple[str, ...]] = {}  # slot -> modules its (last) adapter wrote
        self.num_hot = int(num_slots * hot_share)
        self._recent: deque[str] = deque(maxlen=history or 8 * num_slots)
        self._traffic: Counter[str] = Counter()  # acquisitions per key among `_recent`
        # Called as on_load(seconds) after an adapter was copied from host memory into a slot,
        # on_evict() after an eviction: the server's metrics.
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

    def prefetch(self, key: str, path: str | Path) -> Future:
        """Starts the adapter's disk->host load (called when its request is queued)."""
        return self.host.fetch(key, path)

    def try_acquire(self, key: str, load: Future) -> int | None:
        """Called at admission: makes the adapter resident and pins it until `release`;
        returns its slot, or None while its host load (`load`, from `prefetch`) is under way
        or while no slot can be freed. The AdapterError of a failed load is raised."""
        slot = self._slot_of.get(key)
        if slot is None:
            if not load.done():
                return None
            adapter = load.result()
            if self._evictable() is None and not self._free:
                return None
            slot = self.place(key, adapter)
        self._slot_of.move_to_end(key)
        self._pins[key] += 1
        self._count_traffic(key)
        return slot

    def acquire(self, key: str, path: str | Path) -> int:
        """Makes the adapter resident now, waiting for its load, and pins it until `release`."""
        load = self.prefetch(key, path)
        load.result()
        slot = self.try_acquire(key, load)
        if slot is None:
            raise self._no_slot(key)
        return slot

    def release(self, key: str) -> None:
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]
            if key in self._retired:
                self._retired.discard(key)
                self.evict(key)

    def retire(self, key: str) -> None:
        """Lets go of an adapter no new request will use (an RL session's weights that a
        newer version replaced): its slot is freed now, or once the requests that pin it
        have released it."""
        if key not in self._slot_of:
            return
        if self._pins[key]:
            self._retired.add(key)
        else:
            self.evict(key)

    def load(self, key: str, path: str | Path) -> int:
        """Makes the PEFT adapter at `path` resident under `key`, unpinned; returns its slot."""
        if key in self._slot_of:
            self._slot_of.move_to_end(key)
            return self._slot_of[key]
        return self.place(key, self.prefetch(key, path).result())

    def place(self, key: str, adapter: LoraAdapter) -> int:
        """Writes an adapter into a free slot (evicting one if need be); returns the slot.
        Everything is checked before the first write, so a refusal changes nothing."""
        started = time.perf_counter()
        self._check_fits(key, adapter)
        gains = self._dora_gains(key, adapter)
        if not self._free:
            idle = self._evictable()
            if idle is None:
                raise self._no_slot(key)
            self.evict(idle)
        slot = min(self._free)  # low slots first: the adapters of a step then tend to sit
        self._free.remove(slot)  # side by side, which the LoRA ops read without a gather
        self._write(slot, adapter, gains)
        self._slot_of[key] = slot
        if self.on_load is not None:
            self.on_load(time.perf_counter() - started)
        return slot

    def evict(self, key: str) -> None:
        slot = self._slot_of.pop(key)
        for name in self._held[slot]:  # cleared only if the next adapter does not write them
            self.modules[name].release_slot(slot)
        self._free.append(slot)
        if self.on_evict is not None:
            self.on_evict()

    def hot(self) -> set[str]:
        """The adapters whose slots a cold one may not take."""
        return {k for k, n in self._traffic.most_common(self.num_hot) if n >= 2}

    def _evictable(self) -> str | None:
        """The least recently used adapter that is neither pinned nor hot, if any."""
        hot = self.hot()
        return next((k for k in self._slot_of if not self._pins[k] and k not in hot), None)

    def _count_traffic(self, key: str) -> None:
        if len(self._recent) == self._recent.maxlen:
            old = self._recent[0]
            self._traffic[old] -= 1
            if not self._traffic[old]:
                del self._traffic[old]
        self._recent.append(key)
        self._traffic[key] += 1

    def _dora_gains(self, key: str, adapter: LoraAdapter) -> dict[str, torch.Tensor]:
        """The gains of a DoRA adapter's modules on this base (VirtualizedLinear.dora_gains),
        worked out before any slot is written."""
        gains = {}
        for name, lora in adapter.modules.items():
            if lora.magnitude is not None:
                try:
                    gains[name] = self.modules[name].dora_gains(lora.a, lora.b, lora.scale,
                                                                lora.magnitude)
                except ValueError as e:
                    raise AdapterError(f"adapter {key!r}: {e}") from None
        return gains

    def _write(self, slot: int, adapter: LoraAdapter, gains: dict[str, torch.Tensor]) -> None:
        """Host->device: on CUDA, asynchronous copies from pinned memory on the copy stream,
        which the compute stream then waits for (the slot is used by the next forward)."""
        stream = self._copy_stream
        with torch.no_grad(), (nullcontext() if stream is None else torch.cuda.stream(stream)):
            for name, lora in adapter.modules.items():
                module = self.modules[name]
                a = lora.a.to(module.a_pool.device, non_blocking=True)
                b = lora.b.to(module.b_pool.device, non_blocking=True)
                module.load_slot(slot, a, b, lora.scale, gains.get(name))
            for name in self._held.get(slot, ()):  # what the slot's last adapter left there
                if name not in adapter.modules:
                    self.modules[name].clear_slot(slot)
        self._held[slot] = tuple(adapter.modules)
        if stream is not None:
            torch.cuda.current_stream(stream.device).wait_stream(stream)

    def _no_slot(self, key: str) -> AdapterError:
        return AdapterError(
            f"no free adapter slot for {key!r}: all {len(self._slot_of)} slots hold adapters "
            f"in use or hot ({len(self.hot())} hot); retry later or start with more slots")

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
            if not abs(lora.scale) <= torch.finfo(torch.float32).max:  # the slots' scales
                raise AdapterError(f"adapter {key!r}, module {name!r}: scale {lora.scale} is "
                                   "not a float32 number; accepted: a finite scale (lora_alpha "
                                   "over the rank) within float32's range")
