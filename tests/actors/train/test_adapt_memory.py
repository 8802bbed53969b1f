"""The training-memory measure of ``run_adapt``: the bytes autograd keeps for backward, against
what each torch op is documented to save, and a ladder keeping less than LoRA on one base."""
from __future__ import annotations

import os

import torch
from torch import nn

from bmray.actors.train.adapt import run_adapt, saved_activation_bytes
from bmray.actors.train.adapt_config import load_adapt_config
from tests.conftest import REPO

torch.set_num_threads(1)
TINY = os.path.join(REPO, "configs", "adapt_tiny.yaml")
B, D_IN, D_HID, D_OUT = 5, 8, 16, 4
F32 = 4


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, D_HID), nn.ReLU(), nn.Linear(D_HID, D_OUT))


def test_saved_bytes_follow_what_each_op_keeps():
    x = torch.randn(B, D_IN)
    model = mlp()
    # all trainable: Linear 1 keeps its input x (for dW1); ReLU keeps its output, which is
    # also Linear 2's input (one storage, counted once); weights are parameters, not counted
    assert saved_activation_bytes(model, lambda: model(x)) == B * (D_IN + D_HID) * F32
    # first layer frozen: nothing below the ReLU needs a gradient, so x is not kept
    model[0].requires_grad_(False)
    assert saved_activation_bytes(model, lambda: model(x)) == B * D_HID * F32
    # all frozen: no graph, nothing kept
    model.requires_grad_(False)
    assert saved_activation_bytes(model, lambda: model(x)) == 0


def test_the_measure_does_not_leave_a_graph_or_change_the_output():
    x = torch.randn(B, D_IN)
    model = mlp()
    ref = model(x).detach()
    saved_activation_bytes(model, lambda: model(x))
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())


def run(tmp_path, name, *overrides):
    cfg = load_adapt_config(TINY, ["scaling.num_workers=1", f"out_dir={tmp_path / name}",
                                   "train.max_steps=1", "train.eval_every=0",
                                   "task.eval_limit=8", *overrides])
    return run_adapt(cfg, out_dir=str(tmp_path / name))


def test_run_adapt_memory_is_state_plus_activations_and_ladder_keeps_less(tmp_path):
    lora = run(tmp_path, "lora")
    m = lora.memory
    assert lora.activation_bytes > 0
    # every trainable tensor has a float32 gradient during a step, and AdamW two moments
    grads = 4 * lora.trainable_params
    assert m["optimizer_bytes"] >= 2 * grads
    assert lora.peak_memory_bytes == (m["param_bytes"] + grads + m["optimizer_bytes"]
                                      + lora.activation_bytes)
    ladder = run(tmp_path, "ladder", "delta={method: ladder, reduction_factor: 4, side_heads: 2}")
    full = run(tmp_path, "full", "delta=null")
    # LoRA on every block's q/v: backward runs through every block, as full fine-tuning does;
    # the ladder's backward covers its side network (width d/4) only
    assert ladder.activation_bytes < lora.activation_bytes <= full.activation_bytes
