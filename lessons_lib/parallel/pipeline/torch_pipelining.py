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
    """

    def __init__(self, stage, mesh, n_microbatches: int) -> None:
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        self.mesh = mesh
        self.pipe_stage = PipelineStage(FixedShapeStage(stage), mesh.pp_rank, mesh.pp,
                                        torch.device("cpu"), group=mesh.pp_group)
        # No loss_fn: the schedule has no backward and runs under no_grad.
        self.schedule = ScheduleGPipe(self.pipe_stage, n_microbatches)

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor | None = None):
        if self.mesh.is_first_stage:
            return self.schedule.step(input_ids)
        return self.schedule.step()
