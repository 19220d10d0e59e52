"""Checkers for notebook 04 (cluster architecture).

- ``04.cross_node_bytes`` (predict): bytes that cross between two nodes per generated token when a
  TP group of 4 spans them, measured with real ring all-reduces on four ranks;
- ``04.megatron_placement`` (build): place a TP x PP x DP plan whose ranks are numbered Megatron's
  way (tp fastest, then dp, then pp) so that as few bytes as possible cross nodes;
- ``04.shard_loader`` (stretch): fix a sharded checkpoint loader that gives row-parallel layers the
  wrong slice, miscounts what it read and drops rows when ``tp`` does not divide a dimension.
"""

from __future__ import annotations

import itertools
import numbers
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

from ..cluster.placement import Placement, cross_node_bytes_per_token, place_ranks
from ..cluster.sharded_loading import expected_bytes_per_rank, load_tp_shard, shard_bounds, split_dim
from ..comm import bytes_sent, ring_all_reduce, ring_schedule
from ..launch import run_distributed
from .check import (Incorrect, exercise, labelled_cases, predicted_number, raise_if_stub, refuse_reference,
                    run_ranks, with_hidden)

# -- 04.cross_node_bytes (predict) ------------------------------------------------------------
HIDDEN, N_LAYERS, NODE_OF_RANK = 128, 3, (0, 0, 1, 1)   # a small model; 2 nodes of 2 GPUs, TP = 4
_measured: dict = {}


def _decode_step_traffic(hidden: int, n_layers: int) -> int:
    """One decode step's TP traffic on this rank: two ring all-reduces per layer; bytes sent."""
    sent = 0
    for _ in range(2 * n_layers):   # after attention, after the MLP
        sent += ring_all_reduce(torch.zeros(hidden, dtype=torch.float32))
    return sent


def measured_cross_node_bytes() -> dict:
    """Bytes each of 4 real ranks sends in one decode step, and those that cross the node boundary.

    In the ring rank r sends only to rank (r + 1) % 4, so its bytes cross when that neighbour
    sits on the other node (ranks 1 and 3 here).
    """
    if "step" not in _measured:
        sent = run_distributed(_decode_step_traffic, 4, HIDDEN, N_LAYERS, timeout=60)
        crossing = [r for r in range(4) if NODE_OF_RANK[r] != NODE_OF_RANK[(r + 1) % 4]]
        _measured["step"] = {"sent": sent, "crossing_ranks": crossing,
                             "crossing": sum(sent[r] for r in crossing)}
    return _measured["step"]


@exercise("04.cross_node_bytes", "predict: bytes crossing nodes per token with TP = 4 over 2 nodes")
def check_cross_node_bytes(candidate):
    refuse_reference(candidate, cross_node_bytes_per_token, place_ranks, ring_all_reduce, bytes_sent,
                     ring_schedule, run_distributed, measured_cross_node_bytes)
    guess = predicted_number(candidate, "predicted_cross_node_bytes")
    m = measured_cross_node_bytes()
    want, links = m["crossing"], m["crossing_ranks"]
    model = cross_node_bytes_per_token(place_ranks(2, 2, 4, 1, 1), HIDDEN, N_LAYERS,
                                       bytes_per_element=4)["total"]
    if guess == want:
        return (f"measured: ranks {links[0]} and {links[1]} send {want} bytes across per token "
                f"(the lesson's cost model says {model:g}), as predicted")
    told = (f"you predicted {guess:g} bytes; measured on 4 ranks, the links {links[0]}→{(links[0] + 1) % 4} "
            f"and {links[1]}→{(links[1] + 1) % 4} carry {want} bytes per token")
    activation = HIDDEN * 4
    per_link = want // (2 * 2 * N_LAYERS)    # one crossing link, one all-reduce
    known = {
        want // 2: "exactly half: a layer makes two all-reduces (after attention and after the MLP), "
                   "and two ring links cross the boundary (1→2 and 3→0); did you count only one "
                   "of either? (and a float32 element is 4 bytes)",
        want * 2: "exactly twice: a rank sends only to its right neighbour, so only two of the four "
                  "ring links cross; counting every rank's sends, or both directions of a link, doubles it",
        2 * 2 * N_LAYERS * activation: "that has each crossing link carry the whole activation "
                                       f"({activation} bytes) per all-reduce; a ring link carries "
                                       f"2(p-1)/p of it, {per_link} bytes",
        want // 4: "that is elements, not bytes: a float32 element is 4 bytes",
        want * 8: "that is bits, not bytes",
        want // N_LAYERS: f"that is one layer; a token passes through all {N_LAYERS} layers",
        2 * per_link: f"that is a single all-reduce; a token makes two per layer, in each of {N_LAYERS} layers",
        per_link: f"that is one link for one all-reduce; a token makes {2 * N_LAYERS} all-reduces "
                  f"and two links cross",
    }
    if guess in known:
        raise Incorrect(f"{told}: {known[guess]}.")
    direction = "too low" if guess < want else "too high"
    raise Incorrect(f"{told}: {direction}. Count, per token: 2 all-reduces x {N_LAYERS} layers; in each, "
                    f"every rank sends 2(p-1) chunks of hidden/p float32 elements to its right "
                    f"neighbour, and only the links that join the two nodes count.")


