"""Checkers for notebook 14 (capstone: the seed's full example fixed, the tiny LM on a mesh).

- ``14.predict_mesh_bytes`` (predict): the bytes a rank of the first pipeline stage sends to the
  next stage while the tiny LM generates on a tp=2 x pp=2 mesh, measured on 4 real ranks;
- ``14.mesh_groups`` (build): a rank's (dp, pp, tp) coordinates and the ranks of its three groups;
- ``14.dp_forward`` (stretch): the bank's data-parallel example, given with the bugs a first fix
  still has (``torch.chunk``, an all-gather of unequal sizes), made right on 2, 3 and 4 ranks,
  a rank with no rows included.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn as nn

from ..launch import run_distributed
from ..parallel.data import DataParallelInference, gather_rows, local_rows, row_range, split_sizes
from ..parallel.mesh import Mesh, groups_along, mesh_grid
from ..parallel.pipeline import generate_on_mesh
from .check import (Incorrect, bytes_sent_to, exercise, judge_prediction, labelled_cases, predicted_number,
                    refuse_reference, run_ranks, with_hidden)
from ..model import ModelConfig, TinyLM

# -- 14.predict_mesh_bytes (predict) ----------------------------------------------------------
MESH_TP, MESH_PP, MESH_BATCH, MESH_PROMPT, MESH_NEW = 2, 2, 4, 6, 3
MESH_CONFIG = dict(vocab_size=264, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                   max_seq_len=64)


def _mesh_bytes_on_rank() -> int:
    torch.manual_seed(0)
    model = TinyLM(ModelConfig(**MESH_CONFIG)).eval()
    mesh = Mesh(tp=MESH_TP, pp=MESH_PP)
    ids = torch.randint(0, 256, (MESH_BATCH, MESH_PROMPT), generator=torch.Generator().manual_seed(1))
    _, sent = bytes_sent_to(lambda: generate_on_mesh(model, mesh, ids, MESH_NEW), dst=mesh.pp_next)
    return sent if dist.get_rank() == 0 else 0


@functools.lru_cache(maxsize=1)
def measured_mesh_bytes() -> int:
    return run_distributed(_mesh_bytes_on_rank, MESH_TP * MESH_PP, timeout=60)[0]


@exercise("14.predict_mesh_bytes", "predict what a TP rank of stage 0 sends to stage 1")
def check_predict_mesh_bytes(candidate):
    refuse_reference(candidate, run_distributed, run_ranks, generate_on_mesh, measured_mesh_bytes)
    guess = predicted_number(candidate, "predicted_mesh_bytes")
    measured = measured_mesh_bytes()
    dim, b, L, n = MESH_CONFIG["dim"], MESH_BATCH, MESH_PROMPT, MESH_NEW
    payload = b * L * dim * 4 + (n - 1) * b * dim * 4
    headers = n * 80
    mistakes = [
        (payload // MESH_TP + headers, "after the row-parallel layer's all-reduce every TP rank holds the "
                                       "whole hidden state (batch, length, dim), not a 1/tp slice: each "
                                       "rank sends all of it to its peer in the next stage"),
        (payload * MESH_TP + MESH_TP * headers, "count what one rank (rank 0) sends; its TP partner sends "
                                                "the same again to its own peer"),
        (payload, "every tensor goes with a header of 10 int64 (80 bytes)"),
        (payload + b * dim * 4 + headers + 80, "one pass too many: the prefill already makes the first "
                                               "new token"),
        (sum(b * (L + k) * dim * 4 for k in range(n)) + headers,
         "decode steps send only the newest position: the KV cache keeps the rest on each stage"),
        ((payload + headers) * 8, "that is bits, not bytes"),
        (payload // 2 + headers, "float32 here: 4 bytes per element"),
    ]
    judge_prediction(guess, measured, mistakes, "bytes",
                     "Per pass rank 0 sends one (batch, length, dim) float32 activation to its peer in "
                     "stage 1 (length: the prompt, then 1), with its header.", tolerance=0.0)
    return (f"{measured} bytes: {n} passes of the whole (batch, length, dim) activation, each with an "
            f"80-byte header, and rank 1 sends the same again to rank 3")


# -- 14.mesh_groups (build) -------------------------------------------------------------------
MESH_CASES = [(6, 2, 2, 2), (5, 2, 2, 2), (0, 1, 1, 1), (7, 3, 1, 4), (11, 2, 3, 2), (3, 4, 2, 1),
              (13, 1, 4, 4)]   # (rank, dp, pp, tp)
MESH_HIDDEN = [(29, 3, 5, 2), (4, 5, 1, 1), (3, 1, 6, 1), (17, 2, 3, 3)]   # grading only


def _reference_groups(rank, dp, pp, tp):
    grid = mesh_grid(tp=tp, pp=pp, dp=dp)
    coords = tuple(int(v) for v in (grid == rank).nonzero()[0])
    groups = {axis: next(g for g in groups_along(grid, axis) if rank in g) for axis in ("tp", "pp", "dp")}
    return {"coords": coords, **groups}


@exercise("14.mesh_groups", "a rank's mesh coordinates and the ranks of its TP, PP and DP groups")
def check_mesh_groups(candidate, hidden=False):
    refuse_reference(candidate, Mesh, mesh_grid, groups_along)
    for label, (rank, dp, pp, tp) in labelled_cases(MESH_CASES, MESH_HIDDEN, hidden):
        case = f"{label}rank {rank} of a dp={dp} x pp={pp} x tp={tp} mesh"
        got = candidate(rank, dp, pp, tp)
        want = _reference_groups(rank, dp, pp, tp)
        if not isinstance(got, dict) or set(got) != set(want):
            raise Incorrect(f"{case}: return a dict with keys {sorted(want)}, got {got!r}")
        coords = tuple(got["coords"]) if isinstance(got["coords"], (list, tuple)) else got["coords"]
        if coords != want["coords"]:
            d, p, t = want["coords"]
            flipped = (rank % dp, rank // dp % pp, rank // (dp * pp))
            hint = ("you made dp vary fastest; in this mesh tp varies fastest (consecutive ranks share "
                    "a node's fast links, so they form the TP group), then pp, then dp"
                    if tuple(coords) == flipped else
                    "rank = (dp_index x pp + pp_index) x tp + tp_index: tp varies fastest")
            raise Incorrect(f"{case}: coordinates (dp, pp, tp) = {coords}, expected ({d}, {p}, {t}): {hint}")
        for axis in ("tp", "pp", "dp"):
            ranks = list(got[axis]) if isinstance(got[axis], (list, tuple, range)) else got[axis]
            if ranks == want[axis]:
                continue
            swapped = [a for a in ("tp", "pp", "dp") if a != axis and ranks == want[a]]
            if swapped:
                raise Incorrect(f"{case}: your {axis} group {ranks} is its {swapped[0]} group; the {axis} "
                                f"group holds the ranks that differ from rank {rank} only in their "
                                f"{axis} coordinate: {want[axis]}")
            if isinstance(ranks, list) and sorted(ranks) == want[axis]:
                raise Incorrect(f"{case}: your {axis} group {ranks} has the right ranks in another order; "
                                f"list them by their {axis} coordinate: {want[axis]} (a rank's index in "
                                f"the list is its rank inside the group)")
            raise Incorrect(f"{case}: your {axis} group is {ranks}, expected {want[axis]}")
    return with_hidden(f"coordinates and groups right on {len(MESH_CASES)} meshes, from 1 rank to 16",
                       MESH_HIDDEN, hidden)


# -- 14.dp_forward (stretch) ------------------------------------------------------------------
class RowCounter(nn.Module):
    """Wraps a model and counts the rows it is run on (to see that each rank did only its share)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.model(x)


