"""Checkers for notebook 09 (compression): int4 bytes on a tensor-parallel rank, per-group int4
quantisation with its error bound, and the shards of a row-parallel int4 layer."""

from __future__ import annotations

import functools
import numbers

import torch
import torch.nn as nn

from ..compression import quantization
from ..compression.quantization import (Int4Linear, dequantize_int4, linear_weight_bytes,
                                        quantize_int4, quantize_model)
from ..comm.schedule import chunk_bounds
from ..parallel.data import row_range, split_sizes
from ..parallel.tensor import shard_indices
from .check import (PREDICT_TOLERANCE, Incorrect, exercise, judge_prediction, labelled_cases,
                    refuse_reference, run_ranks, with_hidden)

# -- predict: the bytes one tensor-parallel rank holds for an int4 layer ------------------
TP_RANKS, OUT_FEATURES, IN_FEATURES, GROUP_SIZE = 4, 11008, 4096, 128


@functools.lru_cache(maxsize=1)
def measured_int4_shard_bytes() -> int:
    """Quantise one rank's column-parallel shard with ``Int4Linear`` and count its stored bytes."""
    shard = nn.Linear(IN_FEATURES, OUT_FEATURES // TP_RANKS, bias=False)
    return linear_weight_bytes(Int4Linear.from_float(shard, GROUP_SIZE))


def _shard_mistakes() -> list[tuple[float, str]]:
    rows, cols = OUT_FEATURES // TP_RANKS, IN_FEATURES
    codes = rows * cols // 2                              # two 4-bit codes per byte
    pairs = rows * (cols // GROUP_SIZE) * 2 * 2           # a bfloat16 scale and zero per group
    return [
        (TP_RANKS * (codes + pairs), f"That is the whole layer: column parallelism gives each of the "
         f"{TP_RANKS} ranks {rows} of the {OUT_FEATURES} output rows"),
        (rows * cols + pairs, "That stores one code per byte: int4 packs two 4-bit codes in each byte"),
        (codes, "That counts the packed codes only: every group of "
         f"{GROUP_SIZE} inputs of every row also stores a bfloat16 scale and a bfloat16 zero"),
        (codes + pairs // 2, "That counts a scale per group but not its zero: the CPU kernel "
         "stores a (scale, zero) pair per group, 2 bytes each"),
        (codes + 2 * pairs, "That stores the scales and zeros in float32: they are bfloat16, 2 bytes each"),
        (8 * (codes + pairs), "That is bits, not bytes: divide by 8"),
        (rows * cols * 4, "That is the shard in float32, before quantisation"),
        (rows * cols * 2, "That is the shard in bfloat16, before quantisation"),
    ]


@exercise("09.int4_shard_bytes", "predict: bytes of one TP rank's int4 shard of an MLP projection")
def check_int4_shard_bytes(candidate):
    refuse_reference(candidate, measured_int4_shard_bytes, Int4Linear, linear_weight_bytes,
                     quantize_model, quantize_int4)
    guess = candidate()
    judge_prediction(guess, measured_int4_shard_bytes(), _shard_mistakes(), "bytes",
                     "Add it up part by part: what is stored per weight, and what per group of "
                     "inputs of each row?")
    return (f"within {PREDICT_TOLERANCE:.0%} of the bytes Int4Linear stores for a "
            f"{OUT_FEATURES // TP_RANKS} x {IN_FEATURES} shard")


# -- build: per-group int4 quantisation with its error bound ------------------------------
QMAX = 7


def _int4_cases() -> list[tuple[str, torch.Tensor, int]]:
    g = torch.Generator().manual_seed(9)
    a = torch.randn(4, 16, generator=g) * 0.5
    a[1, 3] = 6.0                          # an outlier in row 1, group 0: group 1 keeps a fine scale
    a[2, :8] = a[2, :8].abs() * 0.3
    a[2, 5] = -3.0                         # row 2, group 0: its largest magnitude is negative
    a[3, 8:] = 0.0                         # row 3, group 1: all zeros
    b = torch.randn(3, 24, generator=g)    # 6 groups of 4 per row
    c = torch.randn(5, 32, generator=g) * 0.01   # one group per row
    return [("w of shape (4, 16), group_size=8", a, 8), ("w of shape (3, 24), group_size=4", b, 4),
            ("w of shape (5, 32), group_size=32", c, 32)]


def _int4_hidden_cases() -> list[tuple[str, torch.Tensor, int]]:
    """Grading only: another seed and dtype, and a weight that is a transposed view."""
    g = torch.Generator().manual_seed(19)
    d = torch.randn(2, 12, generator=g, dtype=torch.float64) * 3
    e = torch.randn(8, 6, generator=g).T    # (6, 8), not contiguous: w.view(...) fails, reshape works
    return [("w of shape (2, 12) float64, group_size=3", d, 3),
            ("w of shape (6, 8), a transposed view (not contiguous), group_size=4", e, 4)]


def _where(row: int, group: int, g: int) -> str:
    return f"row {row}, group {group} (inputs {group * g}..{group * g + g - 1})"


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def _check_scales(case: str, w: torch.Tensor, g: int, scales: torch.Tensor) -> None:
    w = w.float()   # scales are compared in float32, whatever the weight's dtype
    out, n = w.shape
    groups = w.reshape(out, n // g, g)
    amax = groups.abs().amax(dim=2)
    expected = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    got = scales.detach().float()
    bad = ~torch.isfinite(got) | (got <= 0)
    if bad.any():
        r, j = _first(bad)
        zero = bool(amax[r, j] == 0)
        raise Incorrect(f"{case}: the scale of {_where(r, j, g)} is {got[r, j].item()}"
                        + (": that group is all zeros, so max|w| / 7 = 0 and w / scale = 0 / 0 = NaN. "
                           "Give an all-zero group scale 1 (its codes are all 0)" if zero else
                           ": every scale must be a positive, finite number"))
    nonzero = amax > 0
    off = nonzero & ~torch.isclose(got, expected, rtol=1e-2, atol=0)
    if not off.any():
        return
    r, j = _first(off)
    said = (f"{case}: the scale of {_where(r, j, g)} is {got[r, j].item():.4g}, expected "
            f"max|w| / 7 = {expected[r, j].item():.4g}")

    def like(other: torch.Tensor) -> bool:
        return bool(torch.allclose(got[nonzero], other[nonzero], rtol=1e-2, atol=0))

    if like(groups.amax(dim=2) / QMAX):
        raise Incorrect(f"{said}. You took max(w), not max(|w|): in {_where(r, j, g)} the largest "
                        "magnitude is a negative weight, and its code would fall below -7")
    if like(w.abs().amax(dim=1, keepdim=True).expand_as(amax) / QMAX):
        raise Incorrect(f"{said}. That is one scale per row: every group of {g} consecutive inputs "
                        "needs its own max|w| / 7, so one outlier coarsens only its group")
    if like(w.reshape(out, g, n // g).abs().amax(dim=1) / QMAX):
        raise Incorrect(f"{said}. Your groups are strided (inputs j, j + {n // g}, j + {2 * n // g}, ...): group j is the "
                        f"{g} consecutive inputs j*{g} .. j*{g}+{g - 1}, i.e. w.reshape(out, in // {g}, {g})")
    for qmax, why in ((127, "127 is int8's largest code; int4's is 7"),
                      (8, "symmetric int4 uses the codes -7..7, so the scale is max|w| / 7"),
                      (15, "15 is the largest unsigned 4-bit code; symmetric int4 uses -7..7"),
                      (16, "int4 has 16 codes, but the symmetric ones are -7..7: divide by 7")):
        if like(amax / qmax):
            raise Incorrect(f"{said}: you divided by {qmax}. {why}")
    raise Incorrect(f"{said}.")


def _check_int4(candidate, case: str, w: torch.Tensor, g: int) -> None:
    out, n = w.shape
    given = w.clone()
    try:
        result = candidate(given, g)
    except NotImplementedError:
        raise
    except Exception as exc:  # noqa: BLE001 - a learner's error is a hint that names the case
        view = (": w is a view with other strides here; w.reshape(...) copies when it must, "
                "w.view(...) cannot" if "view" in str(exc) and not w.is_contiguous() else "")
        raise Incorrect(f"{case}: your code raised {type(exc).__name__}: {exc}{view}") from None
    if not torch.equal(given, w):
        raise Incorrect(f"{case}: your function changed w in place; quantising must leave the weight alone")
    if not (isinstance(result, tuple) and len(result) == 2):
        raise Incorrect(f"{case}: return a tuple (q, scales); got {type(result).__name__}")
    q, scales = result
    if not isinstance(q, torch.Tensor) or tuple(q.shape) != (out, n):
        raise Incorrect(f"{case}: q must be a tensor of shape {(out, n)}, one code per weight; got "
                        f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    if q.dtype != torch.int8:
        raise Incorrect(f"{case}: q has dtype {q.dtype}; store the rounded codes as torch.int8 "
                        "(.to(torch.int8) after rounding and clamping)")
    if not isinstance(scales, torch.Tensor) or not scales.is_floating_point():
        raise Incorrect(f"{case}: scales must be a floating-point tensor; got "
                        f"{getattr(scales, 'dtype', type(scales).__name__)}")
    if scales.dtype in (torch.bfloat16, torch.float16):
        raise Incorrect(f"{case}: scales has dtype {scales.dtype}; return them in float32. A 16-bit "
                        "scale is rounded (bfloat16 keeps 8 significant bits), so it is no longer "
                        "max|w| / 7, and a code computed from the unrounded scale may miss the bound")
    want = (out, n // g)
    if tuple(scales.shape) != want:
        shape = tuple(scales.shape)
        why = ""
        if shape in ((out,), (out, 1)):
            why = " That is one scale per row: int4 needs one per group of inputs."
        elif shape == (out, g):
            why = (f" You have {g} scales per row: a row of {n} inputs in groups of {g} has "
                   f"{n} // {g} = {n // g} groups.")
        elif shape == (n // g, out):
            why = " That is transposed: rows first, then groups."
        raise Incorrect(f"{case}: scales has shape {shape}, expected {want}: one scale per row and "
                        f"group of {g} consecutive inputs.{why}")
    lo, hi = int(q.min()), int(q.max())
    if lo < -QMAX or hi > QMAX:
        if lo == -8 and hi <= QMAX:
            why = ("-8 is a valid 4-bit value, but symmetric quantisation uses -7..7 so that "
                   "+max and -max are both exact: clamp to [-7, 7]")
        elif hi > 15:
            why = "those are int8 codes: int4 stores -7..7, scale max|w| / 7"
        else:
            why = "symmetric int4 codes are -7..7 (scale = max|w| / 7, then round and clamp)"
        raise Incorrect(f"{case}: codes range over [{lo}, {hi}]; {why}")
    _check_scales(case, w, g, scales)
    s = scales.detach().float().repeat_interleave(g, dim=1)
    err = (w - q.float() * s).abs()
    over = err > s / 2 * (1 + 1e-4) + 1e-12
    if over.any():
        r, c = _first(over)
        truncated = torch.trunc(w / s).clamp(-QMAX, QMAX)
        why = (" The codes were truncated toward zero: round to the nearest code (torch.round) so "
               "the error is at most half a step" if torch.equal(q.float(), truncated) else
               " Round w / scale to the nearest integer, then clamp to [-7, 7]")
        raise Incorrect(f"{case}: weight [{r}, {c}] = {w[r, c].item():.4g} got code {int(q[r, c])}, "
                        f"which dequantises to {(q[r, c] * s[r, c]).item():.4g}: an error of "
                        f"{err[r, c].item():.3g} > scale / 2 = {s[r, c].item() / 2:.3g}.{why}")


@exercise("09.quantize_int4", "build: symmetric int4 with one scale per group of inputs")
def check_quantize_int4(candidate, hidden=False):
    refuse_reference(candidate, quantize_int4, dequantize_int4, Int4Linear, quantize_model,
                     quantization._stored_scale)
    hidden_cases = _int4_hidden_cases() if hidden else []
    for label, (case, w, g) in labelled_cases(_int4_cases(), hidden_cases, hidden):
        _check_int4(candidate, f"{label}{case}", w, g)
    return with_hidden("codes in [-7, 7], one scale max|w| / 7 per group, every weight within scale / 2 "
                       "(an outlier, a negative maximum and an all-zero group included)", hidden_cases, hidden)


# -- stretch: the shards of a row-parallel int4 layer -------------------------------------
# (in_features, group_size, world_size): 8 groups on 3 ranks, 10 on 4, 2 on 3 (one rank has
# none), 8 on 2.
SHARD_CASES = ((64, 8, 3), (80, 8, 4), (16, 8, 3), (64, 8, 2))
SHARD_OUT = 4


def _shard_case(in_features: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(in_features)
    w = torch.randn(SHARD_OUT, in_features, generator=g)
    q, scales = quantize_int4(w, group_size, scale_dtype=torch.float32)
    x = torch.randn(2, in_features, generator=g)
    return q, scales, x


def _row_parallel_rank(candidate, q, scales, group_size, x):
    """One rank of a row-parallel int4 matmul: the learner's shard, its partial product, the sum.

    Every rank joins the all-reduce whatever its shard, so a wrong shard is reported as data."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    partial = torch.zeros(x.shape[0], q.shape[0])
    try:
        shard = candidate(q.clone(), scales.clone(), group_size, rank, world)
    except NotImplementedError:
        shard, failure = None, "stub"
    except Exception as exc:  # noqa: BLE001 - reported to the checker as a hint
        shard, failure = None, f"{type(exc).__name__}: {exc}"
    else:
        failure = None
        try:
            q_s, s_s, (start, stop) = shard
            w_s = q_s.float() * s_s.float().repeat_interleave(group_size, dim=1)
            partial = x[:, start:stop] @ w_s.t()
        except Exception:  # noqa: BLE001 - the checker names what is wrong with the shard
            partial = torch.zeros(x.shape[0], q.shape[0])
    dist.all_reduce(partial)
    return shard, failure, partial


def _describe(start: int, stop: int, g: int) -> str:
    return f"columns {start}..{stop - 1}" if stop > start else "no columns"


def _check_shards(case: str, q, scales, g: int, world: int, results) -> None:
    n = q.shape[1]
    n_groups = n // g
    spans = []
    for rank, (shard, failure, _) in enumerate(results):
        if failure == "stub":
            raise NotImplementedError()
        if failure:
            raise Incorrect(f"{case}: rank {rank} raised {failure}")
        if not (isinstance(shard, (tuple, list)) and len(shard) == 3):
            raise Incorrect(f"{case}: rank {rank} returned {type(shard).__name__}; return "
                            "(q_shard, scales_shard, (start, stop))")
        q_s, s_s, span = shard
        if not (isinstance(span, (tuple, list)) and len(span) == 2
                and all(isinstance(v, numbers.Integral) for v in span)):
            raise Incorrect(f"{case}: rank {rank}'s third value is {span!r}; return the input "
                            "columns it holds as a pair of ints (start, stop)")
        start, stop = int(span[0]), int(span[1])
        if not 0 <= start <= stop <= n:
            raise Incorrect(f"{case}: rank {rank} claims columns ({start}, {stop}), outside 0..{n}")
        if not (isinstance(q_s, torch.Tensor) and isinstance(s_s, torch.Tensor)):
            raise Incorrect(f"{case}: rank {rank}'s q_shard and scales_shard must be tensors")
        by_column = scales[:, start:stop]
        if stop > start and s_s.shape == by_column.shape and torch.equal(s_s, by_column) \
                and by_column.shape[1] != stop // g - start // g:
            raise Incorrect(
                f"{case}: rank {rank} holds {_describe(start, stop, g)} but took scales[:, {start}:{stop}], "
                f"sliced by input column. scales has one column per group of {g} inputs "
                f"({n_groups} in all), so slice it by group index: scales[:, start // {g} : stop // {g}]")
        if start % g or (stop % g and stop != n):
            cut = start if start % g else stop
            first = cut // g * g
            raise Incorrect(f"{case}: rank {rank} holds {_describe(start, stop, g)}, which cuts group "
                            f"{cut // g} (columns {first}..{first + g - 1}) in two. A group shares one "
                            "scale and the int4 kernel works on whole groups: split the groups "
                            "between ranks, not the columns")
        if tuple(q_s.shape) != (q.shape[0], stop - start) or not torch.equal(q_s, q[:, start:stop]):
            raise Incorrect(f"{case}: rank {rank}'s q_shard has shape {tuple(q_s.shape)}; for "
                            f"{_describe(start, stop, g)} it should be q[:, {start}:{stop}], shape "
                            f"{(q.shape[0], stop - start)}")
        want = scales[:, start // g: stop // g]
        if tuple(s_s.shape) != tuple(want.shape) or not torch.equal(s_s, want):
            raise Incorrect(f"{case}: rank {rank}'s scales_shard has shape {tuple(s_s.shape)}; for "
                            f"{_describe(start, stop, g)} it should be the scales of groups "
                            f"{start // g}..{stop // g - 1}: scales[:, {start // g}:{stop // g}], shape "
                            f"{tuple(want.shape)}")
        spans.append((start, stop))
    edge = 0
    for rank, (start, stop) in enumerate(spans):
        if start > edge:
            raise Incorrect(f"{case}: columns {edge}..{start - 1} (groups {edge // g}..{start // g - 1}) "
                            f"belong to no rank: rank {rank} starts at column {start}")
        if start < edge:
            raise Incorrect(f"{case}: rank {rank} starts at column {start}, but columns {start}..{edge - 1} "
                            "are already held by a lower rank: shards must not overlap, in rank order")
        edge = stop
    if edge < n:
        raise Incorrect(f"{case}: columns {edge}..{n - 1} (groups {edge // g}..{n_groups - 1}) belong to "
                        f"no rank: shards per rank {[(b - a) // g for a, b in spans]} groups. Rounding "
                        f"{n_groups} / {world} down drops the remainder; give the first "
                        f"{n_groups} % {world} ranks one extra group")
    counts = [(b - a) // g for a, b in spans]
    if max(counts) - min(counts) > 1:
        raise Incorrect(f"{case}: groups per rank {counts}: rank {counts.index(max(counts))} has "
                        f"{max(counts)} groups and rank {counts.index(min(counts))} has {min(counts)}. The busiest "
                        f"rank sets the layer's time: give each rank {n_groups} // {world} groups and "
                        f"the first {n_groups} % {world} ranks one more")


@exercise("09.int4_row_shard", "stretch: fix the shards of a row-parallel int4 layer")
def check_int4_row_shard(candidate):
    refuse_reference(candidate, quantize_int4, dequantize_int4, Int4Linear, quantize_model,
                     shard_indices, chunk_bounds, row_range, split_sizes)
    for n, g, world in SHARD_CASES:
        q, scales, x = _shard_case(n, g)
        try:   # the answer is a pure function: a stub is seen here, without starting ranks
            candidate(q.clone(), scales.clone(), g, 0, world)
        except NotImplementedError:
            raise
        except Exception:  # noqa: BLE001 - the ranks run it again and report the error with its case
            pass
        case = f"in_features={n}, group_size={g} ({n // g} groups) on {world} ranks"
        results = run_ranks(_row_parallel_rank, world, candidate, q, scales, g, x, what=case)
        _check_shards(case, q, scales, g, world, results)
        want = x @ dequantize_int4(q, scales).t()
        for rank, (_, _, y) in enumerate(results):
            if not torch.allclose(y, want, atol=1e-4, rtol=1e-4):
                raise Incorrect(f"{case}: after the all-reduce rank {rank} has y differing from "
                                f"x @ W.T by {(y - want).abs().max().item():.3g}")
    return ("whole groups per rank, scales sliced by group, balanced with a rank of no groups: "
            "the all-reduced partial products equal the full int4 matmul")
