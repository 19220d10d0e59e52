"""Magnitude pruning: zero (or remove) the weights that matter least.

Three granularities, from finest to coarsest:

* **unstructured**: zero any individual weights, the smallest ``|w|`` first, either
  ranked across all pruned layers at once (``scope="global"``) or layer by layer
  (``scope="layer"``). Most accurate for a given sparsity, but a dense kernel
  still multiplies the zeros: no speed-up without sparse kernels.
* **2:4 semi-structured**: in every group of 4 consecutive input weights keep the 2
  largest. Exactly 50% sparse in a pattern NVIDIA's sparse tensor cores (Ampere and
  later) run about 2x faster; on a CPU it is just zeros.
* **structured**: remove whole MLP channels or attention heads, so the ``nn.Linear``
  shapes shrink and every dense kernel gets faster, at a larger accuracy cost.

Every function returns a pruned copy; the input model is left untouched. Only the
projections inside decoder layers are pruned; the embedding and LM head are kept.
"""

from __future__ import annotations

import copy
import numbers

import torch
import torch.nn as nn

from ..validate import bad, check_choice, check_int, check_real

SCOPES = ("global", "layer")


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` if it is a fraction in [0, 1) (NaN and bool refused)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0 <= sparsity < 1:
        raise bad("sparsity", sparsity, "a fraction in [0, 1), e.g. 0.5 for half the weights zeroed",
                  "1 would remove every weight")
    return float(sparsity)


def _check_2d(weight, name: str = "weight") -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0:
        shown = f"tensor of shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else weight
        raise bad(name, shown, "a non-empty 2-D (out_features, in_features) tensor")


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers inside ``model.layers`` (attention and MLP projections)."""
    return {f"layers.{name}": m for name, m in model.layers.named_modules() if isinstance(m, nn.Linear)}


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask (same shape) that drops exactly round(sparsity * n) smallest-|w| entries."""
    check_sparsity(sparsity)
    if not isinstance(weight, torch.Tensor):
        raise bad("weight", weight, "a torch.Tensor")
    flat = weight.detach().abs().flatten()
    keep = torch.ones_like(flat, dtype=torch.bool)
    # argsort, not a threshold: ties at the threshold would drop more than asked.
    keep[torch.argsort(flat, stable=True)[:round(sparsity * flat.numel())]] = False
    return keep.view_as(weight)


def _zero_smallest(weights: list[torch.Tensor], sparsity: float) -> None:
    """Zero exactly round(sparsity * n) of the n entries of ``weights``, ranked together."""
    keep = magnitude_mask(torch.cat([w.detach().flatten() for w in weights]), sparsity)
    start = 0
    with torch.no_grad():
        for w in weights:
            w.mul_(keep[start:start + w.numel()].view_as(w))
            start += w.numel()


def prune_unstructured(model: nn.Module, sparsity: float, scope: str = "global") -> nn.Module:
    """A copy of ``model`` with a fraction ``sparsity`` of the prunable weights zeroed."""
    check_sparsity(sparsity)
    check_choice("scope", scope, SCOPES)
    model = copy.deepcopy(model)
    weights = [m.weight for m in prunable_linears(model).values()]
    if scope == "global":
        _zero_smallest(weights, sparsity)
    else:
        for w in weights:
            _zero_smallest([w], sparsity)
    return model


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """Boolean mask keeping the 2 largest magnitudes in every 4 consecutive inputs."""
    _check_2d(weight)
    out_features, in_features = weight.shape
    if in_features % 4:
        raise bad("weight", f"tensor of shape {tuple(weight.shape)}", "in_features divisible by 4",
                  "2:4 sparsity works on groups of 4 inputs")
    groups = weight.detach().abs().reshape(out_features, in_features // 4, 4)
    top2 = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top2, True)
    return mask.reshape(out_features, in_features)


def prune_2_4(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every prunable weight in the 2:4 pattern (50% zeros)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in prunable_linears(model).values():
            m.weight.mul_(two_four_mask(m.weight))
    return model


def sparsity_of(model: nn.Module) -> float:
    """Fraction of exact zeros among the prunable weights."""
    weights = [m.weight for m in prunable_linears(model).values()]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def _shrink(linear: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping only the rows (dim 0) or columns (dim 1) in ``keep``."""
    weight = linear.weight.detach().index_select(dim, keep).clone()
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    new.weight = nn.Parameter(weight)
    return new


def prune_mlp_channels(model: nn.Module, keep_fraction: float) -> nn.Module:
    """Remove MLP hidden channels: ``gate_proj``/``up_proj`` rows and ``down_proj`` columns.

    A channel's score is ``|gate row| * |up row| * |down column|`` (L2 norms): an
    estimate of how much it can move the output. The lowest-scoring channels go.
    """
    check_real("keep_fraction", keep_fraction, low=0.0, high=1.0, low_open=True,
               why="the fraction of MLP channels kept; 1 keeps them all")
    model = copy.deepcopy(model)
    for layer in model.layers:
        mlp = layer.mlp
        score = (mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1)
                 * mlp.down_proj.weight.norm(dim=0))
        n_keep = max(1, round(keep_fraction * score.numel()))
        keep = score.topk(n_keep).indices.sort().values
        mlp.gate_proj = _shrink(mlp.gate_proj, keep, 0)
        mlp.up_proj = _shrink(mlp.up_proj, keep, 0)
        mlp.down_proj = _shrink(mlp.down_proj, keep, 1)
    return model


def prune_attention_heads(model: nn.Module, heads_per_group: int) -> nn.Module:
    """Keep ``heads_per_group`` query heads per KV head; drop their ``q_proj`` rows and ``o_proj`` columns.

    Under grouped-query attention consecutive query heads share one KV head, so
    heads are removed evenly from every group (the attention layer reads the
    group size off the tensor shapes). A head's score is the norm of its
    ``o_proj`` columns times that of its ``q_proj`` rows.
    """
    config = model.config
    group = config.n_heads // config.n_kv_heads
    check_int("heads_per_group", heads_per_group, low=1, high=group,
              why=f"query heads kept per KV head; n_heads={config.n_heads} / n_kv_heads={config.n_kv_heads}")
    model = copy.deepcopy(model)
    d = config.head_dim
    for layer in model.layers:
        attn = layer.attn
        q_norm = attn.q_proj.weight.reshape(config.n_heads, d, -1).norm(dim=(1, 2))
        o_norm = attn.o_proj.weight.reshape(-1, config.n_heads, d).norm(dim=(0, 2))
        score = (q_norm * o_norm).reshape(config.n_kv_heads, group)
        best = score.topk(heads_per_group, dim=1).indices.sort(dim=1).values
        heads = (best + torch.arange(config.n_kv_heads)[:, None] * group).flatten()
        keep = (heads[:, None] * d + torch.arange(d)).flatten()
        attn.q_proj = _shrink(attn.q_proj, keep, 0)
        attn.o_proj = _shrink(attn.o_proj, keep, 1)
    return model
