"""Sharded ZeRO checkpoints: each rank writes only its own slices; any layout loads them.

With ``strategy.sharded_checkpoint: true`` a ZeRO strategy writes one ``rank_XXXXX.pt`` per
rank holding, under ``"sharded"``, its slices of every flat bucket / unit (fp32 master and Adam
moments) with the per-parameter layout (:func:`param_layout`, :func:`unit_entry`), and under
``"model"`` the items that are not sharded.

Loading (:func:`consolidate_sharded`): every loader reads all rank files and reassembles full
fp32 tensors per parameter into SingleProcess's format (model + AdamW state dict); the current
strategy's ``load_state_dict`` then re-shards — for any world size and stage, and for
SingleProcess. The file format in full: docs/checkpoints.md.
"""
from __future__ import annotations

from typing import Any

import torch

from bmray.actors.train import checkpoints as ckpt

SHARDED_FORMAT = "bmray-sharded/1"


def param_layout(params, offsets, names: dict[int, list[str]],
                 opt_index: dict[int, int]) -> list[dict[str, Any]]:
    """Per-parameter layout entries of one flat buffer."""
    return [{"names": list(names[id(p)]), "shape": tuple(p.shape), "offset": int(off),
             "numel": int(p.numel()), "opt_index": int(opt_index[id(p)])}
            for p, off in zip(params, offsets)]


def _fp32_cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).clone()


def unit_entry(numel: int, start: int, stop: int, master, exp_avg, exp_avg_sq,
               layout) -> dict[str, Any]:
    return {"numel": int(numel), "start": int(start), "stop": int(stop),
            "master": _fp32_cpu(master), "exp_avg": _fp32_cpu(exp_avg),
            "exp_avg_sq": _fp32_cpu(exp_avg_sq), "params": layout}


def frozen_layout(params, offsets, names: dict[int, list[str]]) -> list[dict[str, Any]]:
    """Per-parameter layout entries of one flat buffer of frozen parameters (no optimizer)."""
    return [{"names": list(names[id(p)]), "shape": tuple(p.shape), "offset": int(off),
             "numel": int(p.numel())} for p, off in zip(params, offsets)]


def frozen_entry(numel: int, start: int, stop: int, values, layout) -> dict[str, Any]:
    """This rank's slice of a flat buffer of frozen parameters (ZeRO-3's ``shard_frozen``)."""
    return {"numel": int(numel), "start": int(start), "stop": int(stop),
            "values": _fp32_cpu(values), "params": layout}


def _frozen_params(path: str, states: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Full frozen parameters reassembled from every rank's ``frozen_units`` (if any)."""
    first = states[0]["sharded"].get("frozen_units", [])
    out = {}
    for i, f in enumerate(first):
        full = torch.zeros(f["numel"])
        covered = torch.zeros(f["numel"], dtype=torch.bool)
        for s in states:
            mine = s["sharded"].get("frozen_units", [])
            if len(mine) != len(first) or mine[i]["numel"] != f["numel"]:
                raise ckpt.CorruptCheckpointError(f"{path!r}: rank files disagree on the "
                                                  f"layout (frozen unit {i})")
            full[mine[i]["start"]:mine[i]["stop"]] = mine[i]["values"].float()
            covered[mine[i]["start"]:mine[i]["stop"]] = True
        if not bool(covered.all()):
            raise ckpt.CorruptCheckpointError(f"{path!r}: frozen unit {i} is not fully covered "
                                              f"by the rank files (missing shards)")
        for entry in f["params"]:
            a, n = entry["offset"], entry["numel"]
            value = full[a:a + n].view(tuple(entry["shape"])).clone()
            for name in entry["names"]:
                out[name] = value
    return out


def is_sharded_state(state: dict[str, Any]) -> bool:
    return isinstance(state.get("sharded"), dict) and \
        state["sharded"].get("format") == SHARDED_FORMAT


def consolidate_sharded(path: str, map_location: str | torch.device = "cpu"
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(manifest, state in SingleProcess's format) from every rank file of a sharded checkpoint
    (a step directory, or a root: its ``latest``). Non-sharded items (scheduler, rng, data,
    loop, buffers, frozen params not sharded, loss scaler) come from rank 0's file; frozen
    params sharded by ZeRO-3 (``frozen_units``) are reassembled from every file."""
    path = ckpt.resolve_checkpoint(path)
    manifest = ckpt.verify_checkpoint(path)          # every file present, at its committed size
    files = manifest.get("files") or [f"rank_{r:05d}.pt"
                                      for r in range(int(manifest.get("world_size", 1)))]
    states = []
    for name in files:
        state = ckpt.read_state(path, name, map_location)
        ckpt.check_state_matches_manifest(path, manifest, name, state)
        states.append(state)
    for r, s in enumerate(states):
        if not is_sharded_state(s):
            raise ckpt.CorruptCheckpointError(f"{path!r}: {files[r]} is not a sharded ZeRO state")
    first = states[0]["sharded"]
    n_units = len(first["units"])
    flats: list[dict[str, torch.Tensor]] = []
    for i in range(n_units):
        numel = first["units"][i]["numel"]
        full = {k: torch.zeros(numel) for k in ("master", "exp_avg", "exp_avg_sq")}
        covered = torch.zeros(numel, dtype=torch.bool)
        for r, s in enumerate(states):
            units = s["sharded"]["units"]
            if len(units) != n_units or units[i]["numel"] != numel:
                raise ckpt.CorruptCheckpointError(f"{path!r}: rank files disagree on the layout "
                                           f"(unit {i} in {files[r]})")
            u = units[i]
            for k in full:
                full[k][u["start"]:u["stop"]] = u[k].float()
            covered[u["start"]:u["stop"]] = True
        if not bool(covered.all()):
            raise ckpt.CorruptCheckpointError(f"{path!r}: unit {i} is not fully covered by the "
                                       f"rank files (missing shards)")
        flats.append(full)
    model = dict(states[0].get("model", {}))
    model.update(_frozen_params(path, states))
    optim_state: dict[int, dict[str, torch.Tensor]] = {}
    step = torch.tensor(float(first["step"]))
    for i, u in enumerate(first["units"]):
        for entry in u["params"]:
            a, n, shape = entry["offset"], entry["numel"], tuple(entry["shape"])
            w, m, v = (flats[i][k][a:a + n].view(shape).clone()
                       for k in ("master", "exp_avg", "exp_avg_sq"))
            for name in entry["names"]:
                model[name] = w
            optim_state[entry["opt_index"]] = {"step": step.clone(), "exp_avg": m,
                                               "exp_avg_sq": v}
    optim = dict(first["optim_template"])
    optim["state"] = dict(sorted(optim_state.items()))
    out = {k: v for k, v in states[0].items() if k not in ("sharded", "model")}
    out.update(model=model, optimizer=optim)
    if first.get("scaler") is not None:
        out["scaler"] = first["scaler"]
    return manifest, out
