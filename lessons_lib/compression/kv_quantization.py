"""KV-cache quantisation: store keys and values in 8 bits, attend with them dequantised.

At long context or large batch the KV cache, not the weights, fills the GPU, and decode reads
all of it every step. Storing it in 8 bits instead of bf16 halves both. Serving engines offer it
as a switch: vLLM's ``kv_cache_dtype="fp8"``, with one scale per tensor or per KV head, calibrated
ahead or left at 1.0 (https://docs.vllm.ai/en/latest/features/quantization/quantized_kvcache/).

Here a cache layer quantises each new token's keys and values on write, with one scale per
(token, KV head) in bfloat16 computed from the values themselves (no calibration, 2 bytes per
``head_dim`` codes), and hands attention the dequantised history, as an engine whose attention
kernel reads the 8-bit cache would see it. The model is untouched: it only calls
``cache[layer].update(k, v)``, so :func:`with_kv_cache_dtype` swaps the cache and nothing else.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..sizing import LLMShape, kv_cache_bytes
from ..model import KVCache, LayerKVCache
from ..validate import bad, check_choice, check_int
from .fp8 import FP8_FORMATS, fp8_max
from .quantization import _ROUND_UP, INT8_QMAX

KV_CACHE_DTYPES = ("int8", "fp8_e4m3", "bf16")
_CODE_DTYPES = {"int8": torch.int8, "fp8_e4m3": FP8_FORMATS["e4m3"]}
SCALE_BYTES = 2          # one bfloat16 scale per (token, KV head), for K and for V


def _qmax(kv_cache_dtype: str) -> float:
    return INT8_QMAX if kv_cache_dtype == "int8" else fp8_max("e4m3")


class QuantizedLayerKVCache(LayerKVCache):
    """One layer's keys and values as 8-bit codes with a scale per (batch, KV head, token).

    ``k`` and ``v`` hold the codes, ``k_scale`` and ``v_scale`` the scales (batch, kv_heads, seq, 1);
    :meth:`update` returns the whole history dequantised to the dtype it was given.
    """

    def __init__(self, kv_cache_dtype: str = "int8") -> None:
        super().__init__()
        check_choice("kv_cache_dtype", kv_cache_dtype, _CODE_DTYPES)
        self.kv_cache_dtype = kv_cache_dtype
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None

    def _quantize(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qmax = _qmax(self.kv_cache_dtype)
        t = t.detach().float()
        amax = t.abs().amax(dim=-1, keepdim=True)
        # Rounded up before bfloat16 rounds it, so no value lands beyond qmax (as for weight scales);
        # an all-zero head gets scale 1 and codes 0.
        scale = torch.where(amax > 0, amax * (_ROUND_UP / qmax), torch.ones_like(amax)).to(torch.bfloat16)
        scaled = (t / scale.float()).clamp(-qmax, qmax)
        if self.kv_cache_dtype == "int8":
            scaled = torch.round(scaled)
        return scaled.to(_CODE_DTYPES[self.kv_cache_dtype]), scale

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantise this step's keys and values, append them, return the history dequantised."""
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
                raise bad(name, t, "a floating-point (batch, kv_heads, seq, head_dim) tensor")
        if k.shape != v.shape:
            raise bad("v", f"a tensor of shape {tuple(v.shape)}", f"the shape of k, {tuple(k.shape)}")
        if self.k is not None and (k.shape[:2] != self.k.shape[:2] or k.shape[3] != self.k.shape[3]):
            raise bad("k", f"a tensor of shape {tuple(k.shape)}",
                      f"the batch, kv_heads and head_dim of the cached keys {tuple(self.k.shape)}")
        (kq, ks), (vq, vs) = self._quantize(k), self._quantize(v)
        if self.k is None:
            self.k, self.k_scale, self.v, self.v_scale = kq, ks, vq, vs
        else:
            self.k, self.k_scale = torch.cat([self.k, kq], dim=2), torch.cat([self.k_scale, ks], dim=2)
            self.v, self.v_scale = torch.cat([self.v, vq], dim=2), torch.cat([self.v_scale, vs], dim=2)
        return (self.k.float() * self.k_scale.float()).to(k.dtype), \
            (self.v.float() * self.v_scale.float()).to(v.dtype)

    def truncate(self, n: int) -> None:
        super().truncate(n)                       # checks n and cuts the codes
        if self.k is None:
            self.k_scale = self.v_scale = None
        else:
            self.k_scale, self.v_scale = self.k_scale[:, :, :n], self.v_scale[:, :, :n]

    def nbytes(self) -> int:
        """Codes and scales together: what the cache really holds."""
        if self.k is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k_scale, self.v_scale))


