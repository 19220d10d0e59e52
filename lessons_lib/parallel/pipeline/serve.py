"""All three strategies at once: serve a decoder-only LM on a TP x PP x DP mesh.

Applied from outside, in this order, on every rank:

1. tensor parallelism: ``parallelize(model, tiny_lm_tp_plan(model), mesh.tp_group)`` swaps the
   linear layers of every decoder layer for this rank's shards (lesson 12);
2. pipeline parallelism: :func:`~.stage.build_stage` keeps only this rank's stage (this lesson);
3. data parallelism: each replica (one full TP x PP pipeline) takes its rows of the batch, and
   the generated rows are gathered at the end (lesson 11).

A TP rank of stage ``s`` sends its (replicated) hidden state to the TP rank with the same index
in stage ``s+1``: the mesh's pipeline groups pair them up, so no rank arithmetic is needed here.
"""

from __future__ import annotations

import torch

from ..data import gather_rows, local_rows
from ..plan import parallelize, tiny_lm_tp_plan
from .runtime import PipelineInference
from .stage import build_stage


def generate_on_mesh(model, mesh, input_ids: torch.Tensor, max_new_tokens: int, *,
                     attention_mask: torch.Tensor | None = None, n_microbatches: int = 1,
                     schedule: str = "gpipe") -> torch.Tensor:
    """Greedy generation with ``model`` split over ``mesh``; every rank returns all rows.

    Call on every rank with the same full-model weights and the same whole batch.
    """

    if mesh.tp > 1:
        parallelize(model, tiny_lm_tp_plan(model), mesh.tp_group)
    runner = PipelineInference(build_stage(model, mesh), mesh, n_microbatches, schedule)
    ids = local_rows(input_ids, mesh.dp_group)
    mask = None if attention_mask is None else local_rows(attention_mask, mesh.dp_group)
    return gather_rows(runner.generate(ids, max_new_tokens, mask), mesh.dp_group)
