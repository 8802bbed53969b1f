"""How a training run is placed and restarted: ``ScalingConfig`` (the gang) and ``RunConfig``.

Both are sections of an experiment (``scaling:``, ``run:``) and use Ray Train's names, so a Ray
user feels at home. cluster/gang.py places a gang from a ScalingConfig and cluster/launcher.py
restarts it per RunConfig; both re-export these classes.
"""
from __future__ import annotations

from dataclasses import dataclass

from bmray.models.typed_config import ConfigError, check_choice, check_positive

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class ScalingConfig:
    """How many workers and what each gets (Ray Train's names)."""

    num_workers: int = 1
    # Elastic restarts (Ray Train's min/max workers, torchelastic's --nnodes=MIN:MAX): after a
    # failure the gang restarts with the most workers the live nodes hold, down to this many.
    # None: always num_workers (a restart waits for the lost capacity to come back).
    min_workers: int | None = None
    use_gpu: bool = False
    cpus_per_worker: float = 1.0           # also the worker's torch thread count (at least 1)
    placement_strategy: str = "PACK"
    backend: str = "auto"                  # "auto" | "gloo" | "nccl"
    start_timeout_s: float = 120.0         # placement group + rendezvous
    collective_timeout_s: float = 300.0    # a collective waiting longer than this fails

    def __post_init__(self) -> None:
        check_positive("scaling.num_workers", self.num_workers)
        if self.min_workers is not None:
            check_positive("scaling.min_workers", self.min_workers)
            if self.min_workers > self.num_workers:
                raise ConfigError(f"scaling.min_workers: {self.min_workers} is more than "
                                  f"scaling.num_workers ({self.num_workers})")
        check_positive("scaling.cpus_per_worker", self.cpus_per_worker, allow_zero=True)
        check_choice("scaling.placement_strategy", self.placement_strategy, PLACEMENT_STRATEGIES)
        check_choice("scaling.backend", self.backend, ("auto", "gloo", "nccl"))
        if self.backend == "nccl" and not self.use_gpu:
            raise ConfigError("scaling.backend: nccl needs scaling.use_gpu: true")
        check_positive("scaling.start_timeout_s", self.start_timeout_s)
        check_positive("scaling.collective_timeout_s", self.collective_timeout_s)

    @property
    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "nccl" if self.use_gpu else "gloo"

    @property
    def bundle(self) -> dict[str, float]:
        """One worker's resources (one placement-group bundle)."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {})}


@dataclass
class RunConfig:
    """Failure handling of a run (Ray Train's names)."""

    max_failures: int = 0        # gang restarts allowed; each resumes from the latest checkpoint

    def __post_init__(self) -> None:
        check_positive("run.max_failures", self.max_failures, allow_zero=True)
