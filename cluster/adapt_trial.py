"""The default body of a sweep trial: one adaptation run with the trial's own resources.

    body(cfg, out_dir=..., on_eval=...) -> AdaptResult     # sweep.trial_body's default

Where it trains: a trial is a Tune actor in bundle 0 of its placement group, with bundles 1..N
reserved beside it for ``workers_per_trial`` gang workers (actors/tune/trainable.py). With
N = 0 ``run_adapt`` trains here, in the trial's process. With N >= 1 ``run_adapt_gang`` starts
the gang in exactly those bundles — never in a second placement group, which would need the
resources twice and could deadlock a full cluster — and relays rank 0's evaluation rows to this
process, where ``on_eval`` reports them to Tune (ASHA decides from them).

What it checkpoints: the trial's artifact folder holds what serving needs and nothing of the
frozen base: the delta (``save_delta``: manifest + tensors, ``load_delta`` reads it back onto
the base), with the classification head (``head.safetensors``, ``head.json``) or the prompt
(``prompt.json``, ``soft.safetensors``) of the run beside it (the file names do not collide).
Each trial's checkpoints, tokenizer and metrics go below the trial's own ``out_dir``.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import ray

from bmray.actors.train.adapt import AdaptResult, run_adapt
from bmray.actors.train.adapt_config import AdaptConfig
from bmray.actors.tune.trainable import gang_bundles
from bmray.cluster.adapt_gang import run_adapt_gang
from bmray.models.typed_config import ConfigError

ARTIFACT = "artifact"      # the folder (inside out_dir) the trial's checkpoint is made from


def trial_config(cfg: AdaptConfig, out_dir: str) -> AdaptConfig:
    """``cfg`` writing only below ``out_dir`` (trials run side by side: a shared checkpoint
    folder would let one trial resume from another's state)."""
    return dataclasses.replace(
        cfg, out_dir=out_dir,
        checkpoint=dataclasses.replace(cfg.checkpoint, dir=os.path.join(out_dir, "checkpoints")),
        train=dataclasses.replace(cfg.train, metrics_path=None))


def adapt_trial(cfg: AdaptConfig, *, out_dir: str, on_eval=None) -> AdaptResult:
    """Run ``cfg`` as a sweep trial (see the module docstring); the result's ``delta_dir`` is
    the artifact folder the trial checkpoints."""
    if cfg.delta.config is None and cfg.delta.load is None and cfg.prompt is None:
        raise ConfigError("delta: a sweep trial checkpoints the delta only; delta null (full "
                          "fine-tuning) has none — give delta a method")
    cfg = trial_config(cfg, out_dir)
    _, bundles = gang_bundles() if ray.is_initialized() else (None, [])
    if bundles:
        if len(bundles) != cfg.scaling.num_workers:
            raise ConfigError(f"scaling.num_workers: {cfg.scaling.num_workers}, but the trial "
                              f"reserved {len(bundles)} gang bundle(s)")
        result = run_adapt_gang(cfg, out_dir=out_dir, on_eval=on_eval, in_process=False)
    else:
        result = run_adapt(cfg, out_dir=out_dir, on_eval=on_eval)
    return dataclasses.replace(result, delta_dir=collect_artifact(result, out_dir))


def collect_artifact(result: AdaptResult, out_dir: str) -> str:
    """One folder with the run's delta, head and prompt files (``out_dir/artifact``)."""
    parts = [d for d in (result.delta_dir, result.head_dir, result.prompt_dir) if d]
    target = Path(out_dir) / ARTIFACT
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for part in parts:
        for f in sorted(Path(part).iterdir()):
            if f.is_file():
                if (target / f.name).exists():
                    raise FileExistsError(f"{f}: a file of that name is already in {target}")
                shutil.copy2(f, target / f.name)
    return str(target)


__all__ = ["adapt_trial", "trial_config", "collect_artifact", "ARTIFACT"]
