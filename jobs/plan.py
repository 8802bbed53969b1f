"""Plan a run's parallelism: which (dp, tp, pp, ZeRO stage, offload, micro-batches,
activation checkpointing) fits the GPUs and is fastest — among the layouts our strategies run.

    bmray plan --model configs/gpt-tiny.yaml --gpus 8 --gpu-memory 80GB
    bmray plan --model gpt3-6.7b --gpus 8 --gpu-memory 80GiB --seq-len 2048 --json

``--model`` is an experiment YAML (its sequence length, global batch and ZeRO ``param_dtype``
become the defaults), a bare model YAML (the ``model:`` section's keys at top level) or a
built-in name (gpt2 ... gpt3-175b). ``--set model.n_layers=48`` overrides a key. Every listed
layout comes with the ``bmray pretrain --set`` flags that run it.

The search and its report are cluster/planner.py; the formulas are cluster/cost_model.py;
both are explained in docs/planner.md.

Exit status: 0 with a recommendation, 1 when nothing runnable fits (the message says what
would: more GPUs, a shorter sequence ...), 2 for bad arguments or a bad config.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Sequence

from bmray.cluster.calibration import CALIBRATIONS
from bmray.cluster.cost_model import ATTENTION, DTYPE_BYTES, SCHEDULES, Hardware, memory_bytes
from bmray.cluster.planner import (BUILTIN, load_workload, model_spec, plan, report, report_json,
                                   what_would_fit)
from bmray.models.typed_config import ConfigError


def _memory_arg(text: str) -> int:
    try:
        return memory_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _mfu(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def hardware(args: argparse.Namespace) -> Hardware:
    """The ``--device`` kind's calibrated hardware, with the flags given on top."""
    given = {"gpus_per_node": args.gpus_per_node, "peak_tflops": args.peak_tflops,
             "mfu": args.mfu, "network_gbs": args.network_gbs}
    return Hardware.for_kind(args.device, **{k: v for k, v in given.items() if v is not None})


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bmray plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="experiment YAML, bare model YAML, or one of " + ", ".join(BUILTIN))
    ap.add_argument("--gpus", type=_positive_int, required=True, help="GPUs in the run")
    ap.add_argument("--gpu-memory", type=_memory_arg, required=True,
                    help="memory of one GPU: 80GB (10^9), 80GiB (2^30), 512MB, or bytes")
    ap.add_argument("--gpus-per-node", type=_positive_int, default=None,
                    help="tensor parallelism stays within a node (default: the device kind's, "
                         "8 for h100)")
    ap.add_argument("--device", choices=sorted(CALIBRATIONS), default="h100",
                    help="device kind whose measured calibration (MFU, host rate, ...: "
                         "cluster/calibration.py) the step-time estimate uses (default h100)")
    ap.add_argument("--headroom", type=_fraction, default=0.1,
                    help="fraction of GPU memory kept free for the CUDA context, cuBLAS "
                         "workspace, fragmentation and uncounted small temporaries "
                         "(default 0.1)")
    ap.add_argument("--host-memory", type=_memory_arg, default=None,
                    help="host memory per node available for offload (default: unlimited)")
    ap.add_argument("--seq-len", type=_positive_int, default=None,
                    help="tokens per sequence (default: the experiment's, else max_seq_len)")
    ap.add_argument("--global-batch", type=_positive_int, default=None,
                    help="sequences per optimizer step (default: the experiment's, else 8 per GPU)")
    ap.add_argument("--param-dtype", choices=sorted(DTYPE_BYTES), default=None,
                    help="compute copy of the parameters (default: the experiment's ZeRO "
                         "param_dtype, else bf16)")
    ap.add_argument("--attention", choices=ATTENTION, default="fused",
                    help="fused: F.scaled_dot_product_attention saves no s x s scores (what "
                         "our models run); eager: Korthikanti et al.'s 5as^2b term")
    ap.add_argument("--schedule", choices=SCHEDULES, default="1f1b",
                    help="pipeline schedule: activations in flight (default 1f1b)")
    ap.add_argument("--sequence-parallel", action="store_true",
                    help="assume Megatron sequence parallelism with tp (divides all activations)")
    ap.add_argument("--peak-tflops", type=_positive_float, default=None,
                    help=f"dense bf16 peak per GPU (default: the device kind's, "
                         f"{Hardware.peak_tflops} for h100 SXM)")
    ap.add_argument("--mfu", type=_mfu, default=None,
                    help="fraction of peak the matmuls reach (default: the device kind's "
                         f"calibrated value, {Hardware.mfu:.3f} for h100)")
    ap.add_argument("--network-gbs", type=_positive_float, default=Hardware.network_gbs,
                    help=f"GB/s per GPU across nodes (default {Hardware.network_gbs})")
    ap.add_argument("--include-unsupported", action="store_true",
                    help="also rank layouts no strategy of ours runs yet (ZeRO-3 with tp or pp, "
                         "ZeRO-2 with pp, ...), marked '!' and never recommended")
    ap.add_argument("--top", type=_positive_int, default=5, help="candidates to list (default 5)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="override a config key, e.g. model.n_layers=48")
    args = ap.parse_args(argv)
    args.parser = ap
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        work = load_workload(args.model, args.overrides, args.seq_len, args.global_batch,
                             args.param_dtype, args.gpus)
        hw = hardware(args)
        spec = model_spec(work.model)
    except (ConfigError, ValueError) as exc:
        args.parser.error(str(exc))
    options = dict(sequence_parallel=args.sequence_parallel, attention=args.attention,
                   schedule=args.schedule, include_unsupported=args.include_unsupported)
    result = plan(spec, args.gpus, args.gpu_memory, work, hw, headroom=args.headroom,
                  host_memory=args.host_memory, **options)
    if result.best is None:
        result.suggestion = what_would_fit(spec, args.gpus, args.gpu_memory, work, hw,
                                           headroom=args.headroom,
                                           host_memory=args.host_memory, **options)
    if args.json:
        out = report_json(result, spec, work, gpus=args.gpus, gpu_memory=args.gpu_memory,
                          top=args.top)
        print(json.dumps(out, indent=1))
    else:
        print(report(result, spec, work, gpus=args.gpus, gpu_memory=args.gpu_memory,
                     headroom=args.headroom, top=args.top))
    return 0 if result.best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
