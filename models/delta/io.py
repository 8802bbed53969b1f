"""Save and load one delta alone: ``delta.safetensors`` + ``manifest.json`` (KB–MB, not the base).

The manifest says what the artifact is and what it was made for, so loading onto the wrong base
fails loudly instead of silently producing garbage::

    {"format": "bmray-delta/1", "method": "lora", "config": {...}, "sites": [...],
     "tensors": {name: {"shape": [...], "dtype": "float32"}}, "num_parameters": N,
     "base": {"class": ..., "config": ..., "weights_sha256": ...}}

Loading is strict: a missing, unexpected or mis-shaped tensor, a corrupt file or an unknown format
is an error naming the path; a base whose identity differs is a :class:`DeltaBaseMismatch`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
from safetensors import SafetensorError
from torch import Tensor, nn

from bmray.models.delta.base import Delta, base_identity, site_key, site_name
from bmray.models.delta.registry import build_delta, delta_config_from_dict
from bmray.models.manifest import MANIFEST, read_manifest_file, tensor_table
from bmray.models.typed_config import ConfigError

__all__ = ["FORMAT", "DeltaArtifactError", "DeltaBaseMismatch", "save_delta", "load_delta",
           "read_manifest"]

FORMAT = "bmray-delta/1"
TENSORS = "delta.safetensors"


class DeltaArtifactError(ConfigError):
    """A delta artifact is missing, corrupt, of an unknown format or does not fit the delta."""


class DeltaBaseMismatch(ConfigError):
    """The delta was saved for another base model."""


def save_delta(delta: Delta, directory: str | Path, base: nn.Module, *,
               tensors: dict[str, Tensor] | None = None,
               identity: dict[str, Any] | None = None) -> Path:
    """Write ``delta`` (attached to, or made for, ``base``) to ``directory``; returns it.

    Where a training strategy shards the live tensors (ZeRO-3) or splits them (tensor
    parallelism), pass the consolidated ``tensors`` (keyed as ``delta.state_dict()``) and the
    base's ``identity`` taken before sharding."""
    if getattr(delta, "merged", False):
        raise ConfigError("save_delta: the delta is merged into the base (its identity would be "
                          "the merged weights); unmerge first")
    own = delta.state_dict()
    if tensors is None:
        tensors = own
    elif set(tensors) != set(own):
        raise ValueError(f"save_delta: tensors for {sorted(set(tensors) ^ set(own))} do not "
                         f"match the delta's own")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    safetensors.torch.save_file(tensors, str(directory / TENSORS))
    manifest = {
        "format": FORMAT,
        "method": delta.config.method,
        "config": delta.config.to_dict(),
        "sites": [site_name(k) for k in delta.sites],
        "tensors": tensor_table(tensors),
        "num_parameters": sum(v.numel() for v in tensors.values()),
        "base": identity if identity is not None else base_identity(base),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return directory


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of the artifact at ``directory``, its format checked."""
    return read_manifest_file(directory, FORMAT, ("config", "sites", "base"), DeltaArtifactError,
                              "delta")


def check_base(manifest: dict[str, Any], base: nn.Module, where: Path) -> None:
    """DeltaBaseMismatch naming both bases unless ``base`` is the one the delta was saved for."""
    want, have = manifest["base"], base_identity(base)
    if want == have:
        return
    wc, hc = want.get("config") or {}, have.get("config") or {}
    keys = sorted(k for k in set(wc) | set(hc) if wc.get(k) != hc.get(k))
    diff = (f"config differs at {keys[:5]}" if keys else "configs are equal, weights differ")
    raise DeltaBaseMismatch(
        f"{where}: the delta was saved for {want.get('class')} (weights sha256 "
        f"{str(want.get('weights_sha256'))[:12]}), this base is {have['class']} (weights sha256 "
        f"{have['weights_sha256'][:12]}); {diff}")


def check_tensors(expected: dict[str, Tensor], got: dict[str, Tensor], where: Path) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(k for k in set(expected) & set(got) if expected[k].shape != got[k].shape)
    if missing or unexpected or shapes:
        raise DeltaArtifactError(
            f"{where}: tensors do not fit the {where.parent.name!r} delta: missing {missing}, "
            f"unexpected {unexpected}, shape mismatch "
            f"{[(k, list(got[k].shape), list(expected[k].shape)) for k in shapes]}")


def load_delta(directory: str | Path, base: nn.Module | None = None) -> Delta:
    """Rebuild the delta saved at ``directory`` (detached). With ``base``: its identity is
    checked and the sites are built from it; without: from the saved tensors' shapes (methods
    with ``site_from_tensors``)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    config = delta_config_from_dict(manifest["config"], path=f"{directory / MANIFEST}:config")
    path = directory / TENSORS
    if not path.is_file():
        raise DeltaArtifactError(f"{path}: the delta's tensors are missing")
    try:
        tensors = safetensors.torch.load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DeltaArtifactError(f"{path}: not a readable safetensors file: {exc}") from exc
    delta = build_delta(config)
    if base is not None:
        check_base(manifest, base, directory)
        delta.attach(base)                      # builds the sites from the base's modules
        delta.detach()
    else:
        if not callable(getattr(delta, "site_from_tensors", None)):
            raise DeltaArtifactError(f"{directory}: a {config.method} delta needs its base "
                                     f"to load: load_delta(directory, base=...)")
        groups: dict[str, dict[str, Tensor]] = {}
        for name, t in tensors.items():
            head, _, rest = name.partition(".")
            key, _, leaf = rest.partition(".")
            if head != "sites" or not leaf:
                raise DeltaArtifactError(f"{path}: unexpected tensor {name!r}")
            groups.setdefault(key, {})[leaf] = t
        if sorted(site_name(k) for k in groups) != sorted(manifest["sites"]):
            raise DeltaArtifactError(f"{path}: tensors are for sites {sorted(groups)}, the "
                                     f"manifest names {manifest['sites']}")
        try:
            for key in (site_key(n) for n in manifest["sites"]):
                delta.sites[key] = delta.site_from_tensors(groups[key])
        except KeyError as exc:
            raise DeltaArtifactError(f"{path}: missing tensor {exc} for a site") from exc
    check_tensors(delta.state_dict(), tensors, path)
    delta.load_state_dict(tensors, strict=True)
    return delta
