"""ParallelDims against a brute-force enumeration of the (dp, pp, tp) grid."""
from __future__ import annotations

import itertools

import pytest

from bmray.actors.parallel.dims import ParallelDims
from bmray.models.typed_config import ConfigError

SHAPES = [(1, 1, 1), (4, 1, 1), (2, 2, 2), (3, 1, 2), (1, 4, 2), (2, 3, 1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_coords_are_row_major_over_dp_pp_tp(shape):
    mesh = ParallelDims(*shape)
    grid = list(itertools.product(*(range(n) for n in shape)))   # the reference order
    assert mesh.world_size == len(grid)
    for rank, (dp, pp, tp) in enumerate(grid):
        assert mesh.coords(rank) == {"dp": dp, "pp": pp, "tp": tp}
        assert mesh.rank(dp, pp, tp) == rank


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dim", ["dp", "pp", "tp"])
def test_groups_partition_ranks_and_vary_only_their_dim(shape, dim):
    mesh = ParallelDims(*shape)
    groups = mesh.groups(dim)
    assert sorted(r for g in groups for r in g) == list(range(mesh.world_size))
    assert all(len(g) == getattr(mesh, dim) for g in groups)
    for g in groups:
        coords = [mesh.coords(r) for r in g]
        for other in {"dp", "pp", "tp"} - {dim}:
            assert len({c[other] for c in coords}) == 1
        assert sorted(c[dim] for c in coords) == list(range(getattr(mesh, dim)))


def test_tensor_parallel_peers_are_adjacent_ranks():
    mesh = ParallelDims(dp=2, pp=2, tp=2)
    assert mesh.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert mesh.group_of(5, "dp") == [1, 5]


def test_bad_meshes_raise_config_errors():
    with pytest.raises(ConfigError, match="mesh.tp"):
        ParallelDims(tp=0)
    with pytest.raises(ConfigError, match="not divisible"):
        ParallelDims.for_world(6, tp=4)
    assert ParallelDims.for_world(8, tp=2, pp=2) == ParallelDims(2, 2, 2)
