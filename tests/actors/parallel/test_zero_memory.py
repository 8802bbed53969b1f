"""ZeRO model-state memory, measured by the CPU allocator rather than declared by the strategy.

Reference: Rajbhandari et al. 2020, "ZeRO", §5 — per rank, with Ψ trainable parameters and
mixed-precision Adam (fp32 master + two fp32 moments):

    stage 0  16Ψ    stage 1  4Ψ + 12Ψ/N    stage 2  2Ψ + 14Ψ/N    stage 3  16Ψ/N      (bf16)

and with fp32 parameters, whose masters alias the parameters when the optimizer is not
offloaded (actors/zero.py, actors/zero3.py): 16Ψ, 8Ψ + 8Ψ/N, 4Ψ + 12Ψ/N, 16Ψ/N. The formulas
are written here, not taken from the code.

Measured (bench/live_bytes.py): the bytes the CPU allocator handed out while the model was
built, the strategy set up and two steps taken, and that are still alive after ``setup`` and
after each step — the allocator's own records (torch's memory profiler), so a copy the
strategy does not know about is counted too. Less the frozen parameters, that is the model
state. The frozen ones (Φ_f elements, no gradient, no optimizer state) cost 2Φ_f bytes per rank
in bf16 (4Φ_f in fp32) at stages 0-2 and at stage 3 with ``shard_frozen: false``, 2Φ_f/N
(4Φ_f/N) at stage 3, which shards them (``frozen``, written out below). Besides the model
with one frozen tensor, stage 3 runs on a frozen base (everything frozen but the LayerNorm
biases: delta tuning's shape), sharded and not. Checks, for stages 0-3 at N = 1, 2, 4 (one
gang of 4 workers; N < 4 runs on a sub-group of the first N, as tests/test_zero3.py), bf16
and fp32, with optimizer offload to host memory and to disk:

* measured − formula is ≥ 0 and at most the shards' padding: each flat bucket / unit is padded
  to a multiple of N (≤ N − 1 elements, ≤ 16 bytes each), and there are at most as many
  buckets / units as parameter tensors (a unit's frozen flat is padded alike). The model
  has Ψ odd (and the frozen base Φ_f odd), so the padding is exercised.
* the strategy's ``memory_report`` (model_state_bytes plus the frozen bytes it keeps, less
  what it puts on disk) equals the measurement to the byte, and its disk bytes equal the
  moment files' size on disk;
* nothing grows across steps (the live bytes after two steps are at most those after setup,
  and at most 1 KiB less: see ``check``);
* disk offload: the files' pages are not resident after a step (smaps), i.e. the moments
  really are on disk, not in memory.

The allocator does not serve the shared-memory transport's segments (not model state; the
report lists them apart as ``comm_buffer_bytes``) nor mapped files (hence the smaps check).
A strategy that keeps one stray copy of its parameters, or a full copy of the frozen base under
stage 3, fails both checks (``test_a_stray_copy_is_seen``, ``test_a_full_frozen_copy_is_seen``);
no float arithmetic is compared, so nothing here depends on the CPU's rounding.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from torch import nn

from bmray.actors.train.config import TrainConfig
from bmray.actors.parallel.zero.stage12 import Zero
from bmray.actors.parallel.zero.stage3 import Zero3
from bench.live_bytes import AllocatorTrace, TensorCensus, mapped_file_bytes
from bmray.models.config import ModelConfig
from bmray.models.families.registry import build_model

torch.set_num_threads(1)
VOCAB, SEQ = 97, 16
CFG = TrainConfig(lr=1e-3, warmup_steps=0, grad_clip=1.0, device="cpu", echo=False)
BUCKETS = dict(bucket_mb=0.01, first_bucket_mb=0.002)     # several buckets of mixed sizes


def formula(stage: int, dtype: str, offload: str, psi: int, n: int) -> float:
    """Model-state bytes per rank (module doc). Offloaded optimizer state is still counted
    (host memory or disk); with fp32 and offload the master is a separate host copy."""
    bf16 = {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n,
            3: 16 * psi / n}
    fp32_aliased = {0: 16 * psi, 1: 8 * psi + 8 * psi / n, 2: 4 * psi + 12 * psi / n,
                    3: 16 * psi / n}
    fp32_offload = {0: 8 * psi + 12 * psi, 1: 8 * psi + 12 * psi / n,
                    2: 4 * psi + 16 * psi / n, 3: 20 * psi / n}
    if dtype == "bf16":
        return bf16[stage]
    return fp32_aliased[stage] if offload == "none" else fp32_offload[stage]


def frozen(stage: int, dtype: str, phi_f: int, n: int, shard_frozen: bool) -> float:
    """Bytes per rank of Φ_f frozen parameters (in the compute dtype; no gradient, no optimizer
    state): replicated at stages 0-2, sharded at stage 3 unless ``shard_frozen`` is off."""
    size = {"bf16": 2, "fp32": 4}[dtype]
    return size * phi_f / n if stage == 3 and shard_frozen else size * phi_f


@dataclass(frozen=True)
class Variant:
    stage: int
    dtype: str = "bf16"
    offload: str = "none"        # optimizer: none | cpu | disk
    offload_params: bool = False  # stage 3
    shard_frozen: bool = True     # stage 3
    frozen_base: bool = False     # train only the LayerNorm biases (tiny_gpt)

    def build(self, group, disk_dir: str | None):
        opts = dict(param_dtype=self.dtype, offload_optimizer=self.offload, group=group,
                    disk_dir=disk_dir if self.offload == "disk" else None)
        if self.stage == 3:
            return Zero3(offload_params=self.offload_params, shard_frozen=self.shard_frozen,
                         **opts)
        return Zero(stage=self.stage, **BUCKETS, **opts)


VARIANTS = [Variant(s, d) for d in ("bf16", "fp32") for s in (0, 1, 2, 3)] + [
    Variant(1, "fp32", "cpu"), Variant(2, "bf16", "cpu"), Variant(2, "fp32", "disk"),
    Variant(3, "bf16", "cpu", offload_params=True), Variant(3, "fp32", "disk"),
    Variant(3, "bf16", shard_frozen=False), Variant(3, "bf16", frozen_base=True),
    Variant(3, "fp32", frozen_base=True), Variant(3, "bf16", frozen_base=True, shard_frozen=False),
    Variant(3, "bf16", "cpu", offload_params=True, frozen_base=True)]
# at N = 4 the bf16 table and the stage-3 variants (the frozen base in bf16 only): the
# rest adds time, not coverage of the sharding arithmetic, which N = 2 already checks with padding
AT = {1: VARIANTS, 2: VARIANTS,
      4: [v for v in VARIANTS if (v.dtype == "bf16" or v.stage == 3) and
          not (v.frozen_base and (v.dtype != "bf16" or v.offload_params))]}


def tiny_gpt(frozen_base: bool = False) -> nn.Module:
    """Three blocks, tied embeddings, a frozen positional embedding, d_ff = 63: Ψ is odd.
    ``frozen_base``: everything frozen but the LayerNorm biases (Φ_f odd)."""
    model = build_model(ModelConfig(family="gpt", vocab_size=VOCAB, d_model=32, n_heads=2,
                                    n_layers=3, d_ff=63, max_seq_len=32, dropout=0.0))
    model.embed.pos.weight.requires_grad_(False)
    if frozen_base:
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(("ln_1.bias", "ln_2.bias", "ln_f.bias")))
    return model


def batch(rank: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(rank))
    return {"input_ids": ids[:, :-1].clone(), "labels": ids[:, 1:].clone()}


def measure(strategy_factory, rank: int, disk_dir: str | None = None,
            allocator: bool = True, frozen_base: bool = False) -> dict:
    """Build, set up and step twice; the live tensor bytes after setup and after the steps
    (census), and with ``allocator`` the allocator's own count at the same points."""
    data = batch(rank)
    torch.manual_seed(0)
    census = TensorCensus()
    live = {}
    with AllocatorTrace() if allocator else contextlib.nullcontext() as trace:
        model = tiny_gpt(frozen_base)
        z = strategy_factory()
        z.setup(model, CFG)
        live["setup"] = census.live()
        if trace is not None:
            trace.mark("setup")
        for _ in range(2):
            z.forward_backward(data, 1.0)
            z.clip_and_step(CFG.grad_clip)
            z.flush()
        live["steps"] = census.live()
        if trace is not None:
            trace.mark("steps")
    frozen = [p for p in model.parameters() if not p.requires_grad]
    out = {"live": {k: v["private"] for k, v in live.items()},
           "allocator": {k: trace.live(k) for k in live} if trace is not None else None,
           "phi_f": sum(p.numel() for p in frozen),
           "psi": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "tensors": len(list(model.parameters())),
           "report": {k: v for k, v in z.memory_report().items() if k != "by_location"}}
    if disk_dir is not None:
        files = [os.path.join(root, f) for root, _, fs in os.walk(disk_dir) for f in fs]
        out["files"] = mapped_file_bytes(files) if files else {"size": 0, "resident": 0}
    del z
    return out


