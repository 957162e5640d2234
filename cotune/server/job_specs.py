"""What a fine-tuning job is asked to do, from the fields its record keeps: its FinetuneSpec, and
for a job that continues a version of its adapter, the fields merged with that version's."""

from __future__ import annotations

from pathlib import Path

from cotune.adapters.registry import VersionRecord
from cotune.engine.finetune_spec import FinetuneSpec, LoraSettings, OptimizerSettings, SpecError
from cotune.server.names import reference


def spec_of(adapter: str, fields: dict, job_dir: Path, tenant: str) -> FinetuneSpec:
    """The FinetuneSpec of a job from its fields (checked here: SpecError): those a client
    gave, or for a job that continues a version (`parent_version`) those merged with the
    version's by `continued_fields`; it starts from the version's weights, copied into
    `job_dir / "parent"`."""
    fields = dict(fields)
    lora = LoraSettings(**fields.pop("lora", {}))
    optimizer = OptimizerSettings(**fields.pop("optimizer", {}))
    init = job_dir / "parent" if fields.pop("parent_version", None) else None
    return FinetuneSpec(name=adapter, data=job_dir / "data.jsonl", output_dir=job_dir / "out",
                        lora=lora, optimizer=optimizer, tenant=tenant, init_adapter=init,
                        **fields)


def continued_fields(parent: VersionRecord, given: dict) -> dict:
    """The fields of a job that continues version `parent` of its adapter: those `given`,
    then the settings of the job that made `parent` (an uploaded version: none) and
    `parent`'s alpha; always `parent`'s rank and targets, which its weights fix: a rank or
    targets given that differ are refused (SpecError)."""
    made = {k: v for k, v in parent.provenance.get("hyperparameters", {}).items()
            if k != "parent_version"} if parent.provenance.get("source") == "job" else {}
    weights = {"rank": parent.rank, "targets": sorted(parent.target_modules)}
    given_lora = given.get("lora", {})
    for name in ("rank", "targets"):
        if name in given_lora and _same(given_lora[name]) != _same(weights[name]):
            raise SpecError(
                f"{reference(parent.name, parent.version)} has {name} {weights[name]}, and a "
                f"job that continues it keeps them; leave {name} unset, or train the adapter "
                f"from scratch (from_scratch) at {name} {given_lora[name]}")
    fields = {**made, **given, "parent_version": parent.version}
    fields["lora"] = {**made.get("lora", {}), "alpha": parent.alpha, **given_lora, **weights}
    optimizer = {**made.get("optimizer", {}), **given.get("optimizer", {})}
    if optimizer:
        fields["optimizer"] = optimizer
    return fields


def _same(value):
    """A setting as compared: a list of targets in any order, a number of any type."""
    return sorted(value) if isinstance(value, list | tuple) else value
