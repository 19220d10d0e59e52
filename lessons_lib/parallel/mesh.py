"""One grid of ranks, every process group derived from it.

``world_size = dp x pp x tp`` ranks are laid out as ``torch.arange(world_size).view(dp, pp, tp)``:
tensor-parallel (TP) peers are adjacent ranks (on a real cluster they share a node and its fast
NVLink), pipeline stages stride by ``tp``, and data-parallel replicas stride by ``pp x tp``.
Reading along one axis of the grid gives one group:

    dp=2, pp=2, tp=2          tp groups: [0,1] [2,3] [4,5] [6,7]
    replica 0: stage0 [0,1]   pp groups: [0,2] [1,3] [4,6] [5,7]
               stage1 [2,3]   dp groups: [0,4] [1,5] [2,6] [3,7]
    replica 1: stage0 [4,5]
               stage1 [6,7]

Every rank must create every group, in the same order (``dist.new_group`` is collective), so
``Mesh`` builds all of them and keeps the ones that contain this rank. Nothing else in the
library does rank arithmetic: it asks the mesh.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..validate import bad, check_choice, check_int

AXES = ("dp", "pp", "tp")


def mesh_grid(tp: int = 1, pp: int = 1, dp: int = 1) -> torch.Tensor:
    """The rank grid, shape ``(dp, pp, tp)``; a pure function, usable without a process group."""
    for name, size in (("tp", tp), ("pp", pp), ("dp", dp)):
        check_int(name, size, low=1)
    return torch.arange(dp * pp * tp).view(dp, pp, tp)


def mesh_sizes(world_size: int, tp: int = 1, pp: int = 1, dp: int | None = None) -> tuple[int, int, int]:
    """``(tp, pp, dp)`` for ``world_size`` ranks, ``dp=None`` meaning ``world_size // (tp * pp)``.

    Refuses sizes that are not ints >= 1 or whose product is not the world size, naming them.
    """
    check_int("world_size", world_size, low=1)
    check_int("tp", tp, low=1)
    check_int("pp", pp, low=1)
    if dp is None:
        if world_size % (tp * pp):
            raise bad("tp x pp", tp * pp, f"a divisor of the world size {world_size}",
                      f"tp x pp = {tp} x {pp}: choose tp and pp whose product divides {world_size}")
        return tp, pp, world_size // (tp * pp)
    check_int("dp", dp, low=1)
    if tp * pp * dp != world_size:
        raise bad("tp x pp x dp", tp * pp * dp, f"the world size {world_size}",
                  f"tp x pp x dp = {tp} x {pp} x {dp}: choose sizes whose product is {world_size}")
    return tp, pp, dp


def groups_along(grid: torch.Tensor, axis: str) -> list[list[int]]:
    """Every group of ranks that differ only in their coordinate on ``axis``."""
    check_choice("axis", axis, AXES)
    moved = grid.movedim(AXES.index(axis), -1)
    return moved.reshape(-1, moved.shape[-1]).tolist()


def rank_coords(grid: torch.Tensor, rank: int) -> tuple[int, int, int]:
    """``(dp, pp, tp)`` coordinates of ``rank`` in ``grid``."""
    check_int("rank", rank, low=0, high=grid.numel() - 1, why=f"a rank of this {grid.numel()}-rank grid")
    return tuple(int(c) for c in (grid == rank).nonzero()[0])


def rank_at(grid: torch.Tensor, dp: int, pp: int, tp: int) -> int:
    """The rank at coordinates ``(dp, pp, tp)`` of ``grid``."""
    for name, value, size in (("dp", dp, grid.shape[0]), ("pp", pp, grid.shape[1]), ("tp", tp, grid.shape[2])):
        check_int(name, value, low=0, high=size - 1)
    return int(grid[dp, pp, tp])


@dataclass
class Mesh:
    """This rank's view of a ``tp x pp x dp`` mesh: its coordinates, groups and neighbours.

    Create it inside a distributed function (every rank, same arguments)::

        mesh = Mesh(tp=2, pp=2)          # dp defaults to world_size // (tp * pp)
        mesh.tp_group, mesh.tp_rank      # who I shard weights with, my shard index
        mesh.pp_prev, mesh.pp_next       # global ranks of my pipeline neighbours (or None)
    """

    tp: int = 1
    pp: int = 1
    dp: int | None = None

    def __post_init__(self):
        if not dist.is_initialized():
            raise RuntimeError("Mesh needs an initialised process group: create it inside run_distributed")
        self.tp, self.pp, self.dp = mesh_sizes(dist.get_world_size(), self.tp, self.pp, self.dp)
        self.grid = mesh_grid(self.tp, self.pp, self.dp)
        self.rank = dist.get_rank()
        self.dp_rank, self.pp_rank, self.tp_rank = rank_coords(self.grid, self.rank)
        self._groups, self._members = {}, {}
        for axis in AXES:
            for ranks in groups_along(self.grid, axis):
                # Created even for one rank: ``group=None`` would mean the whole world to torch.
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    self._groups[axis], self._members[axis] = group, ranks

    # -- groups and members --------------------------------------------------------
    def group(self, axis: str):
        """The process group along ``axis`` that contains this rank."""
        return self._groups[axis]

    def ranks(self, axis: str) -> list[int]:
        """Global ranks of this rank's group along ``axis``, in axis order."""
        return list(self._members[axis])

    @property
    def tp_group(self):
        return self._groups["tp"]

    @property
    def pp_group(self):
        return self._groups["pp"]

    @property
    def dp_group(self):
        return self._groups["dp"]

    # -- pipeline neighbours -------------------------------------------------------
    @property
    def pp_prev(self) -> int | None:
        """Global rank of the previous pipeline stage, or ``None`` on the first stage."""
        return self._members["pp"][self.pp_rank - 1] if self.pp_rank > 0 else None

    @property
    def pp_next(self) -> int | None:
        """Global rank of the next pipeline stage, or ``None`` on the last stage."""
        return self._members["pp"][self.pp_rank + 1] if self.pp_rank < self.pp - 1 else None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        return (f"rank {self.rank}: dp {self.dp_rank}/{self.dp}, pp {self.pp_rank}/{self.pp}, "
                f"tp {self.tp_rank}/{self.tp}; tp peers {self.ranks('tp')}, "
                f"pp peers {self.ranks('pp')}, dp peers {self.ranks('dp')}")