def _dp_on_rank(candidate, model, x):
    counter = RowCounter(model)
    with torch.no_grad():
        out = candidate(counter, x)
    return out, counter.rows


DP_CASES = [(2, 7), (3, 10), (4, 5), (4, 3), (3, 1)]   # (ranks, rows): 3 rows on 4 ranks leaves one idle


@exercise("14.dp_forward", "the bank's data-parallel example made right: uneven batches, idle ranks")
def check_dp_forward(candidate):
    refuse_reference(candidate, DataParallelInference, gather_rows, local_rows, row_range, split_sizes)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10))
    for p, rows in DP_CASES:
        case = f"{rows} rows on {p} ranks"
        x = torch.randn(rows, 10, generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            want = model(x)
        try:
            results = run_ranks(_dp_on_rank, p, candidate, model, x, what=case)
        except Incorrect as failed:
            text = str(failed)
            if "IndexError" in text and rows % p:
                raise Incorrect(f"{text}. torch.chunk returns fewer than p pieces when the rows do not "
                                f"divide evenly ({rows} rows into {p} gives "
                                f"{len(torch.arange(rows).chunk(p))}): give rank r its own share, "
                                f"floor or ceil of rows / p, possibly 0") from None
            if "SIGABRT" in text or "size" in text:
                raise Incorrect(f"{text}. all_gather needs tensors of one shape on every rank: with uneven "
                                f"shares, pad each rank's part to the largest share, gather, then trim "
                                f"each part to its own row count") from None
            raise
        for rank, (out, seen) in enumerate(results):
            if not isinstance(out, torch.Tensor):
                raise Incorrect(f"{case}: rank {rank} returned {type(out).__name__}; return the whole "
                                f"output on every rank")
            share = -(-rows // p)
            if seen > share:
                raise Incorrect(f"{case}: rank {rank} ran the model on {seen} rows; its share is at most "
                                f"{share}: split the batch, do not run all of it on every rank")
            if out.shape[0] < want.shape[0] and out.shape[1:] == want.shape[1:]:
                raise Incorrect(f"{case}: rank {rank} returned {out.shape[0]} rows of {rows}: rows are "
                                f"lost. A floor split (rows // p each) drops the remainder; give the "
                                f"first rows % p ranks one more")
            if out.shape != want.shape:
                raise Incorrect(f"{case}: rank {rank} returned shape {tuple(out.shape)}, expected "
                                f"{tuple(want.shape)}: all rows, in order, padding removed")
            if not torch.allclose(out, want, atol=1e-6):
                if torch.allclose(out, torch.flip(want, [0]), atol=1e-6) or \
                        torch.allclose(torch.sort(out, 0).values, torch.sort(want, 0).values, atol=1e-6):
                    raise Incorrect(f"{case}: rank {rank} holds the right rows in the wrong order: put "
                                    f"rank r's part at rows r's share starts at, in rank order")
                raise Incorrect(f"{case}: rank {rank}'s output differs from model(x) by "
                                f"{(out - want).abs().max().item():.2e}: are the parts concatenated "
                                f"(not summed or averaged), and is padding trimmed?")
    return "model(x) on every rank, each running only its share, on 2, 3 and 4 ranks (one with none)"
