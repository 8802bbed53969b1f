"""The planner's per-GPU device-memory prediction (cluster/cost_model.py) against one ZeRO-0
forward + backward on a GPU; writes bench/results/plan_gpu_check.json.

The script behind that record (which named it ``.gpucheck/plan_mem.py``, the throw-away copy
that ran on the lent H100), rebuilt from what the record says it did (its ``method``):

* ``Zero(stage=0, param_dtype='bf16', offload_optimizer=...).setup(GPT)`` on cuda, for
  offload ``none`` then ``cpu``, one after the other in one process (the second run's base and
  peak therefore include the first's leftovers: only its states and its peak − base are used);
* ``states`` = ``memory_report()``'s device / host bytes;
* ``saved`` = bytes of the distinct non-parameter storages autograd saves during
  ``forward_backward`` (``torch.autograd.graph.saved_tensors_hooks``);
* ``base`` = ``torch.cuda.memory_allocated()`` right before ``forward_backward``, then
  ``reset_peak_memory_stats()``; ``peak`` = ``torch.cuda.max_memory_allocated()`` after it, and
  ``peak_after_step`` after ``clip_and_step`` (unchanged: the step does not set the peak);
* ``predicted_*`` = the planner's formulas for the same layout
  (``model_state_bytes``, ``stage_activation_bytes``);
* ``reading``: cuBLAS's workspace = the first run's peak − base less the second's (the first
  allocates it at its first matmul, after ``base``), and what was allocated before the forward
  beyond the memory report = the first run's base − its states.

GPT h = 1024, 8 blocks, V = 32000, s = 1024, b = 4, bf16 (the record's ``config``).

    python bench/plan_gpu_check.py                   # on a CUDA machine (about a minute)
    python bench/plan_gpu_check.py --dry-run         # CPU, tiny GPT: the same code path

On CPU (``--dry-run``) there is no ``memory_allocated``: ``base``, ``peak`` and the ``reading``
are null, the states, the saved bytes and the predictions are measured as on the GPU.
tests/cluster/test_plan.py runs the dry run and reads the recorded JSON.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import write_json  # noqa: E402
from bmray.actors.train.config import TrainConfig  # noqa: E402
from bmray.actors.parallel.zero.stage12 import Zero  # noqa: E402
from bmray.cluster import cost_model as cm  # noqa: E402
from bmray.models.config import ModelConfig  # noqa: E402
from bmray.models.families.registry import build_model  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "plan_gpu_check.json")
CONFIG = {
    "model": {"family": "gpt", "vocab_size": 32000, "d_model": 1024, "n_heads": 16,
              "n_layers": 8, "d_ff": 4096, "max_seq_len": 1024, "dropout": 0.0},
    "strategy": {"kind": "zero", "stage": 0, "param_dtype": "bf16"},
    "gpus": 1, "seq_len": 1024, "micro_batch": 4, "micro_batches": 1,
    "activation_checkpointing": False,
}
DRY_MODEL = {"family": "gpt", "vocab_size": 512, "d_model": 64, "n_heads": 4, "n_layers": 2,
             "d_ff": 256, "max_seq_len": 64, "dropout": 0.0}
METHOD = ("Zero(stage=0, param_dtype='bf16', offload_optimizer=...).setup(GPT) on cuda; "
          "'states' = memory_report() device/host; 'saved' = bytes of the distinct "
          "non-parameter storages autograd saved during forward_backward "
          "(saved_tensors_hooks); 'base' = torch.cuda.memory_allocated() right before "
          "forward_backward, then reset_peak_memory_stats(); 'peak' = "
          "torch.cuda.max_memory_allocated() after it (unchanged after clip_and_step). The two "
          "offload settings ran one after the other in one process.")
SECOND_NOTE = ("second in the process: memory of the first run ('none') was still allocated, "
               "so its base and peak include leftovers; only its states and its peak - base (a "
               "difference within the run) are used. Its states_host is memory_report()'s host "
               "bytes without the pinned staging buffer the prediction counts there.")


def _allocated(cuda: bool) -> int | None:
    if not cuda:
        return None
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def _peak(cuda: bool) -> int | None:
    if not cuda:
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def run(offload: str, config: dict[str, Any], device: str) -> dict[str, Any]:
    """One ZeRO-0 forward + backward (+ step) of the config's GPT; the record's fields."""
    cuda = device.startswith("cuda")
    model_cfg = ModelConfig(**config["model"])
    s, b = config["seq_len"], config["micro_batch"]
    dtype = config["strategy"]["param_dtype"]
    torch.manual_seed(0)
    z = Zero(stage=0, param_dtype=dtype, offload_optimizer=offload)
    z.setup(build_model(model_cfg), TrainConfig(device=device, echo=False))
    report = z.memory_report()
    ids = torch.randint(0, model_cfg.vocab_size, (b, s + 1), device=z.device)
    batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}
    params = {p.untyped_storage().data_ptr() for p in z.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    base = _allocated(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z.forward_backward(batch, 1.0)
    peak = _peak(cuda)
    z.clip_and_step(1.0)
    peak_after_step = _peak(cuda)

    spec = cm.ModelSpec.from_module(z.model, model_cfg.family, dropout=model_cfg.dropout)
    psi = spec.total.total
    states = cm.model_state_bytes(psi, 0, 1, dtype, offload_optimizer=offload != "none",
                                  gpu=cuda)
    out: dict[str, Any] = {
        "states_device": int(report["device"]), "states_host": int(report["host"]),
        "saved": sum(seen.values()), "base": base, "peak": peak,
        "peak_minus_base": None if peak is None else peak - base,
        "peak_after_step": peak_after_step,
        "predicted_states_device": int(states.device)}
    if offload == "none":
        out["predicted_activations"] = int(cm.stage_activation_bytes(
            spec, 0, spec.n_layers, 0, 1, seq=s, micro_batch=b, micro_batches=1,
            act_bytes=cm.DTYPE_BYTES[dtype]))
    else:
        out["predicted_states_host"] = int(states.host)
    del z
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="on CPU with a tiny GPT (no CUDA memory statistics)")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device: run on a GPU machine (or --dry-run)")
        return 0
    config = dict(CONFIG)
    if args.dry_run:
        config.update(model=DRY_MODEL, seq_len=64, micro_batch=2)
    device = "cuda" if cuda else "cpu"
    runs = {"none": run("none", config, device)}
    runs["cpu"] = run("cpu", config, device)
    runs["cpu"].pop("base")                 # the record keeps only the first run's base
    runs["cpu"]["note"] = SECOND_NOTE
    none, cpu = runs["none"], runs["cpu"]
    measured = cuda and none["peak_minus_base"] is not None
    record = {
        "benchmark": "plan_gpu_check",
        "what": "the planner's per-GPU device-memory prediction (cluster/cost_model.py) "
                "against one ZeRO-0 forward + backward on a GPU",
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
        "torch": torch.__version__,
        "script": "bench/plan_gpu_check.py" + ("" if cuda else " --dry-run"),
        "config": config, "method": METHOD, "runs": runs,
        "reading": {
            "cublas_workspace": none["peak_minus_base"] - cpu["peak_minus_base"]
            if measured else None,
            "cublas_workspace_from": "runs.none.peak_minus_base - runs.cpu.peak_minus_base: "
                                     "the first run allocated cuBLAS's workspace (32 MiB on "
                                     "Hopper, through PyTorch's caching allocator) at its "
                                     "first matmul, after 'base'; in the second it already "
                                     "existed",
            "before_forward_beyond_states": none["base"] - none["states_device"]
            if measured else None,
            "before_forward_beyond_states_from": "runs.none.base - runs.none.states_device "
                                                 "(allocator blocks counted whole, small "
                                                 "buffers outside memory_report)"},
    }
    write_json(args.out, record)
    for name, r in runs.items():
        print(f"{name:5} states {r['states_device']:,} (predicted {r['predicted_states_device']:,})"
              f"  saved {r['saved']:,}  peak {r['peak']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
