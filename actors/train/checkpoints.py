"""Checkpoints on any pyarrow filesystem: save, load, retention, a ``latest`` pointer, averaging.

Layout under a root (a local path or a URI such as ``s3://bucket/run`` / ``gs://...``)::

    <root>/step_00000120/rank_00000.pt    this rank's state (torch.save)
    <root>/step_00000120/manifest.json    step, world size, model config, data position,
                                          file list and sizes — written last (the commit)
    <root>/latest                         the name of the newest complete checkpoint
    <root>/averaged/                      optional mean of the last k checkpoints' weights

Files are written into ``<root>/.tmp.step_XXXXXXXX`` and renamed into place when complete, so a
crash mid-save loses nothing. Loading verifies first (:func:`verify_checkpoint`): a missing or
truncated file raises :class:`CorruptCheckpointError` naming it; a checkpoint of another model
raises :class:`CheckpointError` naming the first differing field or parameter. Averaging is the
float64 mean of the last k checkpoints' parameters (Vaswani et al. 2017, §6.1). Sharded ZeRO
checkpoints are read by sharded_state.py. Design and formats: docs/checkpoints.md.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import time
import uuid
from typing import Any, Mapping

import pyarrow.fs as pafs
import torch

FORMAT = "bmray-checkpoint/1"
MANIFEST = "manifest.json"
LATEST = "latest"
AVERAGED = "averaged"
_STEP_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model; the message says which."""


class CorruptCheckpointError(CheckpointError):
    """A committed checkpoint is damaged (a file missing, truncated or unreadable): an older
    one may still be good, so resuming skips it (``resume_candidates``)."""


# ---------------------------------------------------------------- filesystem helpers

def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or any URI pyarrow understands."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
        raise CheckpointError(f"cannot open checkpoint location {uri!r}: {exc}") from exc


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as fh:
        fh.write(data)


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as fh:
        return fh.read()


def _write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{uuid.uuid4().hex}"
    _write_bytes(fs, tmp, data)
    fs.move(tmp, path)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ---------------------------------------------------------------- listing

def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str) -> list[str]:
    """Complete step checkpoints under ``root`` (those with a manifest), oldest first."""
    fs, base = resolve(root)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    found = []
    for info in fs.get_file_info(pafs.FileSelector(base)):
        m = _STEP_RE.match(info.base_name)
        if info.type == pafs.FileType.Directory and m and _exists(fs, _join(info.path, MANIFEST)):
            found.append((int(m.group(1)), info.base_name))
    return [_join(root, name) for _, name in sorted(found)]


def resume_candidates(root: str) -> list[str]:
    """Checkpoints to try when resuming, best first: the one ``<root>/latest`` names, then
    every other complete one, newest first. The caller takes the first that verifies."""
    found = list_checkpoints(root)[::-1]
    latest = latest_checkpoint(root)
    return ([latest] if latest else []) + [p for p in found if p != latest]


def latest_checkpoint(root: str) -> str | None:
    """The checkpoint ``<root>/latest`` names; falls back to the newest complete one when the
    pointer is missing or names a checkpoint that is gone."""
    fs, base = resolve(root)
    pointer = _join(base, LATEST)
    if _exists(fs, pointer):
        name = _read_bytes(fs, pointer).decode().strip()
        if name and _exists(fs, _join(base, name, MANIFEST)):
            return _join(root, name)
    found = list_checkpoints(root)
    return found[-1] if found else None


# ---------------------------------------------------------------- save

def save_checkpoint(root: str, step: int, state: Mapping[str, Any], *,
                    manifest: Mapping[str, Any] | None = None, rank: int = 0,
                    world_size: int = 1, keep_last: int = 0) -> str:
    """Write ``state`` as ``<root>/step_<step>/rank_<rank>.pt`` atomically; return its path.

    ``manifest`` holds JSON-able facts (model config, data position, ...) written beside the
    tensors. ``keep_last`` > 0 deletes older step checkpoints beyond the newest N.
    Single writer. With several writing ranks the three phases run apart:
    ``begin_checkpoint`` (rank 0) / barrier / ``write_rank_state`` (every rank) / barrier /
    ``commit_checkpoint`` (rank 0) — see ``Trainer.save`` in loop.py.
    """
    begin_checkpoint(root, step)
    write_rank_state(root, step, state, rank)
    return commit_checkpoint(root, step, manifest=manifest, world_size=world_size,
                             keep_last=keep_last)


