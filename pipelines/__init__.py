"""vqstack pipelines: data, training loops, evaluation, generation and the `vqstack` command line.

Heavy imports are deferred so that `vqstack --help` starts instantly.
"""

from importlib import import_module

_EXPORTS = {
    "GenerationPipeline": ".generation",
    "GenerationOutput": ".generation",
    "evaluate_tokenizer": ".evaluate",
    "encode_dataset": ".encode",
    "load_image_dataset": ".data",
    "load_embedded_dataset": ".data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