# ---------------------------------------------------------------- the checks

def check(o: dict, v: Variant, n: int) -> None:
    """The measured model state against the formula, the report against the measurement."""
    label = (v, n)
    frozen_bytes = frozen(v.stage, v.dtype, o["phi_f"], n, v.shard_frozen)
    state = o["live"]["steps"] - frozen_bytes
    disk = o.get("files", {}).get("size", 0)
    predicted = formula(v.stage, v.dtype, v.offload, o["psi"], n)
    padding = 16 * (n - 1) * o["tensors"]
    assert 0 <= state + disk - predicted <= padding, (label, state + disk, predicted)
    # no growth over the steps (a stray copy grows). Setup may hold a few bytes more: in the
    # full suite a small tensor from the worker process's other users (8 and 28 bytes, seen
    # once in a few runs; not reproduced with this module alone) can still be alive then.
    # 1 KiB bounds it far below any copy of the model state (2Ψ ≈ 57 KB here).
    assert 0 <= o["live"]["setup"] - o["live"]["steps"] <= 1024, (label, o["live"])
    if o["allocator"] is not None:      # two independent counts agree
        assert o["allocator"] == o["live"], (label, o["allocator"], o["live"])
    report = o["report"]
    held = report.get("frozen_bytes", report["frozen_param_bytes"])   # stage 3 | stages 0-2
    assert 0 <= held - frozen_bytes <= padding, (label, held, frozen_bytes)
    assert report["model_state_bytes"] + held - report["disk"] == o["live"]["steps"], \
        (label, report, o["live"])
    assert report["disk"] == disk, (label, report["disk"], disk)
    if v.offload == "disk":
        assert disk > 0 and o["files"]["resident"] <= disk // 4, (label, o["files"])


