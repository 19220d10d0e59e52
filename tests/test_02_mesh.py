"""The TP x PP x DP mesh: one grid, every group and neighbour derived from it."""

import pytest
import torch
import torch.distributed as dist

from lessons_lib import DistributedError, run_distributed
from lessons_lib.parallel.mesh import Mesh, groups_along, mesh_grid

pytestmark = pytest.mark.lesson02


def test_groups_along_each_axis_of_a_2x2x2_grid():
    grid = mesh_grid(tp=2, pp=2, dp=2)
    assert groups_along(grid, "tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups_along(grid, "pp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups_along(grid, "dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_every_rank_is_in_exactly_one_group_per_axis():
    grid = mesh_grid(tp=2, pp=3, dp=1)
    for axis in ("tp", "pp", "dp"):
        flat = sorted(r for g in groups_along(grid, axis) for r in g)
        assert flat == list(range(6))


def _coordinates(tp, pp):
    mesh = Mesh(tp=tp, pp=pp)
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t, group=mesh.tp_group)  # sums only over my TP peers
    return (mesh.dp_rank, mesh.pp_rank, mesh.tp_rank, mesh.pp_prev, mesh.pp_next,
            mesh.ranks("tp"), t.item())


def test_mesh_on_four_ranks_tp2_pp2():
    results = run_distributed(_coordinates, 4, 2, 2)
    assert [r[:3] for r in results] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    assert [r[3:5] for r in results] == [(None, 2), (None, 3), (0, None), (1, None)]
    assert [r[5] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r[6] for r in results] == [1.0, 1.0, 5.0, 5.0]  # 0+1 and 2+3


def test_tp1_groups_do_not_reduce_over_the_world():
    results = run_distributed(_coordinates, 2, 1, 1)  # dp = 2
    assert [r[6] for r in results] == [0.0, 1.0]


@pytest.mark.parametrize("tp, pp, words", [
    (3, 1, "tp x pp=3 is not valid: expected a divisor of the world size 4 (tp x pp = 3 x 1"),
    (0, 1, "tp=0 is not valid: expected an int >= 1"),
])
def test_bad_mesh_sizes_name_the_parameter(tp, pp, words):
    with pytest.raises(DistributedError) as info:
        run_distributed(lambda: Mesh(tp=tp, pp=pp), 4)
    assert info.value.remote_type == "BadArgument"          # a ValueError that names the parameter
    assert words in info.value.remote_traceback


def test_explicit_sizes_must_multiply_to_the_world():
    with pytest.raises(DistributedError) as info:
        run_distributed(lambda: Mesh(tp=2, pp=1, dp=1), 4)
    assert "tp x pp x dp=2 is not valid: expected the world size 4 (tp x pp x dp = 2 x 1 x 1" in info.value.remote_traceback


def test_bad_axis_and_sizes_in_pure_functions():
    with pytest.raises(ValueError, match="axis='cp' is not valid: expected one of"):
        groups_along(mesh_grid(2), "cp")
    with pytest.raises(ValueError, match="pp=0 is not valid: expected an int >= 1"):
        mesh_grid(tp=2, pp=0)
