"""cotune: serve thousands of LoRA adapters and fine-tune new ones in the same forward pass.

`from cotune import Runtime` loads the engine (and torch) on first use only, so that
`cotune.client` stays importable without torch.
"""

__all__ = ["Completion", "Delta", "Request", "Runtime"]


def __getattr__(name: str):
    if name in __all__:
        from cotune.engine import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'cotune' has no attribute {name!r}")