def checkpoint_path(root: str, step: int) -> str:
    """Where the (committed) checkpoint of ``step`` lives under ``root``."""
    return _join(root, step_dir_name(step))


def averaged_path(root: str) -> str:
    """Where ``save_average`` writes the averaged weights under ``root``."""
    return _join(root, AVERAGED)


def _tmp_dir(root: str, step: int) -> tuple[pafs.FileSystem, str, str]:
    fs, base = resolve(root)
    return fs, base, _join(base, f".tmp.{step_dir_name(step)}")


def begin_checkpoint(root: str, step: int) -> None:
    """Create the empty temp directory of ``step`` (removing leftovers of a crashed save)."""
    fs, _, tmp = _tmp_dir(root, step)
    if _exists(fs, tmp):
        fs.delete_dir(tmp)
    fs.create_dir(tmp, recursive=True)


def write_rank_state(root: str, step: int, state: Mapping[str, Any], rank: int = 0) -> None:
    """Write this rank's state file into the temp directory of ``step``."""
    fs, _, tmp = _tmp_dir(root, step)
    _write_bytes(fs, _join(tmp, f"rank_{rank:05d}.pt"), _torch_bytes(dict(state)))


def commit_checkpoint(root: str, step: int, *, manifest: Mapping[str, Any] | None = None,
                      world_size: int = 1, keep_last: int = 0) -> str:
    """Write the manifest, move the temp directory into place, point ``latest`` at it."""
    fs, base, tmp = _tmp_dir(root, step)
    name = step_dir_name(step)
    final = _join(base, name)
    files = [f"rank_{r:05d}.pt" for r in range(world_size)]
    sizes = {}
    for f, info in zip(files, fs.get_file_info([_join(tmp, f) for f in files])):
        if info.type != pafs.FileType.File:
            raise CheckpointError(f"cannot commit step {step} under {root!r}: {f} was not "
                                  f"written (a rank failed during the save)")
        sizes[f] = info.size
    info = {"format": FORMAT, "step": step, "world_size": world_size, "files": files,
            "file_bytes": sizes, "created": time.time(), **(manifest or {})}
    _write_bytes(fs, _join(tmp, MANIFEST), json.dumps(info, indent=2, default=str).encode())
    if _exists(fs, final):          # re-saving a step (e.g. after resuming exactly there)
        fs.delete_dir(final)
    fs.move(tmp, final)
    _write_atomic(fs, _join(base, LATEST), name.encode())
    if keep_last > 0:
        apply_retention(root, keep_last)
    return _join(root, name)


