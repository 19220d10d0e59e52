"""Arguments that must agree across ranks, checked across ranks before any data moves.

Ranks that disagree about a collective's arguments do not get an error from it. Two ranks
that each believe they are a broadcast's root both send and wait for ever; an all-gather of
different shapes or dtypes makes gloo abort the process, its message on raw stderr only;
pipeline stages cut different batches and fail deep inside the model. So a function whose
arguments must agree first sends its view of them to every rank of the group, and every rank
raises the same error, naming the argument, the ranks that differ and what each had::

    src differs across ranks: rank 0 has src=0, rank 1 has src=1; every rank must pass the same src

The cost is one all-gather of a small fixed-size int64 record per call (1 KiB per rank): one
message latency, nothing next to any payload. The record's size never depends on the values,
so the check itself cannot mismatch, even between ranks that disagree about the number of
dimensions, or that are in different calls altogether (that is reported too).
"""

from __future__ import annotations

import numbers
import zlib

import torch
import torch.distributed as dist

from ..validate import BadArgument

__all__ = ["RanksDisagree", "check_same_across_ranks", "describe", "gather_across_ranks", "group_ranks",
           "require_same"]

RECORD_LEN = 128          # int64 slots per rank
_INT64 = range(-2 ** 63, 2 ** 63)
_MAGIC = 0x61677265       # "agre": marks a record written by this module
_NONE, _INT, _DTYPE, _SHAPE, _STR, _REPR = range(6)
_REPR_CHARS = 48          # an unexpected value travels as the start of its repr
# Every dtype torch names, in a fixed order, so a dtype travels as its index.
_DTYPES = list(dict.fromkeys(getattr(torch, n) for n in sorted(dir(torch))
                             if isinstance(getattr(torch, n), torch.dtype)))


class RanksDisagree(BadArgument):
    """Ranks passed different values for an argument that must be the same on every rank."""


def group_ranks(group=None) -> tuple[int, int, list[int]]:
    """(my rank in ``group``, group size, global rank of each member)."""
    if not dist.is_initialized():
        raise RuntimeError("no process group: call this inside run_distributed (or after init_process_group)")
    group = group if group is not None else dist.group.WORLD
    me = dist.get_rank(group)
    ranks = dist.get_process_group_ranks(group)
    if me < 0:
        raise ValueError(f"group does not contain the calling rank (global rank {dist.get_rank()}): "
                         f"its ranks are {ranks}; call the collective only on members of group")
    return me, len(ranks), ranks


def _pack_str(text: str) -> list[int]:
    data = text.encode()
    # 7 bytes per slot keeps every slot a non-negative int64.
    return [len(data)] + [int.from_bytes(data[i:i + 7], "little") for i in range(0, len(data), 7)]


def _unpack_str(slots: list[int], at: int) -> tuple[str, int]:
    n = slots[at]
    words = slots[at + 1: at + 1 + (n + 6) // 7]
    data = b"".join(w.to_bytes(7, "little") for w in words)[:n]
    return data.decode(errors="replace"), at + 1 + len(words)


def _encode(value) -> list[int]:
    if value is None:
        return [_NONE]
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value in _INT64:
        return [_INT, int(value)]
    if isinstance(value, torch.dtype):
        return [_DTYPE, _DTYPES.index(value)]
    if isinstance(value, (tuple, torch.Size)) and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v in _INT64 for v in value):
        return [_SHAPE, len(value)] + [int(v) for v in value]
    if isinstance(value, str):
        return [_STR] + _pack_str(value)
    return [_REPR] + _pack_str(repr(value)[:_REPR_CHARS])


class _Shown(str):
    """A value known only by its repr (another rank's float, list, ...): shown as it was."""

    def __repr__(self) -> str:
        return str(self)


def _decode(slots: list[int], at: int):
    kind = slots[at]
    if kind == _NONE:
        return None, at + 1
    if kind == _INT:
        return slots[at + 1], at + 2
    if kind == _DTYPE:
        return _DTYPES[slots[at + 1]], at + 2
    if kind == _SHAPE:
        n = slots[at + 1]
        return tuple(slots[at + 2: at + 2 + n]), at + 2 + n
    text, at = _unpack_str(slots, at + 1)
    return (text if kind == _STR else _Shown(text)), at


_HEAD = 3   # magic, overflow flag, signature of the argument names; then the call's name


