"""The same stages run by PyTorch's own pipeline runtime, ``torch.distributed.pipelining``.

``PipelineStage`` wraps a stage module and ``ScheduleGPipe`` drives it; with no ``loss_fn``
the schedule runs forward only, which is what inference needs. PyTorch's stage learns the
shapes of the activations it exchanges once, on its first step (by shape inference, or
from the ``input_args`` / ``output_args`` given), and preallocates its receive buffers to
match. That suits training, where every step has the same shapes, and it is why a
``PipelineStage`` cannot be reused as-is for decoding, where the sequence length changes
every step: see :func:`torch_gpipe_changing_lengths`.

The wrapper below gives the stage the one-argument ``forward(x)`` PyTorch expects: the
whole sequence, no padding, no KV cache (fixed shapes, nothing carried between calls).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...comm.agree import gather_across_ranks, require_same
from ...validate import bad, check_int
from .partition import microbatch_sizes


class FixedShapeStage(nn.Module):
    """``forward(x)``: the stage on an unpadded, uncached sequence (positions 0..seq-1)."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(x)


class TorchGPipe:
    """A ``torch.distributed.pipelining`` GPipe over this rank's stage (forward-only).

    Build once on every rank of the pipeline, then call :meth:`step` with the whole batch
    on the first stage (other stages pass nothing); the last stage gets the merged output.

    A batch that does not divide into equal micro-batches (10 rows in 4) is padded at the end
    to equal ones (4 x 3 rows) and the output trimmed back to the batch's rows. PyTorch's stage
    sizes its receive buffers from the first micro-batch: a smaller one later would come back
    with the buffer's stale rows, 12 rows out for 10 in.
    """

    def __init__(self, stage, mesh, n_microbatches: int) -> None:
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        self.n_microbatches = check_int("n_microbatches", n_microbatches, low=1)
        self.mesh = mesh
        self.pipe_stage = PipelineStage(FixedShapeStage(stage), mesh.pp_rank, mesh.pp,
                                        torch.device("cpu"), group=mesh.pp_group)
        # No loss_fn: the schedule has no backward and runs under no_grad.
        self.schedule = ScheduleGPipe(self.pipe_stage, n_microbatches)

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor | None = None):
        m = self.n_microbatches
        # Only the first stage holds the batch; the last needs its row count to trim the padding.
        # One small all-gather over the pipeline tells every stage (and checks m agrees).
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else input_ids
        ranks, seen = gather_across_ranks({"input_ids.shape": shape, "n_microbatches": m},
                                          self.mesh.pp_group, call="TorchGPipe.step")
        require_same("n_microbatches", [s["n_microbatches"] for s in seen], ranks)
        batch = seen[0]["input_ids.shape"]          # group rank 0 is the first stage
        if not isinstance(batch, tuple) or len(batch) != 2:
            raise bad("input_ids", batch, "on the first stage, a (batch, seq) tensor of token ids")
        rows = batch[0]
        padded = microbatch_sizes(rows, m)[0] * m   # also refuses more micro-batches than rows
        if not self.mesh.is_first_stage:
            out = self.schedule.step()
        else:
            if padded > rows:
                input_ids = torch.cat([input_ids, input_ids.new_zeros(padded - rows, batch[1])])
            out = self.schedule.step(input_ids)
        return None if out is None else out[:rows]
