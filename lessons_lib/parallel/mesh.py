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

AXES = ("dp", "pp", "tp")


def mesh_grid(tp: int = 1, pp: int = 1, dp: int = 1) -> torch.Tensor:
    """The rank grid, shape ``(dp, pp, tp)``; a pure function, usable without a process group."""
    for name, size in (("tp", tp), ("pp", pp), ("dp", dp)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be an int >= 1, got {size!r}")
    return torch.arange(dp * pp * tp).view(dp, pp, tp)


def groups_along(grid: torch.Tensor, axis: str) -> list[list[int]]:
    """Every group of ranks that differ only in their coordinate on ``axis``."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    moved = grid.movedim(AXES.index(axis), -1)
    return moved.reshape(-1, moved.shape[-1]).tolist()


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
        world = dist.get_world_size()
        if self.dp is None:
            for name, size in (("tp", self.tp), ("pp", self.pp)):
                if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                    raise ValueError(f"{name} must be an int >= 1, got {size!r}")
            if world % (self.tp * self.pp):
                raise ValueError(f"world size {world} is not a multiple of tp x pp = "
                                 f"{self.tp} x {self.pp}: choose tp and pp whose product divides {world}")
            self.dp = world // (self.tp * self.pp)
        self.grid = mesh_grid(self.tp, self.pp, self.dp)
        if self.grid.numel() != world:
            raise ValueError(f"world size {world} != tp x pp x dp = {self.tp} x {self.pp} x {self.dp}"
                             f" = {self.grid.numel()}: choose sizes whose product is {world}")
        self.rank = dist.get_rank()
        self.dp_rank, self.pp_rank, self.tp_rank = (int(c) for c in (self.grid == self.rank).nonzero()[0])
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
