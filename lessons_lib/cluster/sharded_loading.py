"""Sharded checkpoint loading: each tensor-parallel rank reads only its own slices.

A 70B-parameter model in bf16 is 140 GB; with TP = 8 each GPU needs 17.5 GB of it.
Reading the whole file on every rank and then slicing wastes 8x the disk and network
bandwidth and needs the whole model in host memory. safetensors stores each tensor
contiguously after a JSON header of names, dtypes, shapes and offsets, so a reader can
fetch just a slice: ``safe_open(path).get_slice(name)[rows]`` reads only those bytes
(the file is memory-mapped; untouched pages are never read).

Which slice a rank needs follows the Megatron-style plan of the tiny LM:

* column-parallel (``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``, ``up_proj``):
  weight ``(out, in)`` split by output rows, so each rank owns whole heads / whole
  MLP channels;
* row-parallel (``o_proj``, ``down_proj``): split by input columns, the partial
  outputs are all-reduced;
* vocab-parallel (``embed``, ``lm_head``): split by vocabulary rows;
* norms: small, replicated on every rank.

With grouped-query attention a model may have fewer KV heads than TP ranks (the tiny LM has 2).
Then, as lesson 12 serves it and as vLLM does, each KV head is *replicated*: ``tp`` must be a
multiple of ``n_kv_heads`` and rank ``r`` reads KV head ``r // (tp // n_kv_heads)`` of ``k_proj``
and ``v_proj`` (:func:`lessons_lib.parallel.tensor.shard_indices` with ``replicate=True``).

Bytes read by one rank are therefore ``(total - replicated) / tp + replicated`` when every split
divides evenly, more when KV heads are replicated (:func:`expected_bytes_per_rank`).

Bytes are not I/O, though. A row slice (dim 0) of a row-major tensor is one contiguous byte range,
so its pages are a ``1/tp`` share of the tensor's. A column slice (dim 1, the row-parallel
``o_proj`` and ``down_proj``) takes a piece of *every* row: when a row is shorter than a page,
every page of the tensor holds some of it, and the operating system reads whole pages.
:func:`pages_touched` counts them, so "sharded loading divides the I/O by tp" is true of dim-0
splits only; a checkpoint stored pre-sharded, one file per TP rank, makes every read contiguous.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from safetensors import safe_open

from ..model.checkpoint import CheckpointError, CheckpointNotFoundError
from ..parallel.tensor import shard_indices
from ..validate import check_int

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
VOCAB_PARALLEL = ("embed", "lm_head")


def split_dim(name: str) -> int | None:
    """The dimension along which TP splits tensor ``name``: 0 (rows), 1 (columns) or None (replicated)."""
    parts = name.split(".")
    if any(part in COLUMN_PARALLEL for part in parts) or parts[0] in VOCAB_PARALLEL:
        return 0
    if any(part in ROW_PARALLEL for part in parts):
        return 1
    if "norm" in name:
        return None
    raise ValueError(f"no tensor-parallel rule for tensor {name!r}: expected a Llama-style name "
                     f"({COLUMN_PARALLEL + ROW_PARALLEL + VOCAB_PARALLEL} or a norm)")


@contextmanager
def open_checkpoint(path):
    """``safe_open(path)``, with a missing or unreadable file reported by name, not as a raw
    ``SafetensorError``; errors raised inside the block pass through unchanged."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: checkpoint file not found")
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:   # safetensors' own error type, or OSError
        raise CheckpointError(f"{path}: not a readable safetensors file, it may be truncated or "
                              f"corrupt ({type(e).__name__}: {e})") from None
    with f:
        yield f


def _check_ranks(tp: int, tp_rank: int | None = None) -> None:
    check_int("tp", tp, low=1, why="the tensor-parallel size")
    if tp_rank is not None:
        check_int("tp_rank", tp_rank, low=0, high=tp - 1, why=f"a rank of the tp={tp} group")


def _config(path, meta: dict) -> dict | None:
    try:
        config = json.loads(meta["config"]) if "config" in meta else None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the config in the file's metadata is not valid JSON ({e})") from None
    return config if isinstance(config, dict) else None


KV_PROJ = ("k_proj", "v_proj")


def _kv_replicated(name: str, tp: int, config: dict | None) -> bool:
    """Whether ``name`` is a K or V projection whose heads are fewer than the TP ranks."""
    return (bool(config) and any(part in KV_PROJ for part in name.split("."))
            and tp > config.get("n_kv_heads", tp))


def _check_tp(tp: int, shapes: dict, config: dict | None) -> None:
    if config:   # split by whole attention heads, never through the middle of one
        n = config.get("n_heads", tp)
        if n % tp:
            raise ValueError(f"tp={tp} does not divide n_heads={n}: choose tp among "
                             f"{[d for d in range(1, n + 1) if n % d == 0]}")
        kv = config.get("n_kv_heads", tp)
        if kv % tp and tp % kv:
            valid = [d for d in range(1, n + 1) if n % d == 0 and (kv % d == 0 or d % kv == 0)]
            raise ValueError(f"tp={tp} neither divides n_kv_heads={kv} nor is a multiple of it: "
                             f"choose tp among {valid} (past {kv}, each KV head is replicated)")
    for name, shape in shapes.items():
        dim = split_dim(name)
        if dim is not None and shape[dim] % tp and not _kv_replicated(name, tp, config):
            raise ValueError(f"tp={tp} does not divide dimension {dim} of {name} (shape {list(shape)})")