def apply_retention(root: str, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints; return the deleted ones."""
    found = list_checkpoints(root)
    doomed = found[:-keep_last] if keep_last > 0 else []
    for path in doomed:
        fs, p = resolve(path)
        fs.delete_dir(p)
    return doomed


# ---------------------------------------------------------------- load

def read_manifest(path: str) -> dict[str, Any]:
    fs, p = resolve(path)
    mpath = _join(p, MANIFEST)
    if not _exists(fs, mpath):
        if not _exists(fs, p):
            raise CheckpointError(f"checkpoint not found: {path!r} does not exist")
        raise CheckpointError(f"not a complete checkpoint: {path!r} has no {MANIFEST}")
    try:
        manifest = json.loads(_read_bytes(fs, mpath).decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{_join(path, MANIFEST)!r} is not valid JSON "
                                     f"(truncated or corrupt): {exc}") from None
    if not isinstance(manifest, dict):
        raise CorruptCheckpointError(f"{_join(path, MANIFEST)!r} is not a JSON object")
    return manifest


def verify_checkpoint(path: str) -> dict[str, Any]:
    """The manifest of checkpoint directory ``path`` once its state files check out: the
    format is ours, every listed file exists and has the size the manifest recorded at commit.
    Cheap (no file is read); damage raises CorruptCheckpointError naming the file."""
    manifest = read_manifest(path)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{_join(path, MANIFEST)!r}: unknown checkpoint format "
                              f"{manifest.get('format')!r}, expected {FORMAT!r}")
    fs, p = resolve(path)
    files = manifest.get("files") or ["rank_00000.pt"]
    sizes = manifest.get("file_bytes") or {}
    for name, info in zip(files, fs.get_file_info([_join(p, f) for f in files])):
        if info.type != pafs.FileType.File:
            raise CorruptCheckpointError(f"{_join(path, name)!r} is missing (the manifest "
                                         f"lists {len(files)} state file(s))")
        if name in sizes and info.size != sizes[name]:
            raise CorruptCheckpointError(f"{_join(path, name)!r} is truncated or damaged: "
                                         f"{info.size} bytes, the manifest recorded "
                                         f"{sizes[name]}")
    return manifest


def read_state(path: str, name: str, map_location: str | torch.device = "cpu"
               ) -> dict[str, Any]:
    """torch.load of the state file ``name`` of checkpoint ``path``; a file torch cannot read
    raises CorruptCheckpointError naming it."""
    fs, p = resolve(path)
    f = _join(p, name)
    if not _exists(fs, f):
        raise CorruptCheckpointError(f"{_join(path, name)!r} is missing")
    data = _read_bytes(fs, f)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, pickle errors
        # torch's own message can mislead here (it suggests weights_only=False): name the type
        raise CorruptCheckpointError(f"{_join(path, name)!r} cannot be read (truncated or "
                                     f"corrupt, {len(data)} bytes): torch.load raised "
                                     f"{type(exc).__name__}") from exc


def check_state_matches_manifest(path: str, manifest: Mapping[str, Any], name: str,
                                 state: Mapping[str, Any]) -> None:
    """A state file whose loop step is not the manifest's belongs to another checkpoint (a
    manifest copied over, files mixed up): CorruptCheckpointError naming both."""
    loop = state.get("loop") if isinstance(state, Mapping) else None
    if isinstance(loop, Mapping) and "step" in loop and "step" in manifest \
            and int(loop["step"]) != int(manifest["step"]):
        raise CorruptCheckpointError(f"{_join(path, name)!r} holds step {loop['step']} but "
                                     f"{_join(path, MANIFEST)!r} says step {manifest['step']}: "
                                     f"the files belong to different checkpoints")


def resolve_checkpoint(path: str) -> str:
    """``path`` itself when it is a checkpoint directory, else (a root) its ``latest``."""
    fs, p = resolve(path)
    if not _exists(fs, _join(p, MANIFEST)) and _exists(fs, p):
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"no complete checkpoint under {path!r}")
        return latest
    return path


def load_checkpoint(path: str, rank: int = 0, map_location: str | torch.device = "cpu"
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(manifest, state) of one checkpoint directory, or of ``<path>/latest`` when ``path``
    is a checkpoint root. The checkpoint is verified first (``verify_checkpoint``)."""
    path = resolve_checkpoint(path)
    manifest = verify_checkpoint(path)
    name = f"rank_{rank:05d}.pt"
    if name not in (manifest.get("files") or ["rank_00000.pt"]):
        raise CheckpointError(f"{path!r}: no state for rank {rank} "
                              f"(written with world size {manifest.get('world_size')})")
    state = read_state(path, name, map_location)
    check_state_matches_manifest(path, manifest, name, state)
    return manifest, state


# Fields of ``model_config`` that define the architecture: two models that differ in one of them
# cannot share weights even when every shape agrees (n_heads, pos_encoding, tie_embeddings).
# Training-time fields (dropout, label smoothing, special token ids) may change on a resume.
ARCHITECTURE_FIELDS = ("family", "vocab_size", "d_model", "n_heads", "n_layers", "d_ff",
                       "n_decoder_layers", "max_seq_len", "pos_encoding", "tie_embeddings",
                       "moe", "electra_generator_scale")


def check_model_config(path: str, manifest: Mapping[str, Any], model_config: Any) -> None:
    """CheckpointError naming the manifest and the first architecture field in which the
    checkpoint's ``model_config`` differs from ``model_config`` (a dataclass or mapping).
    Skipped when either side has no config (a hand-made checkpoint, a bare module)."""
    saved = manifest.get("model_config")
    if dataclasses.is_dataclass(model_config):
        model_config = dataclasses.asdict(model_config)
    if not isinstance(saved, Mapping) or not isinstance(model_config, Mapping):
        return
    for key in ARCHITECTURE_FIELDS:
        if key in saved and key in model_config and saved[key] != model_config[key]:
            raise CheckpointError(f"{_join(path, MANIFEST)!r} is of another model: "
                                  f"model_config.{key} is {saved[key]!r} in the checkpoint but "
                                  f"{model_config[key]!r} in the model being trained")


