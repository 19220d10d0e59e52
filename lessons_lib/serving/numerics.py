"""Why a served result differs from one process in the last bits (lesson 05).

Two causes, both about the order in which a sum is rounded:

- **Tensor parallelism.** A row-parallel layer gives each rank a slice of the inner dimension; each
  rank's matmul rounds its partial sum to the output dtype, and the all-reduce adds the partials.
  One process runs one matmul over the whole inner dimension, blocked and accumulated its own way.
  :func:`tp_vs_one_process` measures the difference, in float32 and in bfloat16 (the dtype LLMs are
  served in, where each partial is rounded to 8 significant bits before the all-reduce adds them).
- **Batch size.** The same request's logits depend on how many other requests share its batch,
  because matmul kernels choose their blocking (and so their reduction order) from the shapes.
  Under continuous batching the batch changes from step to step and run to run.
  :func:`batch_variance` measures it on a real model.

Two partial sums added in either order never differ: ``a + b == b + a`` holds exactly in IEEE
arithmetic (addition is commutative); only associativity, ``(a + b) + c`` vs ``a + (b + c)``, fails.
"""

from __future__ import annotations

import copy

import torch

from ..validate import bad, check_int

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _check_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype in DTYPES.values():
        return dtype
    raise bad("dtype", dtype, f"one of {sorted(DTYPES)} (or the torch dtype)")


def tp_vs_one_process(seed: int = 0, rows: int = 64, cols: int = 1024, tp: int = 4,
                      dtype="float32") -> dict:
    """A row-parallel matmul on ``tp`` simulated ranks against the same matmul in one process.

    ``x`` (rows x cols) times ``w`` (cols x rows), both in ``dtype``. Rank ``r`` multiplies its
    ``cols / tp`` slice of the inner dimension (its result rounded to ``dtype``, as a GPU kernel
    writes it), and the partials are added in rank order in ``dtype``, as an all-reduce does.
    Returns how many output elements are not bitwise equal to one process's ``x @ w`` and the
    largest difference, absolute and relative to the largest output.
    """
    check_int("seed", seed)
    check_int("rows", rows, low=1)
    check_int("cols", cols, low=1)
    check_int("tp", tp, low=1, high=cols)
    if cols % tp:
        raise bad("tp", tp, f"a divisor of cols={cols}", "each rank holds an equal slice")
    dtype = _check_dtype(dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g).to(dtype)
    w = torch.randn(cols, rows, generator=g).to(dtype)
    one = x @ w
    chunk = cols // tp
    tp_sum = x[:, :chunk] @ w[:chunk]
    for r in range(1, tp):
        tp_sum += x[:, r * chunk:(r + 1) * chunk] @ w[r * chunk:(r + 1) * chunk]
    diff = (tp_sum.float() - one.float()).abs()
    return {"tp": tp, "dtype": str(dtype).removeprefix("torch."), "elements": one.numel(),
            "elements_differing": int((tp_sum != one).sum()),
            "max_abs_diff": float(diff.max()),
            "max_rel_diff": float(diff.max() / one.float().abs().max())}


@torch.no_grad()
def batch_variance(model, batch_sizes=(1, 2, 4, 8, 16, 32), seed: int = 0, dtype="float32") -> list[dict]:
    """One decode step of request 0, served in batches of each size: how its logits move.

    Every batch is one new token per request (a decode step: the matmuls have ``batch`` rows).
    Request 0's token is the same in every batch; the others are random. Its logits are compared
    bitwise with those it gets alone (batch 1). ``model`` is not modified (a copy is cast).
    """
    if not isinstance(model, torch.nn.Module):
        raise bad("model", model, "an nn.Module taking (batch, seq) token ids")
    sizes = list(batch_sizes) if isinstance(batch_sizes, (list, tuple, range)) else None
    if not sizes:
        raise bad("batch_sizes", batch_sizes, "a non-empty list of ints >= 1")
    for b in sizes:
        check_int("batch_sizes[i]", b, low=1)
    check_int("seed", seed)
    dtype = _check_dtype(dtype)
    m = copy.deepcopy(model).to(dtype).eval()
    vocab = m.lm_head.out_features if hasattr(m, "lm_head") else 256
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (max(sizes), 1), generator=g)
    alone = m(tokens[:1])[0, -1].float()
    rows = []
    for b in sizes:
        logits = m(tokens[:b])[0, -1].float()
        rows.append({"batch": b, "dtype": str(dtype).removeprefix("torch."),
                     "logits": logits.numel(), "logits_differing": int((logits != alone).sum()),
                     "max_abs_diff": float((logits - alone).abs().max()),
                     "same_argmax": bool(logits.argmax() == alone.argmax())})
    return rows


__all__ = ["tp_vs_one_process", "batch_variance"]
