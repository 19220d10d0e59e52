"""Model-state fingerprints: one SHA-256 that changes if any weight, name, dtype or shape does.

At inference the weights are read-only, so "consistency" means every replica and every shard
serves the same model version. Comparing fingerprints is how you check it cheaply: 64 hex
characters per replica instead of gigabytes of weights.

The hashing itself (``state_fingerprint``, ``tensor_digest``, ``diff_states``, ``short``) lives in
``lessons_lib.model.fingerprint``, below every package that uses it (checkpoints record a
fingerprint too); this module adds what lesson 05 does with it across ranks and shards, and
re-exports those names so the lesson finds them in one place.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..model.fingerprint import _check_state, diff_states, short, state_fingerprint, tensor_digest
from ..parallel.plan import Colwise, Rowwise, _matches, _resolve, tiny_lm_tp_plan
from ..parallel.tensor import shard_indices
from ..validate import bad, check_int

__all__ = ["broadcast_state_", "diff_states", "gather_fingerprints", "shard_manifest", "shard_state",
           "short", "state_fingerprint", "sum_order_demo", "tensor_digest"]


# -- across ranks (call inside run_distributed or under torchrun) ------------------------------
def gather_fingerprints(state: dict) -> list[str]:
    """Every rank's fingerprint of its ``state``, in rank order, on every rank (one all-gather of
    64-byte strings: cheap enough to run before serving and after every weight update)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, state_fingerprint(state))
    return out


@torch.no_grad()
def broadcast_state_(state: dict, src: int = 0) -> None:
    """Overwrite every tensor of ``state`` in place with rank ``src``'s copy (the repair)."""
    check_int("src", src, low=0, high=dist.get_world_size() - 1)
    for name in sorted(state):   # the same order on every rank, or the broadcasts would mismatch
        dist.broadcast(state[name], src=src)


def shard_state(state: dict, rank: int, world_size: int, plan: dict | None = None) -> dict:
    """Rank ``rank``'s tensor-parallel shard of a full ``state``, sliced exactly as
    :func:`lessons_lib.parallel.plan.parallelize` slices the live model under ``plan``.

    ``plan`` defaults to the tiny LM's (:func:`~lessons_lib.parallel.plan.tiny_lm_tp_plan` of the
    default config): q/k/v and gate/up projections keep whole heads or ``ffn_dim`` features of
    their output rows (KV heads replicated when ``world_size`` exceeds them), o/down projections
    keep columns, embedding and LM head keep vocabulary rows; tensors of modules the plan does
    not name (the norms) are replicated. So the fingerprint of a rank's ``state_dict()`` after
    ``parallelize`` equals this shard's, and a manifest built offline from the full checkpoint
    checks what each rank really holds.
    """
    _check_state("state", state)
    check_int("world_size", world_size, low=1)
    check_int("rank", rank, low=0, high=world_size - 1)
    if plan is None:
        plan = tiny_lm_tp_plan()
    if not isinstance(plan, dict) or not plan:
        raise bad("plan", plan, "a non-empty dict {submodule name: style}, as parallelize takes")
    styles = [(entry, _resolve(style, entry)) for entry, style in plan.items()]
    out = {}
    for name, t in state.items():
        module, _, param = name.rpartition(".")
        style = next((s for entry, s in styles if module and _matches(entry, module)), None)
        if style is None or (isinstance(style, Rowwise) and param != "weight"):
            out[name] = t       # not split, or a row-parallel bias (added once, after the sum)
            continue
        # Colwise and the vocabulary styles keep rows (dim 0); Rowwise keeps input columns (dim 1).
        dim = 1 if isinstance(style, Rowwise) else 0
        unit = getattr(style, "unit", 1)
        replicate = isinstance(style, Colwise) and style.replicate
        what = getattr(style, "name", None) or name
        try:
            keep = shard_indices(t.shape[dim], world_size, rank, unit=unit, name=what,
                                 replicate=replicate)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        out[name] = t.index_select(dim, keep)
    return out


def shard_manifest(state: dict, world_size: int, plan: dict | None = None) -> list[str]:
    """The expected fingerprint of each rank's shard under ``plan`` (see :func:`shard_state`):
    what a release pipeline publishes beside the checkpoint, one list per TP size."""
    check_int("world_size", world_size, low=1)
    return [state_fingerprint(shard_state(state, r, world_size, plan)) for r in range(world_size)]


def sum_order_demo(seed: int = 0, rows: int = 64, cols: int = 1024, parts: int = 4) -> dict:
    """A row-parallel matmul's partial sums added in two orders: equal to within rounding, not bitwise.

    Float addition is not associative: (a + b) + c can differ from a + (b + c) in the last bit.
    Tensor parallelism sums partial products across ranks in whatever order the all-reduce uses, so
    its result differs from one process's matmul (which sums in yet another, blocked order).
    """
    _check_demo(seed, rows, cols, parts)
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(rows, cols, generator=g), torch.randn(cols, rows, generator=g)
    chunk = cols // parts
    partials = [x[:, i * chunk:(i + 1) * chunk] @ w[i * chunk:(i + 1) * chunk] for i in range(parts)]
    forward = partials[0].clone()
    for p in partials[1:]:
        forward += p
    backward = partials[-1].clone()
    for p in reversed(partials[:-1]):
        backward += p
    full = x @ w
    return {"bitwise_equal_orders": torch.equal(forward, backward),
            "bitwise_equal_to_one_process": torch.equal(forward, full),
            "allclose": torch.allclose(forward, backward, rtol=1e-5, atol=1e-4)
            and torch.allclose(forward, full, rtol=1e-5, atol=1e-4),
            "max_abs_diff": float((forward - backward).abs().max()),
            "elements_differing": int((forward != backward).sum()), "elements": forward.numel()}


def _check_demo(seed, rows, cols, parts) -> None:
    check_int("seed", seed)
    check_int("rows", rows, low=1)
    check_int("cols", cols, low=1)
    check_int("parts", parts, low=1, high=cols)
    if cols % parts:   # the partial products would leave out the last columns
        raise bad("parts", parts, f"a divisor of cols={cols}")
