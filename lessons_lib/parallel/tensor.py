"""Tensor parallelism (TP): one layer's weight matrix split across the ranks of a group.

Megatron-LM's recipe, for inference. A linear layer ``y = x @ W.T`` (``W`` is (out, in)) can be
split two ways:

* **column-parallel** (:class:`ColumnParallelLinear`): rank ``r`` keeps rows ``r`` of ``W`` by
  output feature, so it computes its own slice of ``y``'s features from the full ``x``. No
  communication, unless the full ``y`` is needed (``gather_output=True``: an all-gather).
* **row-parallel** (:class:`RowParallelLinear`): rank ``r`` keeps the columns of ``W`` that meet
  its slice of ``x``'s features, so it computes a *partial sum* of the full ``y``; one
  all-reduce adds the partial sums. The bias is added once, after the all-reduce (adding it on
  every rank would count it ``tp`` times).

Column then row is the pattern of every transformer block: q/k/v (column) -> attention on local
heads -> o_proj (row); gate/up (column) -> SwiGLU -> down (row). One all-reduce per pair, none
inside. The embedding is split by vocabulary (:class:`VocabParallelEmbedding`) and so is the LM
head (:class:`ParallelLMHead`: column-parallel over the vocabulary, logits all-gathered).

Every layer takes a process group (``None``: the whole world), so a TP group can be one axis of a
``Mesh`` and the other ranks do data or pipeline parallelism. Each layer is built from a trained
``nn.Linear``/``nn.Embedding`` by slicing its weights (``from_linear``/``from_embedding``): a
trained model is sharded, never re-initialised. Inference only: the collectives are not
differentiable.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..validate import bad, check_int


# -- TP communication (Megatron keeps these in ``mappings.py``, picotron in ``tp_communications.py``)
def group_size(group=None) -> int:
    """Ranks in ``group`` (``None``: the world); 1 when torch.distributed is not initialised."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group=None) -> int:
    """This rank's index inside ``group`` (not its global rank)."""
    return dist.get_rank(group) if dist.is_initialized() else 0


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``x`` over the group, in place; a no-op on one rank."""
    if group_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def all_gather_last_dim(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dimension, in group-rank order."""
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


