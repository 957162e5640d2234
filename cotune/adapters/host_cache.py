"""The host tier of adapters: parsed PEFT adapters in CPU memory, between the store on disk
and the device slots, least recently used first out, bounded in bytes.

Called by the engine when a request is queued (`fetch`: the disk->host load starts then, on
a loader thread, and overlaps the engine's steps) and when a job publishes a version (`put`).
The device tier (`ResidentAdapters`) copies from here into a slot at admission.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from cotune.adapters.peft_format import LoraAdapter, LoraModule, load_peft_adapter


def adapter_bytes(adapter: LoraAdapter) -> int:
    return sum(t.numel() * t.element_size() for m in adapter.modules.values()
               for t in (m.a, m.b, m.magnitude) if t is not None)


class HostCache:
    """Adapters read from disk, keyed like the slots (`tenant/name@vK`: a key's content never
    changes). A load that fails is not remembered: the next request for the key reads the
    file again and gets the same error, with the same message as a direct read.

    A request's load is held by its own future until the request ends, so an adapter evicted
    from here while its request waits is not read twice; the bound applies to what is cached
    for requests to come.
    """

    def __init__(self, base_modules: Mapping[str, tuple[int, int]], max_rank: int,
                 capacity_bytes: int, pin_memory: bool = False, loader_threads: int = 1):
        if capacity_bytes < 0:
            raise ValueError(f"host cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self.base_modules, self.max_rank = base_modules, max_rank
        self.capacity_bytes = capacity_bytes
        # Pinned pages let host->device copies run asynchronously (CUDA only).
        self.pin_memory = pin_memory
        self._entries: OrderedDict[str, LoraAdapter] = OrderedDict()  # least recently used first
        self._sizes: dict[str, int] = {}
        self.size_bytes = 0
        self._loading: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(loader_threads, thread_name_prefix="adapter-load")
        self.loads = self.evictions = 0  # disk reads that succeeded; adapters dropped
        # Called as on_load(seconds) after an adapter was read from disk: the server's metrics.
        self.on_load: Callable[[float], None] | None = None

    @property
    def num_adapters(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def fetch(self, key: str, path: str | Path) -> Future:
        """A future of the adapter: done at once when it is in host memory, else a load from
        `path` on the loader thread (one load per key at a time). Its result raises the
        AdapterError of an invalid file."""
        with self._lock:
            adapter = self._entries.get(key)
            if adapter is not None:
                self._entries.move_to_end(key)
                future = Future()
                future.set_result(adapter)
                return future
            future = self._loading.get(key)
            if future is None:
                future = self._loading[key] = self._loader.submit(self._load, key, Path(path))
            return future

    def put(self, key: str, adapter: LoraAdapter) -> None:
        """Caches an adapter that did not come from disk (a version a job just published)."""
        with self._lock:
            self._insert(key, self._on_host(adapter))

    def _load(self, key: str, path: Path) -> LoraAdapter:
        started = time.perf_counter()
        try:
            adapter = self._on_host(load_peft_adapter(path, self.base_modules, self.max_rank))
        except BaseException:
            with self._lock:
                del self._loading[key]
            raise
        with self._lock:
            del self._loading[key]
            self._insert(key, adapter)
            self.loads += 1
        if self.on_load is not None:
            self.on_load(time.perf_counter() - started)
        return adapter

    def _insert(self, key: str, adapter: LoraAdapter) -> None:
        size = adapter_bytes(adapter)
        if size > self.capacity_bytes:
            return  # larger than the whole cache: its request's future still holds it
        if key in self._entries:
            self._drop(key)
        self._entries[key], self._sizes[key] = adapter, size
        self.size_bytes += size
        while self.size_bytes > self.capacity_bytes:
            self._drop(next(iter(self._entries)))
            self.evictions += 1

    def _drop(self, key: str) -> None:
        del self._entries[key]
        self.size_bytes -= self._sizes.pop(key)

    def _on_host(self, adapter: LoraAdapter) -> LoraAdapter:
        """The adapter in CPU memory (a job's versions come from the device), pinned if asked."""
        def host(t):
            return t.cpu().pin_memory() if self.pin_memory else t.cpu()

        return LoraAdapter({name: LoraModule(host(m.a), host(m.b), m.scale,
                                             None if m.magnitude is None else host(m.magnitude))
                            for name, m in adapter.modules.items()}, adapter.config)
