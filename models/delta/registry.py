"""Delta methods by name: ``method`` in a config → (config class, delta class).

A plain dict so further methods register with one line. ``delta_config_from_dict`` builds a typed
config from a YAML/JSON mapping (``{"method": "lora", "targets": [...], "rank": 8}``); unknown
methods and keys are ConfigErrors naming the choices and the key path.
"""
from __future__ import annotations

from typing import Any

from bmray.models.delta.adapter import AdapterConfig, AdapterDelta
from bmray.models.delta.base import Delta, DeltaConfig
from bmray.models.delta.bitfit import BitFitConfig, BitFitDelta
from bmray.models.delta.lora import LoraConfig, LoraDelta
from bmray.models.typed_config import ConfigError, from_dict

__all__ = ["METHODS", "delta_config_from_dict", "build_delta"]

METHODS: dict[str, tuple[type[DeltaConfig], type[Delta]]] = {
    "lora": (LoraConfig, LoraDelta),
    "adapter": (AdapterConfig, AdapterDelta),
    "bitfit": (BitFitConfig, BitFitDelta),
}


def delta_config_from_dict(mapping: Any, path: str = "delta") -> DeltaConfig:
    """The typed config of ``mapping["method"]`` built from the other keys."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {mapping!r}")
    rest = dict(mapping)
    method = rest.pop("method", None)
    if method not in METHODS:
        raise ConfigError(f"{path}.method: {method!r} is not one of {sorted(METHODS)}")
    return from_dict(METHODS[method][0], rest, path)


def build_delta(config: DeltaConfig) -> Delta:
    """A new, unattached delta for ``config``."""
    for config_cls, delta_cls in METHODS.values():
        if type(config) is config_cls:
            return delta_cls(config)
    raise ConfigError(f"delta.method: no delta registered for {type(config).__name__} "
                      f"(registered: {sorted(METHODS)})")
