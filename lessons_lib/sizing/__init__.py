"""Sizing a deployment (lesson 01): what a model needs in memory, how fast a step can be, and where a
token's time goes on a TP x PP layout.

- :mod:`.memory`: weights, KV cache and activations per device, per strategy;
- :mod:`.throughput`: the roofline of a decode step (weight read time, critical batch) and the
  tiny LM's batching measured;
- :mod:`.budget`: TTFT and TPOT of a layout in parts (weights, KV cache, compute, all-reduces,
  pipeline hops and bubble), and data against tensor parallelism per device.
"""

from .budget import (INFINIBAND_NDR, LAYOUTS, NVLINK4, PART_LABELS, PARTS, Layout, Link, budget_table, dp_against_tp,
                     laptop_link, loopback_alpha_beta, step_budget)
from .memory import (DTYPE_BYTES, LLAMA2_7B, LLAMA2_13B, LLAMA2_70B, REFERENCE_SHAPES, STRATEGIES, GiB, LLMShape,
                     activation_bytes, fits, kv_cache_bytes, memory_per_device, usable_bytes, weight_bytes)
from .throughput import (H100_SXM_BF16_FLOPS, H100_SXM_HBM_BYTES_PER_S, H100_SXM_SOURCE, batch_sweep, critical_batch,
                         decode_floor_s, dispatch_s, fixed_and_per_sequence, operators_per_decode_step, plot_sweep,
                         weight_read_s)

__all__ = ["DTYPE_BYTES", "GiB", "H100_SXM_BF16_FLOPS", "H100_SXM_HBM_BYTES_PER_S", "H100_SXM_SOURCE",
           "INFINIBAND_NDR", "LAYOUTS", "LLAMA2_13B", "LLAMA2_70B", "LLAMA2_7B", "LLMShape", "Layout", "Link",
           "NVLINK4", "PARTS", "PART_LABELS", "REFERENCE_SHAPES", "STRATEGIES", "activation_bytes", "batch_sweep",
           "budget_table", "critical_batch", "decode_floor_s", "dispatch_s", "dp_against_tp", "fits",
           "fixed_and_per_sequence", "kv_cache_bytes", "laptop_link", "loopback_alpha_beta", "memory_per_device",
           "operators_per_decode_step", "plot_sweep", "step_budget", "usable_bytes", "weight_bytes", "weight_read_s"]
