"""Models: loading (forgetless.models.loading), saving, adapters, merging, the tiny model, GGUF
files and ``forgetless fetch``.

The public names are imported on first use, so that ``forgetless fetch`` (which needs neither
torch nor transformers) starts at once.
"""

__all__ = ["load_model", "load_tokenizer", "resolve_model_dir"]


def __getattr__(name: str):
    if name in __all__:
        from forgetless.models import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
