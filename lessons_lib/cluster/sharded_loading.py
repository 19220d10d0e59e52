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

Bytes read by one rank are therefore ``(total - replicated) / tp + replicated``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from safetensors import safe_open

from ..model.checkpoint import CheckpointError, CheckpointNotFoundError
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


def _check_tp(tp: int, shapes: dict, config: dict | None) -> None:
    if config:   # split by whole attention heads, never through the middle of one
        for key in ("n_heads", "n_kv_heads"):
            if config.get(key, tp) % tp:
                n = config[key]
                raise ValueError(f"tp={tp} does not divide {key}={n}: choose tp among "
                                 f"{[d for d in range(1, n + 1) if n % d == 0]}")
    for name, shape in shapes.items():
        dim = split_dim(name)
        if dim is not None and shape[dim] % tp:
            raise ValueError(f"tp={tp} does not divide dimension {dim} of {name} (shape {list(shape)})")


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
                tensor = view[shard_bounds(shape[0], tp, tp_rank)]
            else:
                tensor = view[:, shard_bounds(shape[1], tp, tp_rank)]
            state[name] = tensor
            read += tensor.nbytes
    return state, read


def expected_bytes_per_rank(path, tp: int) -> dict:
    """From the header alone: total bytes, replicated bytes, and what one TP rank must read."""
    _check_ranks(tp)
    total = replicated = 0
    with open_checkpoint(path) as f:
        for name in f.keys():
            view = f.get_slice(name)
            n = 1
            for s in view.get_shape():
                n *= s
            nbytes = n * _itemsize(view.get_dtype())
            total += nbytes
            if split_dim(name) is None:
                replicated += nbytes
    return {"total": total, "replicated": replicated, "per_rank": (total - replicated) // tp + replicated}


def _itemsize(dtype: str) -> int:
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    if dtype not in sizes:
        raise ValueError(f"unsupported safetensors dtype {dtype!r}")
    return sizes[dtype]
