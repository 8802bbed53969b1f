"""What every strategy-equivalence test compares, with which tolerances, and why.

A parallel run sums the same terms as one process in another order, so its fp32 results
differ from the single-process run by rounding only. Three things keep such a comparison both
sharp and independent of the CPU's rounding:

- **An optimizer that does not amplify noise.** AdamW's update is m/(sqrt(v) + eps): with the
  default eps = 1e-8 an element whose true gradient is ~0 moves by ~lr in the direction of its
  rounding noise. The attention key bias is such a parameter in every transformer (softmax is
  invariant to adding q·b_k to every score of a query, so dL/db_k = 0 exactly): two correct
  implementations differ there by ~lr, and which way depends on the CPU. ``EPS`` = 1e-3 makes
  the update a smooth function of the gradient (a change δg moves it by at most lr·δg/eps),
  so such an element moves by ~lr·1e-9/1e-3 instead of ~lr — and the update grows with the
  gradient, so a wrong gradient scale shows in the weights, not only in the norm.
- **The pre-clip gradient norm of every step**, compared with the reference's. Clipping
  (g·c/‖g‖) and Adam (m/sqrt(v)) both hide a constant factor on the gradient; the norm does
  not, so a missing or extra 1/N in a reduction fails here whatever the rest does.
- **A run without clipping** beside the clipped one, so the clip path is not the only one seen.

Tolerances (fp32): losses and norms rtol 1e-5 / atol 1e-6, weights rtol 1e-5 / atol 1e-5.
``scaled_reduction`` is the test-only fault the suite injects to prove that these checks see a
wrong scale: it multiplies what every data-parallel reduction sends by a factor.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import torch

LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
NORM_TOL = dict(rtol=1e-5, atol=1e-6)
WEIGHT_TOL = dict(rtol=1e-5, atol=1e-5)
EPS = 1e-3


def _series(values: Mapping[int, float], steps: Sequence[int]) -> torch.Tensor:
    return torch.tensor([values[s] for s in steps], dtype=torch.float64)


def assert_same_run(out: Mapping, ref_losses: Mapping[int, float],
                    ref_norms: Mapping[int, float] | None,
                    ref_weights: Mapping[str, torch.Tensor] | None, steps: Sequence[int],
                    *, weight_tol: Mapping = WEIGHT_TOL, what: str = "") -> None:
    """``out`` ({"losses", "grad_norms", "weights"}) against the reference: the per-step losses,
    the per-step pre-clip gradient norms (when ``ref_norms``) and the final weights (when
    ``ref_weights``)."""
    torch.testing.assert_close(_series(out["losses"], steps), _series(ref_losses, steps),
                               **LOSS_TOL, msg=lambda m: f"{what} losses: {m}")
    if ref_norms is not None:
        torch.testing.assert_close(_series(out["grad_norms"], steps), _series(ref_norms, steps),
                                   **NORM_TOL, msg=lambda m: f"{what} grad norms: {m}")
    if ref_weights is not None:
        assert set(out["weights"]) >= set(ref_weights), what
        for name, tensor in ref_weights.items():
            torch.testing.assert_close(out["weights"][name].float(), tensor.float(), **weight_tol,
                                       msg=lambda m, n=name: f"{what} {n}: {m}")


@contextlib.contextmanager
def scaled_reduction(factor: float) -> Iterator[None]:
    """Test-only fault: every data-parallel gradient reduction (DataParallel's bucket
    all-reduce, which ZeRO-0/1 and the mesh's dp use, and the reduce-scatter of ZeRO-2/3)
    sends ``factor`` times its input, as a missing 1/N would. Patched on the class in this
    process (a worker) and restored on exit; no code path a user reaches."""
    from bmray.actors.parallel.data_parallel import DataParallel

    launch, scatter = DataParallel._launch, DataParallel._reduce_scatter_into

    def scaled_launch(self, bucket):
        if bucket.buffer is not None:
            bucket.buffer.mul_(factor)
        return launch(self, bucket)

    def scaled_scatter(self, t, shard):
        t.mul_(factor)
        return scatter(self, t, shard)

    DataParallel._launch, DataParallel._reduce_scatter_into = scaled_launch, scaled_scatter
    try:
        yield
    finally:
        DataParallel._launch, DataParallel._reduce_scatter_into = launch, scatter


def gradient_from_first_update(before: torch.Tensor, after: torch.Tensor, lr: float,
                               eps: float) -> torch.Tensor:
    """The gradient that AdamW's first step applied, read back from the update (no weight
    decay): m̂ = g and v̂ = g² after one step (bias-corrected), so after = before − lr·g/(|g|+eps)
    and, with d = before − after, g = eps·d / (lr − |d|). With eps ≫ |g| the update is ~lr·g/eps,
    so this is well conditioned."""
    d = (before.double() - after.double())
    return eps * d / (lr - d.abs())
