"""MergeAdapters: a new version that merges weighted versions of the caller's adapters
(`cotune.adapters.merging`), published through the registry as every other version is.

The merge is computed on the calling gRPC thread, never the engine's: the engine goes on
serving while it runs (an svd of a large module takes seconds). One merge runs at a time per
server (MAX_MERGES): each holds its parents and their deltas in memory, so another is refused
with RESOURCE_EXHAUSTED at once rather than queued behind it on a thread of the pool.
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc

from cotune.adapters.merging import IncompatibleParents, MergeSpec, merge_adapters, plan_merge
from cotune.adapters.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterMismatch,
    load_peft_adapter,
    save_peft_adapter,
)
from cotune.adapters.registry import Registry, Repeated, VersionRecord
from cotune.server.errors import RpcError
from cotune.server.idempotency import idempotency
from cotune.server.names import parse_reference, reference
from cotune.server.uploads import Staging

MAX_MERGES = 1  # at once on a server


class Merges:
    def __init__(self, registry: Registry, staging: Staging,
                 base_modules: dict[str, tuple[int, int]], max_rank: int, max_bytes: int):
        self.registry, self.staging = registry, staging
        self.base_modules, self.max_rank, self.max_bytes = base_modules, max_rank, max_bytes
        self._running = threading.BoundedSemaphore(MAX_MERGES)

    def merge(self, tenant: str, request) -> VersionRecord:
        """Publishes the merge `request` (a MergeAdaptersRequest) asks for as the next version
        of its adapter; refuses it before anything is written."""
        name, _ = parse_reference(request.name, allow_version=False)
        spec = MergeSpec(
            method=request.method, weights=tuple(p.weight for p in request.parents),
            density=request.density or None,
            majority_sign_method=request.majority_sign_method or "total",
            svd_rank=request.svd_rank or None, seed=request.seed)
        spec.check()  # a bad request is refused before any parent is read
        references = [parse_reference(p.adapter) for p in request.parents]
        retry = idempotency(request.idempotency_key, request)
        if retry is not None and (earlier := self.registry.repeated(
                tenant, "MergeAdapters", retry)) is not None:
            return earlier  # a retry: nothing to merge
        if not self._running.acquire(blocking=False):
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"another merge is running on this server (it runs {MAX_MERGES} at "
                           "a time); retry in a few seconds")
        try:
            # NotFound for another tenant's adapter, exactly as for a missing one
            records = [self.registry.get_version(tenant, n, v) for n, v in references]
            return self._publish(tenant, name, records, spec, request, retry)
        finally:
            self._running.release()

    def _publish(self, tenant: str, name: str, records: list[VersionRecord], spec: MergeSpec,
                 request, retry) -> VersionRecord:
        names = [reference(r.name, r.version) for r in records]
        base = _common_base(records, names)
        parents = [load_peft_adapter(self.registry.version_dir(r), self.base_modules,
                                     self.max_rank) for r in records]
        plan = plan_merge(parents, spec, names)
        if plan.rank > self.max_rank:
            raise AdapterMismatch(
                f"the merge would have rank {plan.rank} ({plan.spec.method}), which exceeds "
                f"max_rank {self.max_rank} of this server; accepted: a merged rank of at most "
                f"{self.max_rank} (a lower svd_rank, fewer parents with cat), or a server "
                f"started with --max-rank {plan.rank}")
        merged = merge_adapters(parents, spec, order=list(self.base_modules), names=names)
        parameters = plan.spec.parameters()
        if "svd_rank" in parameters:
            parameters["svd_rank"] = plan.rank
        if plan.spec.method != spec.method:
            parameters["requested_method"] = spec.method  # one parent: linear, as in PEFT
        provenance = {
            "source": "merge", "base_fingerprint": base, "hyperparameters": parameters,
            "parents": [{"adapter": f"{tenant}/{n}", "weight": w}
                        for n, w in zip(names, spec.weights, strict=True)]}
        with self.staging.directory() as staged:
            files = staged / "merged"
            save_peft_adapter(merged, files)
            # read back by the code that serves it (a delta past its bound is refused here)
            load_peft_adapter(files, self.base_modules, self.max_rank)
            self._check_size(files)
            try:
                return self.registry.publish_version(
                    tenant, name, files, provenance, description=request.description or None,
                    labels=dict(request.labels) or None, idempotency=retry,
                    call="MergeAdapters")
            except Repeated as repeated:  # the first call with the key committed meanwhile
                return repeated.earlier

    def _check_size(self, files: Path) -> None:
        size = sum((files / f).stat().st_size for f in (CONFIG_NAME, WEIGHTS_NAME))
        if size > self.max_bytes:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"the merged adapter has {size} bytes, more than the "
                           f"{self.max_bytes} an adapter version may have on this server "
                           "(--max-upload-mb); accepted: a smaller merge (a lower svd_rank, "
                           "fewer parents with cat)")


def _common_base(records: list[VersionRecord], names: list[str]) -> str:
    """The base fingerprint the parents were trained on ("" where none records one); refuses
    parents of different bases."""
    known = {n: r.provenance.get("base_fingerprint") for n, r in zip(names, records, strict=True)
             if r.provenance.get("base_fingerprint")}
    if len(set(known.values())) > 1:
        shown = ", ".join(f"{n} on {fp[:16]}" for n, fp in known.items())
        raise IncompatibleParents(
            f"the parents were trained on different base models ({shown}); accepted: "
            "parents of one base (a version without a recorded base goes with any)")
    return next(iter(known.values()), "")
