"""cotune: serve thousands of LoRA adapters and fine-tune new ones in the same forward pass.

`from cotune import Runtime` loads the engine (and torch) on first use only, so that
`cotune.client` stays importable without torch.
"""

_EXPORTS = {
    "Runtime": "cotune.engine.runtime", "Request": "cotune.engine.runtime",
    "Completion": "cotune.engine.runtime", "Delta": "cotune.engine.runtime",
    "FinetuneSpec": "cotune.engine.finetune_spec", "LoraSettings": "cotune.engine.finetune_spec",
    "OptimizerSettings": "cotune.engine.finetune_spec", "Job": "cotune.engine.job",
    "JobState": "cotune.engine.job", "SessionSpec": "cotune.engine.session_spec",
    "Datum": "cotune.engine.session_spec", "LossSpec": "cotune.engine.session_spec",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cotune' has no attribute {name!r}")