# ---------------------------------------------------------------- gang plumbing

_IDLE = "idle"


def _measure_all(n: int, variants: list[Variant], root: str):
    world = dist.get_world_size()
    group = dist.new_group(list(range(n))) if n < world else None    # every rank calls it
    rank = dist.get_rank()
    if rank >= n:
        return _IDLE
    out = []
    for i, v in enumerate(variants):
        disk_dir = os.path.join(root, f"n{n}-v{i}-rank{rank}")
        # the allocator's records are per thread: with N > 1 a collective's own thread
        # frees some of what this thread allocated (gloo's broadcast at setup, the shared-
        # memory all-gather's input), so only the census is read there
        out.append(measure(lambda: v.build(group, disk_dir), rank,
                           disk_dir if v.offload == "disk" else None, allocator=n == 1,
                           frozen_base=v.frozen_base))
    return out


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_measured_model_state_matches_formulas_and_report(gang, workers, tmp_path):
    variants = AT[workers]
    outs = [o for o in gang.execute(_measure_all, workers, variants, str(tmp_path))
            if o != _IDLE]
    assert len(outs) == workers
    for per_rank in outs:
        assert per_rank[0]["psi"] % 2 == 1                 # not divisible by 2 or 4
        assert all(o["phi_f"] % 2 == 1 for v, o in zip(variants, per_rank) if v.frozen_base)
        for v, o in zip(variants, per_rank):
            check(o, v, workers)


class _StrayCopy(Zero):
    """Zero that keeps one extra bf16 copy of the parameters it does not report — the kind
    of leak (a pre-cast copy, a cached gather) a self-declared sum cannot see."""

    def setup(self, model: nn.Module, cfg: TrainConfig) -> None:
        super().setup(model, cfg)
        self.stray = [p.detach().clone() for p in self.params]


def test_a_stray_copy_is_seen():
    v = Variant(1)
    honest = measure(lambda: Zero(stage=1, param_dtype="bf16", **BUCKETS), 0)
    check(honest, v, 1)
    leaky = measure(lambda: _StrayCopy(stage=1, param_dtype="bf16", **BUCKETS), 0)
    assert leaky["live"]["steps"] - honest["live"]["steps"] == 2 * leaky["psi"]
    with pytest.raises(AssertionError):
        check(leaky, v, 1)


class _FrozenCopy(Zero3):
    """Zero3 that keeps a full copy of the frozen base (a gather never freed, a pre-shard
    copy kept) — what sharding the frozen parameters removes."""

    def setup(self, model: nn.Module, cfg: TrainConfig) -> None:
        super().setup(model, cfg)
        self.stray = torch.cat([u.frozen.shard for u in self.units if u.frozen is not None])


def test_a_full_frozen_copy_is_seen():
    """At N = 1 a rank's frozen shard is the whole frozen base: one more copy of it fails the
    check."""
    v = Variant(3, frozen_base=True)
    honest = measure(lambda: Zero3(param_dtype="bf16"), 0, frozen_base=True)
    check(honest, v, 1)
    leaky = measure(lambda: _FrozenCopy(param_dtype="bf16"), 0, frozen_base=True)
    assert leaky["live"]["steps"] - honest["live"]["steps"] == 2 * leaky["phi_f"]
    with pytest.raises(AssertionError):
        check(leaky, v, 1)
