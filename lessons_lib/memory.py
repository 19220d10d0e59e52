"""Memory maths of serving an LLM: weights, KV cache and activations, per device.

The three reference shapes are Llama 2's published configurations: Touvron et al., "Llama 2: Open
Foundation and Fine-Tuned Chat Models", arXiv:2307.09288 (2023), Table 1 and section 2.2 (70B uses
grouped-query attention with 8 KV heads), with the exact sizes from each model's ``config.json`` as
released by Meta on the Hugging Face Hub (``meta-llama/Llama-2-7b-hf``, ``-13b-hf``, ``-70b-hf``).
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
STRATEGIES = ("single", "data", "tensor", "pipeline")
GiB = 1024 ** 3


@dataclass(frozen=True)
class LLMShape:
    """The sizes that decide memory: a decoder-only transformer with SwiGLU MLP and untied head."""

    name: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    ffn: int
    vocab: int
    source: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    def param_count(self) -> int:
        kv = self.n_kv_heads * self.head_dim
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * kv  # q, o and k, v
        mlp = 3 * self.hidden * self.ffn                             # gate, up, down
        norms = 2 * self.hidden
        return 2 * self.vocab * self.hidden + self.n_layers * (attn + mlp + norms) + self.hidden


_LLAMA2 = "Llama 2 (arXiv:2307.09288, Table 1) and config.json of meta-llama/Llama-2-{}-hf"
LLAMA2_7B = LLMShape("Llama-2-7B", 32, 4096, 32, 32, 11008, 32000, _LLAMA2.format("7b"))
LLAMA2_13B = LLMShape("Llama-2-13B", 40, 5120, 40, 40, 13824, 32000, _LLAMA2.format("13b"))
LLAMA2_70B = LLMShape("Llama-2-70B", 80, 8192, 64, 8, 28672, 32000, _LLAMA2.format("70b"))
REFERENCE_SHAPES = {s.name: s for s in (LLAMA2_7B, LLAMA2_13B, LLAMA2_70B)}


def _dtype_bytes(dtype: str) -> float:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    return DTYPE_BYTES[dtype]


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def weight_bytes(shape: LLMShape, dtype: str = "bf16") -> float:
    return shape.param_count() * _dtype_bytes(dtype)


def kv_cache_bytes(shape: LLMShape, batch: int, context: int, dtype: str = "bf16") -> float:
    """K and V for every layer, KV head and position: 2 x layers x kv_heads x head_dim x bytes per token."""
    _positive("batch", batch), _positive("context", context)
    per_token = 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * _dtype_bytes(dtype)
    return per_token * batch * context


def activation_bytes(shape: LLMShape, batch: int, context: int, dtype: str = "bf16") -> float:
    """Peak transient memory of one layer during prefill (inference keeps no activations between layers).

    Live at the MLP's peak: the residual stream and the normed input (2 x b x s x hidden) plus the gate
    and up projections (2 x b x s x ffn). With a fused (flash) attention kernel the b x heads x s x s
    score matrix is never materialised, so it is not counted. The fp32 logits of the last position
    (b x vocab x 4 bytes) are added.
    """
    _positive("batch", batch), _positive("context", context)
    tokens = batch * context
    layer = (2 * tokens * shape.hidden + 2 * tokens * shape.ffn) * _dtype_bytes(dtype)
    return layer + batch * shape.vocab * 4


def memory_per_device(shape: LLMShape, *, dtype: str = "bf16", batch: int = 1, context: int = 4096,
                      devices: int = 1, strategy: str = "single") -> dict[str, float]:
    """Bytes per device of weights, KV cache and activations under one parallel strategy.

    - ``single``: one device holds everything (``devices`` must be 1).
    - ``data``: every device holds all the weights and serves ``batch / devices`` of the requests.
    - ``tensor``: weights, KV heads and the MLP width are split ``devices`` ways; KV heads are
      replicated once ``devices`` exceeds them (a device cannot hold less than one head).
    - ``pipeline``: layers are split ``devices`` ways, with their weights and KV cache; a device holds
      one layer's activations at a time, as before.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    _positive("devices", devices)
    if strategy == "single" and devices != 1:
        raise ValueError(f"strategy='single' uses one device, got devices={devices}: "
                         f"choose 'data', 'tensor' or 'pipeline'")
    weights = weight_bytes(shape, dtype)
    kv = kv_cache_bytes(shape, batch, context, dtype)
    act = activation_bytes(shape, batch, context, dtype)
    if strategy == "data":
        if batch < devices:
            raise ValueError(f"batch={batch} is smaller than devices={devices}: data parallelism "
                             f"gives each device at least one request; choose batch >= {devices}")
        local = -(-batch // devices)  # the busiest device
        kv, act = kv * local / batch, act * local / batch
    elif strategy == "tensor":
        weights /= devices
        kv_heads_here = max(1, -(-shape.n_kv_heads // devices))
        kv = kv * kv_heads_here / shape.n_kv_heads
        act /= devices
    elif strategy == "pipeline":
        if devices > shape.n_layers:
            raise ValueError(f"devices={devices} exceeds n_layers={shape.n_layers}: a pipeline stage "
                             f"needs at least one layer; choose 1 to {shape.n_layers}")
        share = -(-shape.n_layers // devices) / shape.n_layers  # the stage with the most layers
        weights, kv = weights * share, kv * share
    return {"weights": weights, "kv_cache": kv, "activations": act, "total": weights + kv + act}


def fits(per_device: dict[str, float], device_gib: float, reserve: float = 0.1) -> bool:
    """Whether the total fits a device, keeping ``reserve`` of it for the runtime and fragmentation."""
    if not 0 <= reserve < 1:
        raise ValueError(f"reserve must be in [0, 1), got {reserve!r}")
    return per_device["total"] <= device_gib * GiB * (1 - reserve)