# -- 04.megatron_placement (build) ------------------------------------------------------------
PLACEMENT_CASES = [  # (nodes, devices_per_node, tp, pp, dp)
    (2, 4, 2, 2, 2),   # a whole replica fits in one node
    (2, 2, 1, 2, 2),   # tp = 1: replicas of two stages
    (2, 4, 4, 2, 1),   # a replica spans two nodes: TP inside, PP across
    (4, 2, 2, 2, 2),   # every replica spans two nodes
    (2, 6, 4, 1, 3),   # 4 does not divide 6: one TP group must span the nodes
    (3, 4, 2, 3, 2),   # replicas of 6 on nodes of 4
    (1, 4, 2, 2, 1),   # one node: nothing crosses
]
PLACEMENT_HIDDEN = [  # grading only
    (3, 2, 2, 3, 1),   # one replica of three stages, a stage per node
    (2, 6, 1, 6, 2),   # tp = 1 and six stages: a replica per node
    (2, 6, 3, 2, 2),   # replicas of 6 on nodes of 6
]
COST_HIDDEN, COST_LAYERS = 4096, 12   # any model; 12 layers split evenly over pp = 1, 2, 3


def megatron_coords(rank: int, tp: int, pp: int, dp: int) -> tuple[int, int, int]:
    """``(dp, pp, tp)`` of a rank numbered Megatron's way: tp fastest, then dp, then pp."""
    return (rank // tp) % dp, rank // (tp * dp), rank % tp


def _course_rank(rank: int, tp: int, pp: int, dp: int) -> int:
    d, s, t = megatron_coords(rank, tp, pp, dp)
    return (d * pp + s) * tp + t


def _cost(devices, nodes, per_node, tp, pp, dp) -> dict:
    """Cross-node bytes per token of a placement given in Megatron numbering."""
    course = [None] * len(devices)
    for rank, dev in enumerate(devices):
        course[_course_rank(rank, tp, pp, dp)] = dev
    placement = Placement(nodes, per_node, tp, pp, dp, tuple(course))
    return cross_node_bytes_per_token(placement, COST_HIDDEN, COST_LAYERS)


def least_cross_node_bytes(nodes, per_node, tp, pp, dp) -> dict:
    """The cheapest of the six nesting orders (the tests check it against every node assignment)."""
    costs = [cross_node_bytes_per_token(place_ranks(nodes, per_node, tp, pp, dp, order=order),
                                        COST_HIDDEN, COST_LAYERS)
             for order in itertools.permutations(("dp", "pp", "tp"))]
    return min(costs, key=lambda c: c["total"])


def _as_devices(got, n_ranks: int, args: str) -> list[tuple[int, int]]:
    try:
        devices = [tuple(d) for d in got]
    except TypeError:
        raise Incorrect(f"{args} returned {got!r}; return a list of (node, device) pairs, "
                        f"one per rank") from None
    if len(devices) != n_ranks:
        raise Incorrect(f"{args} returned {len(devices)} devices; the plan has tp·pp·dp = {n_ranks} ranks")
    for dev in devices:
        if len(dev) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in dev):
            raise Incorrect(f"{args} returned {got!r}; each entry is a (node, device) pair of ints")
    return [(int(node), int(device)) for node, device in devices]