class QuantizedKVCache(KVCache):
    """A :class:`KVCache` whose every layer stores 8-bit keys and values."""

    def __init__(self, n_layers: int, kv_cache_dtype: str = "int8") -> None:
        check_int("n_layers", n_layers, low=1)
        super().__init__(n_layers)
        self.layers = [QuantizedLayerKVCache(kv_cache_dtype) for _ in range(n_layers)]


class KVQuantizedModel(nn.Module):
    """``model`` run with a quantised KV cache: the model's weights are shared, not copied.

    ``new_cache()`` makes a :class:`QuantizedKVCache`, so ``generate`` decodes through it; a call
    without a cache (``perplexity`` makes those) gets a fresh one, so every position attends to
    8-bit keys and values there too.
    """

    def __init__(self, model: nn.Module, kv_cache_dtype: str = "int8") -> None:
        super().__init__()
        check_choice("kv_cache_dtype", kv_cache_dtype, _CODE_DTYPES)
        if not hasattr(model, "layers") or not hasattr(model, "config"):
            raise bad("model", type(model).__name__, "a TinyLM-like model with .layers and .config")
        self.model, self.kv_cache_dtype, self.config = model, kv_cache_dtype, model.config

    def new_cache(self) -> QuantizedKVCache:
        return QuantizedKVCache(len(self.model.layers), self.kv_cache_dtype)

    def forward(self, input_ids: torch.Tensor, *, positions=None, attention_mask=None, cache=None):
        return self.model(input_ids, positions=positions, attention_mask=attention_mask,
                          cache=self.new_cache() if cache is None else cache)


def with_kv_cache_dtype(model: nn.Module, kv_cache_dtype: str) -> nn.Module:
    """``model`` with its KV cache stored as ``kv_cache_dtype`` ("int8" or "fp8_e4m3"; "bf16" is the model)."""
    check_choice("kv_cache_dtype", kv_cache_dtype, KV_CACHE_DTYPES)
    return model if kv_cache_dtype == "bf16" else KVQuantizedModel(model, kv_cache_dtype)


def kv_bytes_per_token(shape: LLMShape, kv_cache_dtype: str = "bf16") -> float:
    """KV-cache bytes per token of a real model's ``shape``: codes, plus scales for 8-bit caches.

    bf16 is ``lessons_lib.sizing.kv_cache_bytes``; an 8-bit cache holds one byte per element and a
    bfloat16 scale per (layer, KV head, K or V), ``head_dim`` elements sharing each scale.
    """
    check_choice("kv_cache_dtype", kv_cache_dtype, KV_CACHE_DTYPES)
    if kv_cache_dtype == "bf16":
        return kv_cache_bytes(shape, 1, 1, "bf16")
    scales = 2 * shape.n_layers * shape.n_kv_heads * SCALE_BYTES
    return kv_cache_bytes(shape, 1, 1, "int8") + scales


def kv_tokens_per_gib(shape: LLMShape, kv_cache_dtype: str = "bf16") -> int:
    """How many tokens (summed over every sequence of a batch) one GiB of KV cache holds."""
    return int(2 ** 30 // kv_bytes_per_token(shape, kv_cache_dtype))
