"""Plain PyTorch models, tokenizer and data (no Ray here).

The public names are resolved lazily (PEP 562) so that light modules such as
``models.typed_config`` can be imported without building every model family.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "models.config",
    "MoEConfig": "models.config",
    "ModelOutput": "models.outputs",
    "build_model": "models.registry",
    "objective_for": "models.objectives",
    "generate": "models.generation",
    "GenerationConfig": "models.generation",
    "ConfigError": "models.typed_config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