def _check_valid(devices, nodes, per_node, args: str) -> None:
    seen = {}
    for rank, (node, device) in enumerate(devices):
        where = f"{args}: rank {rank} is placed on ({node}, {device})"
        if not 0 <= node < nodes:
            raise Incorrect(f"{where}, but node {node} does not exist: nodes are numbered 0..{nodes - 1} "
                            f"(a slot s is node s // devices_per_node)")
        if not 0 <= device < per_node:
            hint = " (device numbers restart at 0 in every node)" if device >= per_node else ""
            raise Incorrect(f"{where}, but a node has devices 0..{per_node - 1}{hint}")
        if (node, device) in seen:
            raise Incorrect(f"{args}: ranks {seen[(node, device)]} and {rank} are both placed on "
                            f"({node}, {device}); every rank needs a GPU of its own")
        seen[(node, device)] = rank


@exercise("04.megatron_placement", "build: place a Megatron-numbered TP x PP x DP plan on nodes")
def check_megatron_placement(candidate, hidden=False):
    refuse_reference(candidate, place_ranks, megatron_coords, least_cross_node_bytes)
    for label, (nodes, per_node, tp, pp, dp) in labelled_cases(PLACEMENT_CASES, PLACEMENT_HIDDEN, hidden):
        args = f"{label}place(nodes={nodes}, devices_per_node={per_node}, tp={tp}, pp={pp}, dp={dp})"
        n = tp * pp * dp
        devices = _as_devices(candidate(nodes, per_node, tp, pp, dp), n, args)
        _check_valid(devices, nodes, per_node, args)
        if per_node % tp == 0:
            for first in range(0, n, tp):
                group = list(range(first, first + tp))
                spanned = sorted({devices[r][0] for r in group})
                if len(spanned) > 1:
                    raise Incorrect(f"{args}: TP group {group} (Megatron numbering: tp fastest) spans "
                                    f"nodes {spanned}; {tp} divides {per_node}, so keep each TP group "
                                    f"in one node: its all-reduces run twice per layer")
        got, best = _cost(devices, nodes, per_node, tp, pp, dp), least_cross_node_bytes(nodes, per_node, tp, pp, dp)
        if got["total"] <= best["total"]:
            continue
        head = (f"{args}: {got['total']:,.0f} bytes cross nodes per token "
                f"(hidden {COST_HIDDEN}, {COST_LAYERS} layers, bf16), but {best['total']:,.0f} is possible")
        if got["tp"] > best["tp"]:
            raise Incorrect(f"{head}: your TP groups' ring links cross nodes more often than needed "
                            f"({got['tp']:,.0f} TP bytes); a TP group split over two nodes should cross "
                            f"the boundary in only two of its ring links (keep its halves contiguous)")
        if devices == [divmod(r, per_node) for r in range(n)]:
            raise Incorrect(f"{head}: that is rank r on slot r. With Megatron's numbering consecutive "
                            f"TP groups are the same stage of the next replica (dp before pp), so slot "
                            f"order puts stage 0 of every replica on the first node and every pipeline "
                            f"boundary crosses nodes; place replica by replica, stage by stage")
        replica = tp * pp
        why = (f"a whole replica (tp·pp = {replica} GPUs) fits in one node of {per_node}: keep its "
               f"stages together" if replica <= per_node and per_node % replica == 0 else
               f"place the stages of one replica on consecutive GPUs, so that each replica crosses "
               f"as few node boundaries as possible")
        raise Incorrect(f"{head}: pipeline boundaries cross nodes more than needed "
                        f"({got['pp']:,.0f} PP bytes, {best['pp']:,.0f} possible); {why}")
    return with_hidden(f"valid, TP groups inside nodes and the least cross-node traffic on "
                       f"{len(PLACEMENT_CASES)} cluster shapes", PLACEMENT_HIDDEN, hidden)