def _rows(name: str, size: int, tp: int, tp_rank: int, config: dict | None) -> slice:
    """The dim-0 (or dim-1) range rank ``tp_rank`` reads of a split tensor of ``size`` there."""
    if _kv_replicated(name, tp, config):
        kv = config["n_kv_heads"]
        index = shard_indices(size, tp, tp_rank, unit=size // kv, name="n_kv_heads", replicate=True)
        return slice(int(index[0]), int(index[-1]) + 1)
    return shard_bounds(size, tp, tp_rank)


def shard_bounds(size: int, tp: int, tp_rank: int) -> slice:
    per = size // tp
    return slice(tp_rank * per, (tp_rank + 1) * per)


def load_tp_shard(path, tp: int, tp_rank: int) -> tuple[dict, int]:
    """Read rank ``tp_rank``'s slices of every tensor in the safetensors file ``path``.

    Returns ``(state, bytes_read)``: ``state`` maps each name to this rank's shard
    (replicated tensors whole), ``bytes_read`` is the sum of the ``nbytes`` of the
    slices read.
    """
    _check_ranks(tp, tp_rank)
    state, read = {}, 0
    with open_checkpoint(path) as f:
        config = _config(path, f.metadata() or {})
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        _check_tp(tp, shapes, config)
        for name, shape in shapes.items():
            view = f.get_slice(name)   # header only: no tensor bytes read yet
            dim = split_dim(name)
            if dim is None:
                tensor = view[:]
            elif dim == 0:
                tensor = view[_rows(name, shape[0], tp, tp_rank, config)]
            else:
                tensor = view[:, _rows(name, shape[1], tp, tp_rank, config)]
            state[name] = tensor
            read += tensor.nbytes
    return state, read


def expected_bytes_per_rank(path, tp: int) -> dict:
    """From the header alone: total bytes, replicated bytes (the norms), the bytes of replicated
    KV heads one rank reads, and what one TP rank must read in all."""
    _check_ranks(tp)
    total = replicated = per_rank = kv_heads = 0
    with open_checkpoint(path) as f:
        config = _config(path, f.metadata() or {})
        for name in f.keys():
            view = f.get_slice(name)
            n = 1
            for s in view.get_shape():
                n *= s
            nbytes = n * _itemsize(view.get_dtype())
            total += nbytes
            if split_dim(name) is None:
                replicated += nbytes
                per_rank += nbytes
            elif _kv_replicated(name, tp, config):
                kv_heads += nbytes // config["n_kv_heads"]
                per_rank += nbytes // config["n_kv_heads"]
            else:
                per_rank += nbytes // tp
    return {"total": total, "replicated": replicated, "kv_replicated": kv_heads, "per_rank": per_rank}


def pages_touched(path, tp: int, tp_rank: int, page_size: int = 4096) -> dict:
    """Distinct ``page_size`` pages of the file that rank ``tp_rank``'s slices lie on, from the header.

    Returns ``{"pages": this rank's pages, "file_pages": the file's, "by_dim": {0: ..., 1: ...,
    None: ...}}``, the last counting each kind of split separately (dim 0: rows, 1: columns,
    None: replicated). A memory-mapped read brings in whole pages, so this, not the bytes of the
    slices, is the I/O.
    """
    _check_ranks(tp, tp_rank)
    check_int("page_size", page_size, low=1)
    path = Path(path)
    with open(path, "rb") as raw:
        header_len = int.from_bytes(raw.read(8), "little")
        header = json.loads(raw.read(header_len))
    base = 8 + header_len
    meta = header.pop("__metadata__", {}) or {}
    config = _config(path, meta)
    _check_tp(tp, {name: tuple(h["shape"]) for name, h in header.items()}, config)
    pages: set = set()
    by_dim: dict = {0: set(), 1: set(), None: set()}

    def add(dim, start: int, end: int) -> None:   # bytes [start, end) of the file
        span = range(start // page_size, (end - 1) // page_size + 1)
        pages.update(span)
        by_dim[dim].update(span)

    for name, h in header.items():
        start, end = (base + o for o in h["data_offsets"])
        shape, item = h["shape"], _itemsize(h["dtype"])
        dim = split_dim(name)
        if dim is None:
            add(None, start, end)
        elif dim == 0:
            row = (end - start) // shape[0]
            rows = _rows(name, shape[0], tp, tp_rank, config)
            add(0, start + rows.start * row, start + rows.stop * row)
        else:
            row = shape[1] * item
            cols = _rows(name, shape[1], tp, tp_rank, config)
            for r in range(shape[0]):
                add(1, start + r * row + cols.start * item, start + r * row + cols.stop * item)
    file_pages = (path.stat().st_size - 1) // page_size + 1
    return {"pages": len(pages), "file_pages": file_pages, "by_dim": {k: len(v) for k, v in by_dim.items()}}


def _itemsize(dtype: str) -> int:
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    if dtype not in sizes:
        raise ValueError(f"unsupported safetensors dtype {dtype!r}")
    return sizes[dtype]
