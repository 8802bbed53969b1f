"""Measured calibrations of the planner's step-time model (:func:`cluster.cost_model.step_time`),
per device kind: data, each with where it came from.

The figures are copied from bench/results/plan_calibration.json, which bench/plan_calibrate.py
fits to measured steps (its docstring has the method); tests/cluster/test_plan.py checks that this
table and that JSON agree and recomputes the H100 fit from the recorded runs. A kind's
``values`` replace :class:`cluster.cost_model.Hardware`'s defaults; what a kind does not list
keeps them (e.g. the H100's NVLink and network bandwidths are data-sheet figures, not fits).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class Calibration:
    """One device kind's fitted :class:`~cluster.cost_model.Hardware` fields and their source."""

    kind: str
    device: str                         # what the measurement ran on
    values: Mapping[str, float]         # Hardware field -> fitted (or measured) value
    source: str                         # the record(s) the values were fitted from
    method: str                         # how, in one sentence
    holdout: str = ""                   # what the tests predict with it that the fit never saw
    notes: tuple[str, ...] = field(default_factory=tuple)


CALIBRATIONS: Mapping[str, Calibration] = MappingProxyType({
    "h100": Calibration(
        kind="h100",
        device="NVIDIA H100 80GB HBM3 (one GPU, 128 GB host)",
        values=MappingProxyType({
            "peak_tflops": 989.0,                   # dense bf16, H100 SXM data sheet
            "mfu": 0.4692580040266511,
            "host_memory_gbs": 82.83294995868214,   # per 8-GPU node: 10.35 GB/s per GPU
        }),
        source="bench/results/gpu_zero3_offload.json and gpu_zero3_offload_accum8.json, rung "
               "6.7B (bench/gpu_zero3_offload.py); fit in bench/results/plan_calibration.json",
        method="a step is a + m·c: medians at m = 1 (21.14 s) and m = 8 (28.20 s) give "
               "c = 1.007 s per micro-batch of 4 × 2048 tokens (mfu = the cost model's compute "
               "at MFU 1 / c) and a = 20.14 s of offload (host_memory_gbs makes the cost "
               "model's offload term equal a)",
        holdout="the 125M, 1.3B and 2.7B rungs of gpu_zero3_offload.json",
        notes=("ZeRO-3 + CPU optimizer offload with checkpointing at one GPU: no collective "
               "was timed, so the NVLink / network / latency figures stay data-sheet values",
               "the fitted host rate (10.4 GB/s per GPU for the 28-byte Adam pass) is 2.4x "
               "below the old 25 GB/s: host Adam, not PCIe, sets offloaded steps")),
    "cpu": Calibration(
        kind="cpu",
        device="this project's 2-core x86_64 VM, one thread per rank",
        values=MappingProxyType({
            "gpus_per_node": 2,
            "peak_tflops": 0.10106109774512992,
            "mfu": 0.514209948400988,
            "fp32_speed": 1.0,
            "latency_us": 204.2485000401939,
            "nvlink_gbs": 1.1447597127318194,
        }),
        source="bench/results/plan_calibration.json, kind cpu (bench/plan_calibrate.py --cpu)",
        method="peak = a one-thread 512³ fp32 matmul; mfu = the cost model's compute of one "
               "single-process fp32 step of a 4-block GPT (h 128, s 128, b 8) at MFU 1 / its "
               "median; latency and bus bandwidth from 2-rank gloo all-reduces of 4 B and 4 MiB",
        holdout="tests/cluster/test_plan.py ranks three 2-rank layouts of another GPT (h 64)",
        notes=("measured on a shared machine (load average in the JSON): absolute times are "
               "rough, the ranking is what the tests check",)),
})


def calibration(kind: str) -> Calibration:
    """The calibration of device kind ``kind``; a ValueError naming the known kinds."""
    if kind not in CALIBRATIONS:
        raise ValueError(f"device kind {kind!r}: no calibration; known kinds: "
                         f"{', '.join(CALIBRATIONS)}")
    return CALIBRATIONS[kind]
