"""Sequence parallelism (SP): inside a TP group, the norms and the residual stream split by tokens.

Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models",
arXiv:2205.05198 (2022), section 4.2.2.

Under plain tensor parallelism (:mod:`.tensor`) every rank holds the whole residual stream ``h``
(batch x seq x dim) and runs every norm and residual add on all of it: that work and that memory
are replicated ``t`` times. Megatron-LM wraps each column/row pair in two operators (Shoeybi et
al., arXiv:1909.08053, section 3): **f** before the column-parallel linear (identity forward,
all-reduce backward) and **g** after the row-parallel one (all-reduce forward, identity backward).

SP cuts ``h`` along the sequence: rank ``r`` holds tokens ``[r s/t, (r+1) s/t)`` of every row, and
the two operators change (Korthikanti et al. call the new pair g and g-bar):

* before the column-parallel linear, an **all-gather** along the sequence
  (:func:`gather_sequence`): attention needs every token, and each rank computes its heads for all;
* after the row-parallel linear, a **reduce-scatter** along the sequence
  (:func:`reduce_scatter_sequence`): rank ``r`` keeps only its tokens of the summed output.

A ring all-reduce *is* a reduce-scatter followed by an all-gather (lesson 03), so a rank sends the
same bytes: ``(t-1)/t n`` for each half, ``2 (t-1)/t n`` for the pair. What changes is that ``h``,
the norms and the residual adds take ``1/t`` of the memory and work on every rank.

The collectives are the course's ring ones (:mod:`lessons_lib.comm.collectives`), so every module
here counts the bytes it sends (``bytes_sent``). They cut a flat tensor into contiguous chunks, so
the sequence must be the outermost dimension when they run: Megatron keeps activations as
(seq, batch, hidden) for that reason. Here ``h`` is (batch, seq, dim) and is transposed around
each collective.

The sequence length must be a multiple of ``t``: anything else is a ``ValueError`` naming both
(no silent padding). A decode step of one token therefore runs under plain TP (same shards, the
TP plan) or the prompt is padded by the caller. Inference only: the collectives are not
differentiable.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..comm.collectives import ring_all_gather, ring_reduce_scatter
from ..validate import bad, check_int, check_tensor
from .tensor import RowParallelLinear, VocabParallelEmbedding, group_rank, group_size, split_last_dim

SEQ_DIM = 1      # h is (batch, seq, dim), as the tiny LM's layers pass it


def check_sequence_split(seq_len: int, tp: int) -> int:
    """Tokens per rank: ``seq_len // tp``, or a ``ValueError`` when ``tp`` does not divide ``seq_len``."""
    check_int("tp", tp, low=1)
    check_int("sequence length", seq_len, low=0)
    if seq_len % tp:
        up = -(-seq_len // tp) * tp
        raise bad("sequence length", seq_len, f"a multiple of tp={tp}",
                  f"sequence parallelism gives every rank seq/tp tokens; pad the prompt to {up} "
                  "tokens, or run this step under plain TP, as a one-token decode step must")
    return seq_len // tp


def _seq_first(x: torch.Tensor) -> torch.Tensor:
    check_tensor("x", x, min_dim=2)
    return x.transpose(0, SEQ_DIM).contiguous()


def scatter_sequence(x: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's tokens of ``x`` (every rank holds all of ``x``; no communication)."""
    tp = group_size(group)
    check_sequence_split(_seq_first(x).shape[0], tp)
    return x.chunk(tp, dim=SEQ_DIM)[group_rank(group)].contiguous()


def gather_sequence(x: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """All-gather along the sequence: every rank's tokens, in rank order. Returns (full, bytes sent)."""
    tp = group_size(group)
    if tp == 1:
        return x, 0
    local = _seq_first(x)
    out = torch.empty((local.shape[0] * tp, *local.shape[1:]), dtype=x.dtype, device=x.device)
    sent = ring_all_gather(out, local, group)
    return out.transpose(0, SEQ_DIM), sent


def reduce_scatter_sequence(x: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """Sum ``x`` over the group and keep this rank's tokens of the sum. Returns (shard, bytes sent)."""
    tp = group_size(group)
    full = _seq_first(x)
    per_rank = check_sequence_split(full.shape[0], tp)
    if tp == 1:
        return x, 0
    out = torch.empty((per_rank, *full.shape[1:]), dtype=x.dtype, device=x.device)
    sent = ring_reduce_scatter(out, full, group)
    return out.transpose(0, SEQ_DIM), sent


class SequenceParallelNorm(nn.Module):
    """A token-wise module (RMSNorm, LayerNorm) run on this rank's tokens, then all-gathered.

    Input: this rank's sequence shard of ``h``. Output: the normalised *full* sequence, which the
    column-parallel projections after it need. The norm's weights are replicated (they are tiny).
    """

    def __init__(self, norm: nn.Module, group=None) -> None:
        super().__init__()
        self.norm, self.group = norm, group
        self.bytes_sent = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, sent = gather_sequence(self.norm(x), self.group)
        self.bytes_sent += sent
        return out

    def extra_repr(self) -> str:
        return f"tp={group_size(self.group)}, gathers the sequence after the norm"


class SequenceParallelRowLinear(RowParallelLinear):
    """A row-parallel linear whose partial sums are reduce-scattered along the sequence, not all-reduced."""

    bytes_sent = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = split_last_dim(x, self.group)
        partial = F.linear(x, self.weight)
        y, sent = reduce_scatter_sequence(partial, self.group)   # this rank's tokens of x @ W.T
        self.bytes_sent += sent
        return y if self.bias is None else y + self.bias


class SequenceParallelEmbedding(VocabParallelEmbedding):
    """A vocabulary-parallel embedding that leaves each rank its tokens (reduce-scatter, not all-reduce)."""

    bytes_sent = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.end)
        out = F.embedding((ids - self.start).masked_fill(outside, 0), self.weight)
        y, sent = reduce_scatter_sequence(out.masked_fill(outside[..., None], 0.0), self.group)
        self.bytes_sent += sent
        return y


def sequence_bytes_sent(model: nn.Module) -> int:
    """Bytes this rank has sent in the sequence-parallel collectives of ``model`` so far."""
    return sum(m.bytes_sent for m in model.modules()
               if isinstance(m, (SequenceParallelNorm, SequenceParallelRowLinear, SequenceParallelEmbedding)))


__all__ = ["SequenceParallelEmbedding", "SequenceParallelNorm", "SequenceParallelRowLinear",
           "check_sequence_split", "gather_sequence", "reduce_scatter_sequence", "scatter_sequence",
           "sequence_bytes_sent"]
