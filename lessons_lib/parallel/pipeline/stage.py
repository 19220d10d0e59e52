"""One pipeline stage of a decoder-only LM: the slice of the model one rank owns.

Stage ``s`` of ``pp`` holds the layers :func:`~.partition.partition_layers` gives it, the
embedding if it is the first stage, and the final norm and LM head if it is the last. It
runs its layers exactly as ``TinyLM.forward`` would: positions and the attention mask are
built by the model's own public helpers (``make_positions``, ``make_attention_mask``), so
every stage computes them the same way from the padding mask, and nothing but the hidden
state needs to travel between stages.

The model is plain PyTorch; the stage only *refers* to the modules it owns. Build every
stage from the same (possibly tensor-parallel) model, then drop the model: each rank keeps
only its stage's weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...model.kv_cache import KVCache
from ...validate import check_int
from ...model.llama import make_attention_mask, make_positions
from .partition import partition_layers


class PipelineStageModule(nn.Module):
    """Stage ``stage_index`` of ``n_stages`` cut from ``model`` (embed / layers / norm + lm_head).

    ``forward(x, attention_mask, cache=None)``: ``x`` is token ids on the first stage and
    the hidden state (batch, seq, dim) elsewhere; ``attention_mask`` is the padding mask
    (batch, cached + seq). Returns the hidden state, or logits on the last stage.
    """

    def __init__(self, model: nn.Module, stage_index: int, n_stages: int) -> None:
        super().__init__()
        n_layers = len(model.layers)
        ranges = partition_layers(n_layers, n_stages)
        check_int("stage_index", stage_index, low=0, high=n_stages - 1)
        self.stage_index, self.n_stages = stage_index, n_stages
        # Absolute layer indices: the KV cache is indexed by them, as in the whole model.
        self.layer_ids = list(ranges[stage_index])
        self.layers = nn.ModuleList(model.layers[i] for i in self.layer_ids)
        self.embed = model.embed if self.is_first else None
        self.norm = model.norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None
        # The context window, when the model states one: generation checks it up front.
        self.max_seq_len = getattr(getattr(model, "config", None), "max_seq_len", None)

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.n_stages - 1

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        batch, seq = x.shape[:2]
        past = cache.seq_len if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + seq, dtype=torch.long, device=x.device)
        positions = make_positions(attention_mask, seq)
        attn_mask = make_attention_mask(attention_mask, seq)
        h = self.embed(x) if self.is_first else x
        for i, layer in zip(self.layer_ids, self.layers):
            h = layer(h, positions=positions, attn_mask=attn_mask,
                      cache=cache[i] if cache is not None else None)
        return self.lm_head(self.norm(h)) if self.is_last else h

    def extra_repr(self) -> str:
        parts = (["embed"] if self.is_first else []) + [f"layers {self.layer_ids}"] \
            + (["norm", "lm_head"] if self.is_last else [])
        return f"stage {self.stage_index}/{self.n_stages}: " + ", ".join(parts)


def build_stage(model: nn.Module, mesh) -> PipelineStageModule:
    """This rank's stage of ``model``: the mesh says which stage it is and how many there are."""
    return PipelineStageModule(model, mesh.pp_rank, mesh.pp)
