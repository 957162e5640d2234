"""A job's checkpoint: an adapter version (PEFT files) plus the state that resumes training
exactly (optimizer moments, step, data position, dropout RNG), never pickled.

Layout under the adapter's directory:
  v{k}/          adapter_config.json + adapter_model.safetensors (what serving loads)
  v{k}.state/    trainer.json, optimizer.safetensors, provenance.json
The state is published first and the version directory last, both by atomic rename: a
version that exists is complete, and resume takes the newest such version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cotune.adapters.peft_format import LoraAdapter, save_peft_adapter

_VERSION = re.compile(r"^v(\d+)$")


def latest_version(adapter_dir: Path) -> int:
    """The newest complete version number under `adapter_dir`, 0 when there is none."""
    if not adapter_dir.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in adapter_dir.iterdir()
               if (m := _VERSION.match(p.name)) and (adapter_dir / f"{p.name}.state").is_dir()]
    return max(numbers, default=0)


def discard_incomplete(adapter_dir: Path) -> int:
    """Removes what an interrupted writer left past the newest complete version: a version
    directory without its state, or a state without its version (a worker stopped or cut
    off mid-checkpoint; its job files taken over part-written). Returns that version: the
    job resumes from it, and writes the later ones anew."""
    latest = latest_version(adapter_dir)
    if not adapter_dir.is_dir():
        return latest
    for path in adapter_dir.iterdir():
        match = _VERSION.match(path.name.removesuffix(".state"))
        if match and int(match.group(1)) > latest:
            shutil.rmtree(path)
    return latest


def save_checkpoint(adapter_dir: Path, version: int, adapter: LoraAdapter, trainer: dict,
                    optimizer: torch.optim.Optimizer, provenance: dict) -> Path:
    """Publishes v{version}; returns the PEFT directory."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    state_dir = adapter_dir / f"v{version}.state"
    tmp = Path(tempfile.mkdtemp(prefix=f".v{version}.state.", dir=adapter_dir))
    try:
        tensors, groups = _optimizer_tensors(optimizer)
        save_file(tensors, tmp / "optimizer.safetensors")
        _write_json(tmp / "trainer.json", {**trainer, "param_groups": groups})
        _write_json(tmp / "provenance.json", provenance)
        os.replace(tmp, state_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    version_dir = adapter_dir / f"v{version}"
    save_peft_adapter(adapter, version_dir)
    return version_dir


def load_checkpoint(adapter_dir: Path, version: int, optimizer: torch.optim.Optimizer) -> dict:
    """Restores the optimizer of v{version} in place; returns its trainer.json."""
    state_dir = adapter_dir / f"v{version}.state"
    trainer = json.loads((state_dir / "trainer.json").read_text())
    tensors = load_file(state_dir / "optimizer.safetensors")
    state = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": trainer.pop("param_groups")})
    return trainer


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    """AdamW's state as flat tensors ("{param index}.{name}") and its param groups as JSON."""
    state = optimizer.state_dict()
    tensors = {f"{index}.{name}": torch.as_tensor(value).detach().cpu().contiguous()
               for index, moments in state["state"].items() for name, value in moments.items()}
    return tensors, state["param_groups"]


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