def _record(call: str, values: dict) -> torch.Tensor:
    # Ranks decode each other's values by their own list of names: the signature makes sure
    # those lists are the same before anything is decoded.
    signature = zlib.crc32("\0".join(values).encode())
    body = _pack_str(call)
    for value in values.values():
        body += _encode(value)
    overflow = len(body) > RECORD_LEN - _HEAD
    slots = [_MAGIC, int(overflow), signature] + (_pack_str(call) if overflow else body)
    return torch.tensor(slots + [0] * (RECORD_LEN - len(slots)), dtype=torch.int64)


def _rank_list(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def gather_across_ranks(values: dict, group=None, *, call: str) -> tuple[list[int], list[dict]]:
    """Every rank's ``values``, after one all-gather: ``(global ranks, values per group rank)``.

    ``values`` maps names to ints, None, dtypes, shapes (tuples of ints) or short strings; ``call``
    names the function, so ranks in different calls are told so instead of compared. Raises
    :class:`RanksDisagree` on every rank when the calls differ.
    """
    _, p, ranks = group_ranks(group)
    mine = _record(call, values)
    everyone = [torch.empty_like(mine) for _ in range(p)]
    dist.all_gather(everyone, mine, group=group)
    records = [e.tolist() for e in everyone]
    calls = [_unpack_str(rec, _HEAD)[0] if rec[0] == _MAGIC else "another collective" for rec in records]
    if len(set(calls)) > 1:
        where = "; ".join(f"{_rank_list([ranks[r] for r in range(p) if calls[r] == c])} in {c}"
                          for c in dict.fromkeys(calls))
        raise RanksDisagree(f"ranks are in different calls: {where}; every rank of the group must make the "
                            "same collective calls in the same order")
    if len({rec[2] for rec in records}) > 1:
        raise RanksDisagree(f"ranks called {call} with different sets of arguments: every rank must pass the "
                            "same arguments (a tensor on one rank cannot be None on another)")
    too_long = [ranks[r] for r in range(p) if records[r][1]]
    if too_long:
        raise RanksDisagree(f"the arguments of {call} on {_rank_list(too_long)} are too long to compare "
                            f"across ranks (over {RECORD_LEN} int64 slots)")
    gathered = []
    for rec in records:
        at, got = _unpack_str(rec, _HEAD)[1], {}
        for name in values:
            got[name], at = _decode(rec, at)
        gathered.append(got)
    return ranks, gathered


def describe(name: str, t) -> dict:
    """What the other ranks need to know of the tensor argument ``name`` (its type, dtype, shape,
    layout), as values for :func:`gather_across_ranks`; a non-tensor travels as its type's name."""
    if not isinstance(t, torch.Tensor):
        return {name: type(t).__name__, f"{name}.dtype": None, f"{name}.shape": None,
                f"{name}.is_contiguous()": None}
    return {name: "Tensor", f"{name}.dtype": t.dtype, f"{name}.shape": tuple(t.shape),
            f"{name}.is_contiguous()": int(t.is_contiguous())}


def _shown(value) -> str:
    return str(value) if isinstance(value, torch.dtype) else repr(value)


def require_same(name: str, per_rank: list, ranks: list[int], hint: str = "") -> None:
    """Raise :class:`RanksDisagree` unless ``per_rank`` (one value per group rank) holds one value.

    No communication: call it on every rank with what :func:`gather_across_ranks` returned, and
    every rank raises the same error.
    """
    shown = [_shown(v) for v in per_rank]
    if len(set(shown)) == 1:
        return
    parts = [f"{_rank_list([ranks[r] for r in range(len(shown)) if shown[r] == s])} "
             f"{'has' if shown.count(s) == 1 else 'have'} {name}={s}" for s in dict.fromkeys(shown)]
    raise RanksDisagree(f"{name} differs across ranks: {', '.join(parts)}; every rank must pass the same "
                        f"{name}{hint}")


def check_same_across_ranks(values: dict, group=None, *, call: str, hint: str = "") -> None:
    """Raise the same :class:`RanksDisagree` on every rank of ``group`` unless every rank passed
    the same ``values`` (a dict of name to value; see :func:`gather_across_ranks`)."""
    ranks, gathered = gather_across_ranks(values, group, call=call)
    for name in values:
        require_same(name, [g[name] for g in gathered], ranks, hint)
