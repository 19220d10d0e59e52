"""Pipeline parallelism: cut the layers into stages, cut the batch into micro-batches, and let
a schedule (plain data) say which stage runs which micro-batch when.

- :mod:`.partition`: balanced stages and micro-batch sizes;
- :mod:`.schedule`: GPipe and 1F1B as per-stage action lists, their timeline and bubble;
- :mod:`.p2p`: send/recv of activations with shape and dtype sent first;
- :mod:`.stage`: the slice of a decoder-only LM one rank owns;
- :mod:`.runtime`: the executor and :class:`PipelineInference` (prefill + KV-cached decode);
- :mod:`.inflight`: decoding with micro-batches in flight across tokens (no drain per token);
- :mod:`.torch_pipelining`: the same stages run by ``torch.distributed.pipelining``;
- :mod:`.bubble`: the idle fraction measured on a fixed workload;
- :mod:`.serve`: the LM on a TP x PP x DP mesh (``generate_on_mesh``).
"""

from .bubble import measure_idle_fraction
from .inflight import decode_in_flight
from .p2p import TensorReceiver, recv_tensor, send_tensor, wait_all
from .partition import microbatch_sizes, partition_layers, split_microbatches
from .runtime import PipelineInference, execute, idle_fraction
from .serve import generate_on_mesh
from .schedule import Action, Schedule, Slot, bubble_formula, gpipe, make_schedule, one_f_one_b
from .stage import PipelineStageModule, StageAdapter, build_stage, stage_adapter
from .torch_pipelining import TorchGPipe

__all__ = [
    "Action", "PipelineInference", "TensorReceiver", "PipelineStageModule", "Schedule", "StageAdapter", "Slot",
    "bubble_formula", "build_stage", "decode_in_flight", "execute", "generate_on_mesh", "gpipe", "idle_fraction",
    "make_schedule", "measure_idle_fraction", "microbatch_sizes", "stage_adapter", "TorchGPipe",
    "one_f_one_b", "partition_layers", "recv_tensor", "send_tensor", "split_microbatches", "wait_all",
]