def check_compatible(model: torch.nn.Module | Mapping[str, tuple[int, ...]],
                     model_state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointError naming the first parameter whose name or shape differs.
    ``model``: the module, or its state-dict shapes (a strategy that holds only part of the
    model compares against the full model's: ``Strategy.checkpoint_shapes``)."""
    expected = ({k: tuple(v.shape) for k, v in model.state_dict().items()}
                if isinstance(model, torch.nn.Module) else dict(model))
    for name, shape in expected.items():
        if name not in model_state:
            raise CheckpointError(f"{source} does not fit the model: parameter {name!r} "
                                  f"(shape {tuple(shape)}) is missing from the checkpoint")
        got = tuple(model_state[name].shape)
        if got != tuple(shape):
            raise CheckpointError(f"{source} does not fit the model: parameter {name!r} has "
                                  f"shape {got} in the checkpoint but {tuple(shape)} "
                                  f"in the model")
    extra = [k for k in model_state if k not in expected]
    if extra:
        raise CheckpointError(f"{source} does not fit the model: parameter {extra[0]!r} "
                              f"(shape {tuple(model_state[extra[0]].shape)}) is not in the model")


# ---------------------------------------------------------------- averaging

def average_checkpoints(paths: list[str], rank: int = 0) -> dict[str, torch.Tensor]:
    """Elementwise mean of the model weights of ``paths`` (non-float buffers: from the last)."""
    if not paths:
        raise CheckpointError("average_checkpoints: no checkpoints given")
    acc: dict[str, torch.Tensor] = {}
    last: dict[str, torch.Tensor] = {}
    for path in paths:
        _, state = load_checkpoint(path, rank)
        model_state = state["model"]
        if last and set(model_state) != set(last):
            diff = sorted(set(model_state) ^ set(last))
            raise CheckpointError(f"average_checkpoints: parameter {diff[0]!r} is in only some "
                                  f"of the checkpoints ({paths[0]!r} vs {path!r})")
        for name, tensor in model_state.items():
            if name in last and last[name].shape != tensor.shape:
                raise CheckpointError(f"average_checkpoints: parameter {name!r} has shape "
                                      f"{tuple(tensor.shape)} in {path!r} but "
                                      f"{tuple(last[name].shape)} in {paths[0]!r}")
            if tensor.is_floating_point():
                acc[name] = acc[name] + tensor.double() if name in acc else tensor.double()
            last[name] = tensor
    return {name: (acc[name] / len(paths)).to(t.dtype) if name in acc else t
            for name, t in last.items()}


def save_average(root: str, k: int, manifest: Mapping[str, Any] | None = None) -> str:
    """Average the last ``k`` step checkpoints of ``root`` into ``<root>/averaged``."""
    paths = list_checkpoints(root)[-k:]
    if not paths:
        raise CheckpointError(f"no complete checkpoint under {root!r} to average")
    averaged = average_checkpoints(paths)
    fs, base = resolve(root)
    final = _join(base, AVERAGED)
    tmp = _join(base, f".tmp.{AVERAGED}")
    if _exists(fs, tmp):
        fs.delete_dir(tmp)
    fs.create_dir(tmp, recursive=True)
    data = _torch_bytes({"model": averaged})
    _write_bytes(fs, _join(tmp, "rank_00000.pt"), data)
    info = {**read_manifest(paths[-1]), **(manifest or {}), "format": FORMAT,
            "averaged_from": paths, "files": ["rank_00000.pt"],
            "file_bytes": {"rank_00000.pt": len(data)}, "created": time.time()}
    _write_bytes(fs, _join(tmp, MANIFEST), json.dumps(info, indent=2, default=str).encode())
    if _exists(fs, final):
        fs.delete_dir(final)
    fs.move(tmp, final)
    return averaged_path(root)
