"""A compressed model on disk: ``model.safetensors`` + ``manifest.json``.

    save_compressed(model, "out/artifact", records, base_identity(teacher), metrics,
                    architecture=architecture_of(teacher))
    model = load_compressed("out/artifact", build_base)     # build_base() -> the uncompressed
                                                             # architecture (any weights)
The manifest (format ``bmray-compressed/1``) holds the uncompressed base's ``architecture``
(class, config, and a hash of its state_dict's names, shapes and dtypes), the ``recipe`` and
each stage's ``records``, the base's ``identity`` (its weights hash: what it was made from),
``sizes`` (parameters, bytes) and the measured ``metrics``. Loading rebuilds the skeleton —
the base, then each record's structural change replayed without data (recipe.py:
``shrink_to`` for structured pruning, ``QuantLinear`` for quantization, fewer blocks for a
distilled student, ...) — and loads the tensors strictly (names, shapes and dtypes). A base of
another architecture is an :class:`ArtifactMismatch` naming both; a missing or corrupt file an
:class:`ArtifactError`. Tensors sharing storage (tied weights) are stored once and re-aliased.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import safetensors.torch
from safetensors import SafetensorError
from torch import Tensor, nn

from bmray.models.compress.quant import QuantLinear
from bmray.models.compress.quant_embedding import QuantEmbedding
from bmray.models.compress.recipe import StageRecord, replay_stage
from bmray.models.manifest import MANIFEST, read_manifest_file, tensor_table
from bmray.models.typed_config import ConfigError

__all__ = ["FORMAT", "TENSORS", "MANIFEST", "ArtifactError", "ArtifactMismatch",
           "architecture_of", "model_sizes", "save_compressed", "read_manifest",
           "load_compressed"]

FORMAT = "bmray-compressed/1"
TENSORS = "model.safetensors"


class ArtifactError(ConfigError):
    """A compressed artifact is missing, corrupt, of an unknown format or does not fit."""


class ArtifactMismatch(ConfigError):
    """The artifact was made from another architecture than the base given to load it."""


def _config_of(model: nn.Module) -> Any:
    """The model's own config, else its first submodule's (a classifier's encoder)."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is None:
            continue
        if hasattr(cfg, "to_dict"):
            cfg = cfg.to_dict()
        elif hasattr(cfg, "__dataclass_fields__"):
            cfg = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
        else:
            continue
        return json.loads(json.dumps(cfg, default=str, sort_keys=True))
    return None


def architecture_of(model: nn.Module) -> dict[str, Any]:
    """``{"class", "config", "shapes_sha256"}``: what must agree between the base an artifact
    was made from and the one it is loaded onto (not the weights: those come from the file)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype};".encode())
    return {"class": type(model).__name__, "config": _config_of(model),
            "shapes_sha256": h.hexdigest()}


def model_sizes(model: nn.Module) -> dict[str, int]:
    """``parameters``: weights the model computes with (trainable ones once, plus each
    QuantLinear's codes counted as its ``out × in`` weights and its bias, a QuantEmbedding's
    as its ``num × dim`` rows); ``bytes``: what its
    tensors (parameters and buffers, each storage once) occupy — what the artifact stores."""
    params = {id(p): p.numel() for p in model.parameters()}
    quant = sum(m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0)
                for m in {id(m): m for m in model.modules()
                          if isinstance(m, QuantLinear)}.values())
    quant += sum(m.num_embeddings * m.embedding_dim for m in
                 {id(m): m for m in model.modules() if isinstance(m, QuantEmbedding)}.values())
    storages: dict[tuple[int, int], int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        storages[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = \
            t.untyped_storage().nbytes()
    return {"parameters": sum(params.values()) + quant, "bytes": sum(storages.values())}


def _dedupe(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors with one storage, offset and shape stored once: ``{alias: holder}``."""
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for k, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               tuple(t.stride()), t.dtype)
        if key in seen:
            aliases[k] = seen[key]
        else:
            seen[key] = k
            out[k] = t.detach().cpu().contiguous().clone()
    return out, aliases


