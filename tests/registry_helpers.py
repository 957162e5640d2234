"""Shared by the registry tests (test_registry_*.py): real PEFT adapters to publish, and
what to check a registry's files with."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from cotune.adapters.peft_format import LoraAdapter, LoraModule, save_peft_adapter

Q0 = "model.layers.0.self_attn.q_proj"
UPLOAD = {"source": "upload", "base_fingerprint": "sha256:base"}


def write_adapter(path: Path, seed: int = 0, rank: int = 4, features: int = 16) -> Path:
    """A real PEFT LoRA adapter of one q_proj, as cotune's save_peft_adapter writes it."""
    g = torch.Generator().manual_seed(seed)
    module = LoraModule(a=torch.randn(rank, features, generator=g),
                        b=torch.randn(features, rank, generator=g), scale=8 / rank)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj"]}
    save_peft_adapter(LoraAdapter(modules={Q0: module}, config=config), path)
    return path


@contextmanager
def legacy_registry(data_dir: Path) -> Iterator[sqlite3.Connection]:
    """data_dir's registry as the cotune before Alembic made it (schema 4, its own DDL in
    data/registry_schema4.sql), for the block to edit into an older schema and fill."""
    data_dir.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(data_dir / "registry.sqlite3")
    try:
        db.executescript((Path(__file__).parent / "data" / "registry_schema4.sql").read_text())
        yield db
        db.commit()
    finally:
        db.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def blob_dirs(data_dir: Path) -> set[Path]:
    return {p for p in (data_dir / "blobs").iterdir() if p.name != ".staging"}
