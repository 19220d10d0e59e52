"""One pipeline stage of a decoder-only LM: the slice of the model one rank owns.

Stage ``s`` of ``pp`` holds the layers :func:`~.partition.partition_layers` gives it, the
embedding if it is the first stage, and the head (final norm and LM head) if it is the last.
Nothing but the hidden state travels between stages: every stage builds the layers' other
inputs (positions, attention mask) itself, from the padding mask, with the model's own code.

What a stage needs of a model is small, and written down in :class:`StageAdapter`:

* ``embed``: ids -> hidden state (``None``: the first stage receives the input as it is);
* ``layers``: the blocks, in order;
* ``head``: hidden state -> output on the last stage (``None``: the hidden state is the output);
* ``layer_inputs(batch, seq, attention_mask, cache)``: what every layer gets besides the hidden
  state (for the tiny LM: positions and the attention mask, from ``model.llama.layer_inputs``);
* ``call_layer(layer, h, inputs, layer_cache)``: how one block is called.

:func:`stage_adapter` builds it for the tiny LM (and any model with its interface) and for a
plain ``nn.Sequential``; any other decoder can pass a ``StageAdapter`` of its own.

The model is plain PyTorch; the stage only *refers* to the modules it owns. Build every
stage from the same (possibly tensor-parallel) model, then drop the model: each rank keeps
only its stage's weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from ...model.kv_cache import KVCache
from ...model.llama import check_input_ids, layer_inputs
from ...validate import bad, check_int
from .partition import partition_layers

TINY_LM_INTERFACE = ("embed", "layers", "norm", "lm_head", "config")


@dataclass
class StageAdapter:
    """How to cut a decoder-only model into pipeline stages (see the module's docstring)."""

    layers: list
    embed: nn.Module | None = None
    head: Callable[[torch.Tensor], torch.Tensor] | None = None
    layer_inputs: Callable[..., Any] = lambda batch, seq, attention_mask, cache: None
    call_layer: Callable[..., torch.Tensor] = lambda layer, h, inputs, layer_cache: layer(h)
    check_ids: Callable[[torch.Tensor], None] = lambda ids: None
    max_seq_len: int | None = None


def stage_adapter(model) -> StageAdapter:
    """The :class:`StageAdapter` of ``model``: given, built for the tiny LM's interface, or for ``nn.Sequential``."""
    if isinstance(model, StageAdapter):
        return model
    if isinstance(model, nn.Sequential):
        # Blocks called as block(h); no cache, no mask: a pipeline of plain modules.
        return StageAdapter(layers=list(model))
    missing = [name for name in TINY_LM_INTERFACE if not hasattr(model, name)]
    if missing:
        raise bad("model", type(model).__name__,
                  "a model with the tiny LM's interface (" + ", ".join(TINY_LM_INTERFACE) + "), an "
                  "nn.Sequential, or a StageAdapter describing embed, layers, head and how a layer is called",
                  f"it has no {', '.join(missing)}")

    # The adapter refers to the modules and the config only, never to the model: a rank that
    # drops the model after building its stage keeps only its own stage's weights.
    config, norm, lm_head = model.config, model.norm, model.lm_head

    def call_layer(layer, h, inputs, layer_cache):
        positions, attn_mask = inputs
        return layer(h, positions=positions, attn_mask=attn_mask, cache=layer_cache)

    return StageAdapter(
        layers=list(model.layers), embed=model.embed, head=nn.Sequential(norm, lm_head),
        layer_inputs=lambda batch, seq, attention_mask, cache: layer_inputs(
            config, batch, seq, attention_mask=attention_mask, cache=cache),
        call_layer=call_layer, check_ids=lambda ids: check_input_ids(ids, config.vocab_size),
        max_seq_len=config.max_seq_len)


class PipelineStageModule(nn.Module):
    """Stage ``stage_index`` of ``n_stages`` cut from ``model`` (embed / layers / head).

    ``forward(x, attention_mask, cache=None)``: ``x`` is the model's input on the first stage
    and the hidden state (batch, seq, dim) elsewhere; ``attention_mask`` is the padding mask
    (batch, cached + seq). Returns the hidden state, or the head's output on the last stage.
    """

    def __init__(self, model, stage_index: int, n_stages: int) -> None:
        super().__init__()
        adapter = stage_adapter(model)
        ranges = partition_layers(len(adapter.layers), n_stages)
        check_int("stage_index", stage_index, low=0, high=n_stages - 1)
        self.stage_index, self.n_stages = stage_index, n_stages
        # Only what this stage runs: the other stages' layers, embedding and head are not kept.
        self.adapter = dataclasses.replace(adapter, layers=[],
                                           embed=adapter.embed if stage_index == 0 else None,
                                           head=adapter.head if stage_index == n_stages - 1 else None)
        # Absolute layer indices: the KV cache is indexed by them, as in the whole model.
        self.layer_ids = list(ranges[stage_index])
        self.layers = nn.ModuleList(adapter.layers[i] for i in self.layer_ids)
        self.embed = self.adapter.embed
        if isinstance(self.adapter.head, nn.Module):
            self.head = self.adapter.head          # registered: the stage's parameters include it
        # The context window, when the model states one: generation checks it up front.
        self.max_seq_len = adapter.max_seq_len

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.n_stages - 1

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        a = self.adapter
        if a.embed is not None:
            a.check_ids(x)
        inputs = a.layer_inputs(x.shape[0], x.shape[1], attention_mask, cache)
        h = a.embed(x) if a.embed is not None else x
        for i, layer in zip(self.layer_ids, self.layers):
            h = a.call_layer(layer, h, inputs, cache[i] if cache is not None else None)
        return a.head(h) if a.head is not None else h

    def extra_repr(self) -> str:
        parts = (["embed"] if self.embed is not None else []) + [f"layers {self.layer_ids}"] \
            + (["head"] if self.adapter.head is not None else [])
        return f"stage {self.stage_index}/{self.n_stages}: " + ", ".join(parts)


def build_stage(model, mesh) -> PipelineStageModule:
    """This rank's stage of ``model``: the mesh says which stage it is and how many there are."""
    return PipelineStageModule(model, mesh.pp_rank, mesh.pp)