# -- 04.shard_loader (stretch) ----------------------------------------------------------------
SHAPES = {  # a one-layer Llama-style checkpoint whose every split dimension 2, 3 and 4 divide
    "embed.weight": (24, 12),
    "layers.0.attn_norm.weight": (12,),
    "layers.0.attn.q_proj.weight": (12, 12),
    "layers.0.attn.k_proj.weight": (12, 12),
    "layers.0.attn.v_proj.weight": (12, 12),
    "layers.0.attn.o_proj.weight": (12, 12),
    "layers.0.mlp_norm.weight": (12,),
    "layers.0.mlp.gate_proj.weight": (36, 12),
    "layers.0.mlp.up_proj.weight": (36, 12),
    "layers.0.mlp.down_proj.weight": (12, 36),
    "norm.weight": (12,),
    "lm_head.weight": (24, 12),
}
SHARD_WORLD_SIZES = (3, 4)
UNEVEN_TP = 5   # divides none of the dimensions


def shard_checkpoint_state() -> dict:
    """Every element distinct (its offset in the whole checkpoint), so a slice says where it came from."""
    state, start = {}, 0
    for name, shape in SHAPES.items():
        numel = 1
        for s in shape:
            numel *= s
        state[name] = (torch.arange(numel, dtype=torch.float32) + start).reshape(shape)
        start += numel
    return state


def _expected_slice(name: str, full: torch.Tensor, tp: int, rank: int) -> tuple[torch.Tensor, str]:
    dim = split_dim(name)
    if dim is None:
        return full, "the whole tensor (replicated)"
    size = full.shape[dim]
    part = size // tp
    a, b = rank * part, (rank + 1) * part
    return (full[a:b], f"rows {a}:{b}") if dim == 0 else (full[:, a:b], f"columns {a}:{b}")


def _where(name: str, got: torch.Tensor, full: torch.Tensor, tp: int) -> str:
    """Which slice of ``full`` ``got`` is, in words, if it is one of the candidate slices."""
    if torch.equal(got, full):
        return "the whole tensor"
    for dim, label in ((0, "rows"), (1, "columns")):
        if full.dim() <= dim:
            continue
        for k in range(tp):
            part = full.shape[dim] // tp
            a, b = k * part, (k + 1) * part
            piece = full[a:b] if dim == 0 else full[:, a:b]
            if got.shape == piece.shape and torch.equal(got, piece):
                return f"{label} {a}:{b}"
    return f"a tensor of shape {tuple(got.shape)} that is no such slice"


def _load_on_rank(candidate, path):
    rank, tp = dist.get_rank(), dist.get_world_size()
    out = candidate(path, tp, rank)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], dict)):
        return type(out).__name__
    state, read = out
    return {name: t.detach().clone() if isinstance(t, torch.Tensor) else type(t).__name__
            for name, t in state.items()}, read


_MLP = ("layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight")


