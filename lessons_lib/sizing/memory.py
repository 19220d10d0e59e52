"""Memory maths of serving an LLM: weights, KV cache and activations, per device.

The three reference shapes are Llama 2's published configurations: Touvron et al., "Llama 2: Open
Foundation and Fine-Tuned Chat Models", arXiv:2307.09288 (2023), Table 1 and section 2.2 (70B uses
grouped-query attention with 8 KV heads), with the exact sizes from each model's ``config.json`` as
released by Meta on the Hugging Face Hub (``meta-llama/Llama-2-7b-hf``, ``-13b-hf``, ``-70b-hf``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..validate import bad, check_choice, check_int, check_real, check_str

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

    def __post_init__(self) -> None:
        check_str("name", self.name)
        for name in ("n_layers", "hidden", "n_heads", "n_kv_heads", "ffn", "vocab"):
            check_int(name, getattr(self, name), low=1)
        if self.hidden % self.n_heads:
            raise bad("n_heads", self.n_heads, f"a divisor of hidden={self.hidden}",
                      "every head gets hidden // n_heads features")
        if self.n_heads % self.n_kv_heads:
            raise bad("n_kv_heads", self.n_kv_heads, f"a divisor of n_heads={self.n_heads}",
                      "each KV head serves the same number of query heads")

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
    return DTYPE_BYTES[check_choice("dtype", dtype, DTYPE_BYTES)]


def _check_shape(shape) -> LLMShape:
    if not isinstance(shape, LLMShape):
        raise bad("shape", shape, f"an LLMShape, e.g. one of {sorted(REFERENCE_SHAPES)} from REFERENCE_SHAPES")
    return shape


def _positive(name: str, value) -> int:
    return check_int(name, value, low=1)


def weight_bytes(shape: LLMShape, dtype: str = "bf16") -> float:
    return _check_shape(shape).param_count() * _dtype_bytes(dtype)


def kv_cache_bytes(shape: LLMShape, batch: int, context: int, dtype: str = "bf16") -> float:
    """K and V for every layer, KV head and position: 2 x layers x kv_heads x head_dim x bytes per token."""
    _check_shape(shape), _positive("batch", batch), _positive("context", context)
    per_token = 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * _dtype_bytes(dtype)
    return per_token * batch * context


def _activation_parts(shape: LLMShape, sequences: int, context: int, dtype: str) -> dict[str, float]:
    """One layer's transient tensors at the MLP's peak during prefill, in three parts.

    ``stream``: the residual stream and the normed input, ``2 x tokens x hidden``; ``mlp``: the gate
    and up projections, ``2 x tokens x ffn``; ``logits``: the fp32 logits of the last position,
    ``sequences x vocab x 4`` bytes.
    """
    tokens, nbytes = sequences * context, _dtype_bytes(dtype)
    return {"stream": 2 * tokens * shape.hidden * nbytes, "mlp": 2 * tokens * shape.ffn * nbytes,
            "logits": sequences * shape.vocab * 4.0}


def activation_bytes(shape: LLMShape, batch: int, context: int, dtype: str = "bf16") -> float:
    """Peak transient memory of one layer during prefill (inference keeps no activations between layers).

    Live at the MLP's peak: the residual stream and the normed input (2 x b x s x hidden) plus the gate
    and up projections (2 x b x s x ffn). With a fused (flash) attention kernel the b x heads x s x s
    score matrix is never materialised, so it is not counted. The fp32 logits of the last position
    (b x vocab x 4 bytes) are added.
    """
    _check_shape(shape), _positive("batch", batch), _positive("context", context)
    return sum(_activation_parts(shape, batch, context, dtype).values())


def memory_per_device(shape: LLMShape, *, dtype: str = "bf16", batch: int = 1, context: int = 4096,
                      devices: int = 1, strategy: str = "single",
                      micro_batches: int = 1) -> dict[str, float]:
    """Bytes per device of weights, KV cache and activations under one parallel strategy.

    - ``single``: one device holds everything (``devices`` must be 1).
    - ``data``: every device holds all the weights and serves ``batch / devices`` of the requests.
    - ``tensor``: weights, KV heads and the MLP width are split ``devices`` ways; KV heads are
      replicated once ``devices`` exceeds them (a device cannot hold less than one head). Without
      sequence parallelism (this course's tensor parallelism, lesson 12) the residual stream and the
      norm's output are *replicated*: every rank holds all ``b x s x hidden`` of them, so only the
      MLP's gate and up projections shrink with ``devices``.
    - ``pipeline``: layers are split ``devices`` ways, with their weights and KV cache. The batch
      runs as ``micro_batches`` micro-batches: a stage computes one layer of one micro-batch at a
      time, and holds the stage-boundary hidden state (``b/m x s x hidden``) of every other
      micro-batch in flight, as this course's executor does (it keeps each sent output until the
      send completes; the first stage keeps all its inputs). ``micro_batches=1`` is no micro-batching.
    """
    check_choice("strategy", strategy, STRATEGIES)
    _check_shape(shape), _positive("devices", devices), _positive("batch", batch)
    _positive("context", context), _positive("micro_batches", micro_batches)
    if strategy == "single" and devices != 1:
        raise bad("devices", devices, "1 for strategy='single'", "choose 'data', 'tensor' or 'pipeline'")
    if micro_batches != 1 and strategy != "pipeline":
        raise bad("micro_batches", micro_batches, f"1 for strategy={strategy!r}",
                  "only a pipeline splits its batch into micro-batches")
    weights = weight_bytes(shape, dtype)
    kv = kv_cache_bytes(shape, batch, context, dtype)
    act = activation_bytes(shape, batch, context, dtype)
    if strategy == "data":
        if batch < devices:
            raise bad("batch", batch, f"at least devices={devices}",
                      "data parallelism gives each device at least one request")
        local = -(-batch // devices)  # the busiest device
        kv, act = kv * local / batch, act * local / batch
    elif strategy == "tensor":
        _check_tensor_devices(shape, devices)
        weights /= devices
        kv_heads_here = max(1, -(-shape.n_kv_heads // devices))
        kv = kv * kv_heads_here / shape.n_kv_heads
        parts = _activation_parts(shape, batch, context, dtype)
        # the residual stream, the norm's output and the gathered logits are whole on every rank
        act = parts["stream"] + parts["mlp"] / devices + parts["logits"]
    elif strategy == "pipeline":
        check_int("devices", devices, low=1, high=shape.n_layers,
                  why=f"a pipeline stage needs at least one of the {shape.n_layers} layers")
        check_int("micro_batches", micro_batches, low=1, high=batch,
                  why=f"each micro-batch needs at least one of the batch={batch} sequences")
        share = -(-shape.n_layers // devices) / shape.n_layers  # the stage with the most layers
        weights, kv = weights * share, kv * share
        micro = -(-batch // micro_batches)  # sequences in the largest micro-batch
        parts = _activation_parts(shape, micro, context, dtype)
        waiting = (micro_batches - 1) * micro * context * shape.hidden * _dtype_bytes(dtype)
        act = parts["stream"] + parts["mlp"] + waiting + batch * shape.vocab * 4.0
    return {"weights": weights, "kv_cache": kv, "activations": act, "total": weights + kv + act}


def _check_tensor_devices(shape: LLMShape, devices: int) -> None:
    """Tensor parallelism splits whole heads: ``devices`` must divide the query heads, and divide the
    KV heads or be a multiple of them (each KV head is then replicated)."""
    heads, kv = shape.n_heads, shape.n_kv_heads
    if heads % devices:
        raise bad("devices", devices, f"a divisor of n_heads={heads}, one of {_divisors(heads)}",
                  "tensor parallelism gives each device whole attention heads")
    if kv % devices and devices % kv:
        raise bad("devices", devices, f"a divisor or a multiple of n_kv_heads={kv}",
                  "KV heads are split whole, or replicated when devices exceed them")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def usable_bytes(device_gib: float, headroom: float) -> float:
    """The bytes of a ``device_gib`` device left for the model once ``headroom`` of it is kept back
    (for the CUDA context, the communication library's buffers and allocator fragmentation)."""
    check_real("device_gib", device_gib, low=0, low_open=True)
    check_real("headroom", headroom, low=0, high=1, high_open=True,
               why="the share of the device kept back for the runtime and fragmentation")
    return device_gib * GiB * (1 - headroom)


def fits(per_device: dict[str, float], device_gib: float, *, headroom: float) -> bool:
    """Whether the total fits a device once ``headroom`` of it is kept back (0.1: 10 %).

    ``headroom`` has no default on purpose: a verdict of "does not fit" for 73.7 GiB on an 80 GiB
    device only makes sense next to the headroom that produced it, so every caller names it.
    """
    if not isinstance(per_device, dict) or "total" not in per_device:
        raise bad("per_device", per_device, "the dict memory_per_device returns (with a 'total')")
    return per_device["total"] <= usable_bytes(device_gib, headroom)