def split_last_dim(x: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's slice of ``x``'s last dimension (no communication: every rank holds all of x)."""
    world, rank = group_size(group), group_rank(group)
    if world == 1:
        return x
    return x.chunk(world, dim=-1)[rank].contiguous()


# -- which slice of a dimension a rank owns -------------------------------------------------------
def _divisors(n: int) -> str:
    ds = [str(d) for d in range(1, n + 1) if n % d == 0]
    return ", ".join(ds[:-1]) + " or " + ds[-1] if len(ds) > 1 else ds[0]


def shard_indices(size: int, tp: int, rank: int, *, unit: int = 1, name: str = "size",
                  replicate: bool = False) -> torch.Tensor:
    """Indices of the ``size`` features that rank ``rank`` of ``tp`` owns.

    Features are split in whole blocks of ``unit`` (an attention head is ``head_dim`` features), so
    a rank never holds half a head. ``name`` is the quantity being split, for the error message.

    With ``replicate=True`` and fewer blocks than ranks (grouped-query attention with
    ``tp > n_kv_heads``), ``tp`` must be a multiple of the block count and each block is
    *replicated* on ``tp // blocks`` consecutive ranks: rank ``r`` holds block
    ``r // (tp // blocks)``, the KV head its own query heads use. vLLM's ``QKVParallelLinear``
    replicates KV heads this way (``num_kv_head_replicas = tp // total_num_kv_heads``); Megatron-core
    does not: its attention divides ``num_query_groups`` by ``tp`` and so requires ``tp`` to divide the
    number of KV heads.
    """
    check_int(name, size, low=1)
    check_int("unit", unit, low=1)
    check_int("tp", tp, low=1)
    check_int("rank", rank, low=0, high=tp - 1, why=f"a rank of the tp={tp} group")
    if size % unit:
        raise bad(name, size, f"a multiple of unit={unit}", f"{size} features do not split into blocks of {unit}")
    blocks = size // unit
    if blocks % tp == 0:
        per = blocks // tp
        first = rank * per
    elif replicate and tp % blocks == 0:
        per, first = 1, rank // (tp // blocks)
    else:
        extra = f", or a multiple of {name}={blocks} (KV heads are then replicated)" if replicate else ""
        raise bad("tp", tp, f"a divisor of {name}={blocks}",
                  f"tp={tp} does not divide {name}={blocks}: choose tp among {_divisors(blocks)}{extra}")
    return torch.arange(first * unit, (first + per) * unit)


# -- the layers -----------------------------------------------------------------------------------
class ColumnParallelLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` split by output features (rows): each rank computes its slice.

    Input: the full ``x`` on every rank. Output: this rank's features of ``y`` or, with
    ``gather_output=True``, all of them (one all-gather).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, group=None,
                 gather_output: bool = False, full_out_features: int | None = None) -> None:
        super().__init__()
        self.group = group
        self.gather_output = gather_output
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features = weight.shape[1]
        self.out_features = full_out_features or weight.shape[0] * group_size(group)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None, *, gather_output: bool = False,
                    unit: int = 1, name: str | None = None, replicate: bool = False):
        """Keep this rank's output rows of a trained ``linear`` (see :func:`shard_indices`)."""
        rows = shard_indices(linear.out_features, group_size(group), group_rank(group), unit=unit,
                             name=name or "out_features", replicate=replicate)
        bias = None if linear.bias is None else linear.bias[rows]
        return cls(linear.weight[rows], bias, group=group, gather_output=gather_output,
                   full_out_features=linear.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)       # local features only: no communication
        return all_gather_last_dim(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(local {self.weight.shape[0]}), tp={group_size(self.group)}, "
                f"gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` split by input features (columns): partial sums, all-reduced.

    Input: this rank's slice of ``x``'s features (what a :class:`ColumnParallelLinear` before it
    produced), or the full ``x`` with ``input_is_parallel=False`` (then sliced here).
    Output: the full ``y`` on every rank.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, group=None,
                 input_is_parallel: bool = True, full_in_features: int | None = None) -> None:
        super().__init__()
        self.group = group
        self.input_is_parallel = input_is_parallel
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        # The bias is not split: it is added once, to the reduced sum.
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.out_features = weight.shape[0]
        self.in_features = full_in_features or weight.shape[1] * group_size(group)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None, *, input_is_parallel: bool = True,
                    unit: int = 1, name: str | None = None):
        """Keep this rank's input columns of a trained ``linear``."""
        cols = shard_indices(linear.in_features, group_size(group), group_rank(group), unit=unit,
                             name=name or "in_features")
        return cls(linear.weight[:, cols], linear.bias, group=group,
                   input_is_parallel=input_is_parallel, full_in_features=linear.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = split_last_dim(x, self.group)
        partial = F.linear(x, self.weight)            # this rank's share of the sum over features
        y = all_reduce_sum(partial, self.group)       # every rank now holds x @ W.T in full
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.weight.shape[1]}), "
                f"out_features={self.out_features}, tp={group_size(self.group)}, "
                f"bias={self.bias is not None}")


class VocabParallelEmbedding(nn.Module):
    """An embedding table split by vocabulary: rank ``r`` owns ids ``[start, end)``.

    Each rank looks up the ids it owns, writes zeros for the others, and one all-reduce fills in
    every row (exactly one rank contributed a non-zero vector for each id).
    """

    def __init__(self, weight: torch.Tensor, *, start: int, num_embeddings: int, group=None) -> None:
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.start, self.end = start, start + weight.shape[0]
        self.num_embeddings = num_embeddings
        self.embedding_dim = weight.shape[1]

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group=None, *, name: str = "vocab_size"):
        """Keep this rank's contiguous range of rows of a trained ``embedding``."""
        rows = shard_indices(embedding.num_embeddings, group_size(group), group_rank(group), name=name)
        return cls(embedding.weight[rows], start=int(rows[0]),
                   num_embeddings=embedding.num_embeddings, group=group)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.end)
        local_ids = (ids - self.start).masked_fill(outside, 0)    # any valid row; zeroed below
        out = F.embedding(local_ids, self.weight)
        out = out.masked_fill(outside[..., None], 0.0)
        return all_reduce_sum(out, self.group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, local ids [{self.start}, {self.end}), "
                f"tp={group_size(self.group)}")


class ParallelLMHead(ColumnParallelLinear):
    """The LM head, column-parallel over the vocabulary, with the logits all-gathered.

    Each rank scores only its vocabulary range (``dim x vocab/tp`` weights); gathering gives every
    rank the full logits, so sampling code is unchanged. (A serving engine can instead take a
    per-shard max and reduce, to avoid moving the full logits; clarity wins here.)
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None, *, name: str = "vocab_size", **_):
        return super().from_linear(linear, group, gather_output=True, name=name)