def save_compressed(model: nn.Module, directory: str | Path, records: Sequence[StageRecord],
                    base_identity: dict[str, Any], metrics: dict[str, Any], *,
                    architecture: dict[str, Any], source: dict[str, Any] | None = None
                    ) -> Path:
    """Write ``model`` (the result of ``records``' stages applied to a base whose
    ``architecture_of`` is ``architecture``) to ``directory``; returns it. ``source``: where
    the base came from (JSON; how a loader finds its ``build_base``)."""
    if not isinstance(architecture, dict) or "shapes_sha256" not in architecture:
        raise ArtifactError("architecture: pass architecture_of(base), taken before compressing")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _dedupe(model.state_dict())
    safetensors.torch.save_file(tensors, str(directory / TENSORS))
    manifest = {
        "format": FORMAT,
        "architecture": architecture,
        "recipe": [r.stage for r in records],
        "records": [r.to_dict() for r in records],
        "base": base_identity,
        "source": source,
        "sizes": model_sizes(model),
        "metrics": metrics,
        "tensors": tensor_table(tensors),
        "aliases": aliases,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    return directory


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest at ``directory``, its format and keys checked."""
    return read_manifest_file(directory, FORMAT, ("architecture", "records", "base", "aliases"),
                              ArtifactError, "compressed-model")


def _describe(arch: dict[str, Any]) -> str:
    cfg = arch.get("config") or {}
    bits = [f"{k}={cfg[k]}" for k in ("family", "model_type", "n_layers", "num_hidden_layers",
                                      "d_model", "hidden_size") if k in cfg]
    return (f"{arch.get('class')}({', '.join(bits)}; shapes sha256 "
            f"{str(arch.get('shapes_sha256'))[:12]})")


def check_architecture(manifest: dict[str, Any], base: nn.Module, where: Path) -> None:
    """ArtifactMismatch naming both unless ``base`` has the artifact's architecture."""
    want, have = manifest["architecture"], architecture_of(base)
    if want == have:
        return
    wc, hc = want.get("config") or {}, have.get("config") or {}
    keys = sorted(k for k in set(wc) | set(hc) if wc.get(k) != hc.get(k))
    diff = (f"config differs at {keys[:6]}" if keys else
            "class differs" if want.get("class") != have["class"] else
            "configs are equal, parameter shapes differ")
    raise ArtifactMismatch(f"{where}: the artifact was made from {_describe(want)}, the base "
                           f"given to load it is {_describe(have)}; {diff}")


def load_compressed(directory: str | Path, build_base: Callable[[], nn.Module]) -> nn.Module:
    """The compressed model saved at ``directory``: ``build_base()`` (the uncompressed
    architecture; its weights are overwritten), checked against the manifest, each record's
    structural change replayed, then every tensor loaded strictly. In eval mode."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    path = directory / TENSORS
    if not path.is_file():
        raise ArtifactError(f"{path}: the model's tensors are missing")
    try:
        tensors = safetensors.torch.load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: not a readable safetensors file: {exc}") from exc
    model = build_base()
    check_architecture(manifest, model, directory)
    for i, rec in enumerate(manifest["records"]):
        try:
            model = replay_stage(model, rec["stage"]["kind"], rec["record"])
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"{directory / MANIFEST}: records[{i}] is incomplete: "
                                f"{exc!r}") from exc
    for alias, holder in manifest["aliases"].items():
        if holder not in tensors:
            raise ArtifactError(f"{path}: alias {alias!r} points at missing {holder!r}")
        tensors[alias] = tensors[holder]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    bad = sorted(k for k in set(expected) & set(tensors)
                 if expected[k].shape != tensors[k].shape or expected[k].dtype != tensors[k].dtype)
    if missing or unexpected or bad:
        raise ArtifactError(
            f"{path}: tensors do not fit the rebuilt model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape/dtype mismatch "
            f"{[(k, list(tensors[k].shape), str(tensors[k].dtype)) for k in bad[:5]]}")
    model.load_state_dict(tensors, strict=True)
    return model.eval()