def _mlp(x, gate, up, down):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def _diagnose_shards(results, full: dict, tp: int, case: str) -> None:
    for rank, result in enumerate(results):
        if isinstance(result, str):
            raise Incorrect(f"{case}: rank {rank}'s load_shard returned a {result}; return (state, "
                            f"bytes_read): a dict of name -> tensor and an int")
        state, read = result
        if sorted(state) != sorted(full):
            missing, extra = sorted(set(full) - set(state)), sorted(set(state) - set(full))
            raise Incorrect(f"{case}: rank {rank}'s state is missing {missing} and has extra {extra}; "
                            f"every tensor of the file appears in every shard, under its own name")
        for name in full:
            got = state[name]
            if not isinstance(got, torch.Tensor):
                raise Incorrect(f"{case}: rank {rank}'s {name} is a {got}, not a tensor")
            if got.dtype != full[name].dtype:
                raise Incorrect(f"{case}: rank {rank}'s {name} is {got.dtype}; the file holds "
                                f"{full[name].dtype}: load the slice as it is stored")
            want, what = _expected_slice(name, full[name], tp, rank)
            if got.shape == want.shape and torch.equal(got, want):
                continue
            head = f"{case}: rank {rank}'s {name} holds {_where(name, got, full[name], tp)}, expected {what}"
            kind = split_dim(name)
            if kind is None:
                cause = "norms are small and every rank needs all of them: replicate, do not split"
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                cause = ("o_proj and down_proj are row-parallel: each rank holds the input columns that "
                         "match its slice of the previous layer's outputs, view[:, a:b]")
            else:
                cause = ("column-parallel and vocabulary-parallel weights are split by output rows "
                         "(view[a:b]): whole heads, MLP channels or vocabulary rows per rank")
            raise Incorrect(f"{head}: {cause}.")
        want_read = sum(_expected_slice(n, full[n], tp, rank)[0].numel() * 4 for n in full)
        if isinstance(read, bool) or not isinstance(read, numbers.Integral):
            raise Incorrect(f"{case}: rank {rank} reported bytes_read={read!r}; return an int")
        if read != want_read:
            cause = ("that counts elements; bytes are numel x element_size (4 for float32)"
                     if read * 4 == want_read else
                     "count the nbytes of every slice this rank read, replicated tensors included")
            raise Incorrect(f"{case}: rank {rank} reported {read} bytes read, its slices hold "
                            f"{want_read}: {cause}.")
    x = torch.linspace(-1, 1, SHAPES[_MLP[0]][1])
    full_out = _mlp(x, *(full[n] for n in _MLP))
    tp_out = sum(_mlp(x, *(state[n] for n in _MLP)) for state, _ in results)
    if not torch.allclose(tp_out, full_out, rtol=1e-4, atol=1e-3):
        raise Incorrect(f"{case}: the MLP computed from your shards (partial outputs summed, as the "
                        f"all-reduce does) differs from one process")


def _uneven_case(candidate, path) -> None:
    case = f"tp={UNEVEN_TP}, which divides none of the split dimensions"
    try:
        out = candidate(path, UNEVEN_TP, 0)
    except ValueError as err:
        if not any(name in str(err) for name in SHAPES):
            raise Incorrect(f"{case}: your ValueError says {str(err)!r}; name the tensor "
                            f"whose dimension tp does not divide") from None
        return
    except Exception as err:   # noqa: BLE001 - any other error is the learner's to see
        raise Incorrect(f"{case}: raised {type(err).__name__}: {err}; raise ValueError naming the "
                        f"tensor whose dimension tp does not divide") from None
    shapes = ""
    if isinstance(out, tuple) and out and isinstance(out[0], dict):
        got = out[0].get("layers.0.mlp.gate_proj.weight")
        if isinstance(got, torch.Tensor):
            rows = SHAPES["layers.0.mlp.gate_proj.weight"][0]
            lost = rows - got.shape[0] * UNEVEN_TP
            shapes = (f" (gate_proj has {rows} rows and rank 0 got {got.shape[0]}: {lost} "
                      f"{'row belongs' if lost == 1 else 'rows belong'} to no rank)")
    raise Incorrect(f"{case}: your loader returned shards instead of refusing{shapes}; a floor split "
                    f"silently drops rows: raise ValueError naming the tensor")


@exercise("04.shard_loader", "stretch: fix a sharded checkpoint loader")
def check_shard_loader(candidate):
    refuse_reference(candidate, load_tp_shard, split_dim, shard_bounds, expected_bytes_per_rank, _expected_slice)
    raise_if_stub(candidate)
    full = shard_checkpoint_state()
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "one_layer.safetensors")
        save_file(full, path)
        for tp in SHARD_WORLD_SIZES:
            case = f"tp={tp} (ranks 0..{tp - 1} each load their shard)"
            try:
                results = run_ranks(_load_on_rank, tp, candidate, path, what=case)
            except Incorrect as err:
                if "'safe_open'" in str(err):   # the class came by value and lost its methods
                    raise Incorrect(f"{err}. A function defined in a notebook reaches the ranks by "
                                    f"value, and safe_open imported on its own does not survive the "
                                    f"trip: `import safetensors` and call safetensors.safe_open(...)") from None
                raise
            _diagnose_shards(results, full, tp, case)
        _uneven_case(candidate, path)
    return ("every rank gets exactly its slices at tp = 3 and 4 (the TP MLP on them equals one "
            "process), reports the bytes it read, and tp = 5 is refused naming the tensor")
