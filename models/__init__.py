"""Plain PyTorch models, tokenizer and data (no Ray here).

The public names are resolved lazily (PEP 562) so that light modules such as
``models.typed_config`` can be imported without building every model family.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "bmray.models.config",
    "MoEConfig": "bmray.models.config",
    "ModelOutput": "bmray.models.outputs",
    "build_model": "bmray.models.families.registry",
    "objective_for": "bmray.models.objectives",
    "generate": "bmray.models.generation",
    "GenerationConfig": "bmray.models.generation",
    "ConfigError": "bmray.models.typed_config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
