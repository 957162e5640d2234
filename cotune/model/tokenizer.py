"""The tokenizer and chat template of a checkpoint, and the tokens that end a generation."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cotune.model.config import ModelConfigError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The checkpoint's own tokenizer, with its chat template; nothing is fetched."""
    if not any((Path(path) / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelConfigError(
            f"{path} has no tokenizer; expected one of {', '.join(_TOKENIZER_FILES)} "
            "beside config.json")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def stop_token_ids(path: str | Path, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """End-of-sequence ids from the tokenizer, config.json and generation_config.json."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for name in ("config.json", "generation_config.json"):
        file = Path(path) / name
        if file.is_file():
            eos = json.loads(file.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return ids
