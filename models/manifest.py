"""The JSON manifest beside an artifact's safetensors (a delta, a compressed model): written and
read back the same way, its format and required keys checked with an error naming the file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

__all__ = ["MANIFEST", "read_manifest_file", "tensor_table"]

MANIFEST = "manifest.json"


def tensor_table(tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
    """name → {shape, dtype}: what the manifest says the tensors file holds."""
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in tensors.items()}


def read_manifest_file(directory: str | Path, fmt: str, keys: tuple[str, ...],
                       error: type[Exception], what: str) -> dict[str, Any]:
    """``directory/manifest.json``, parsed; ``error`` (naming the file) when it is missing, not
    JSON, of another format than ``fmt`` or without one of ``keys``."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise error(f"{path}: no {what} manifest here")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise error(f"{path}: format {found!r} is not {fmt!r}")
    for key in keys:
        if key not in manifest:
            raise error(f"{path}: the manifest has no {key!r}")
    return manifest
