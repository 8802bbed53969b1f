"""The parallel mesh: the one truth about how ranks map to (dp, pp, tp) coordinates and groups.

Following torchtitan's ``ParallelDims``: a run has ``dp × pp × tp`` workers; rank order is
row-major over ``(dp, pp, tp)`` so that tensor-parallel peers are adjacent ranks (they are placed
in neighbouring placement-group bundles, i.e. on the same node: TP all-reduces every layer and
needs the fastest links), pipeline stages come next, and data-parallel replicas are outermost
(their all-reduce happens once per step and tolerates slower links). Megatron-LM orders its
groups the same way.

Pure Python, no Ray and no torch.distributed: the driver uses it to plan placement, the workers
to build their process groups (``groups(dim)`` lists the rank sets to pass to ``new_group``).
"""
from __future__ import annotations

from dataclasses import dataclass

from bmray.models.typed_config import ConfigError, check_choice

DIMS = ("dp", "pp", "tp")       # outermost → innermost


@dataclass(frozen=True)
class ParallelDims:
    """``dp × pp × tp`` ranks."""

    dp: int = 1
    pp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for dim in DIMS:
            value = getattr(self, dim)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"mesh.{dim}: must be an integer >= 1, got {value!r}")

    @classmethod
    def for_world(cls, world_size: int, tp: int = 1, pp: int = 1) -> "ParallelDims":
        """The mesh with the given tp and pp and data parallelism filling the rest."""
        if world_size % (tp * pp):
            raise ConfigError(f"mesh: world size {world_size} is not divisible by tp*pp = "
                              f"{tp}*{pp}")
        return cls(dp=world_size // (tp * pp), pp=pp, tp=tp)

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.dp, self.pp, self.tp

    def coords(self, rank: int) -> dict[str, int]:
        """Rank → {"dp": i, "pp": j, "tp": k}."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a mesh of {self.world_size} ranks")
        tp = rank % self.tp
        pp = (rank // self.tp) % self.pp
        dp = rank // (self.tp * self.pp)
        return {"dp": dp, "pp": pp, "tp": tp}

    def rank(self, dp: int = 0, pp: int = 0, tp: int = 0) -> int:
        """Coordinates → rank (inverse of ``coords``)."""
        for dim, value in (("dp", dp), ("pp", pp), ("tp", tp)):
            if not 0 <= value < getattr(self, dim):
                raise ValueError(f"{dim}={value} is outside 0..{getattr(self, dim) - 1}")
        return (dp * self.pp + pp) * self.tp + tp

    def groups(self, dim: str) -> list[list[int]]:
        """The rank sets that communicate along ``dim``: ranks equal in every other coordinate.
        Every rank is in exactly one group of each dim."""
        check_choice("mesh dim", dim, DIMS)
        others = [d for d in DIMS if d != dim]
        out: dict[tuple[int, ...], list[int]] = {}
        for r in range(self.world_size):
            c = self.coords(r)
            out.setdefault(tuple(c[d] for d in others), []).append(r)
        return list(out.values())

    def group_of(self, rank: int, dim: str) -> list[int]:
        """The ranks that ``rank`` talks to along ``dim`` (itself included)."""
        return next(g for g in self.groups(dim) if rank in g)
