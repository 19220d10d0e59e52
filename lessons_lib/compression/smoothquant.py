"""Activation outliers, and SmoothQuant's fix for quantising activations to int8 (W8A8).

Weight-only quantisation leaves activations in floating point. Quantising them too (W8A8) lets
the matmul itself run in int8, but LLM activations are hard to quantise: a few fixed hidden
channels of the input to a linear layer hold values far larger than the rest (LLM.int8(),
Dettmers et al., arXiv:2208.07339; SmoothQuant, Xiao et al., arXiv:2211.10438, section 3). With
one scale for the whole tensor, ``scale = max|X| / 127`` follows the outliers, and every ordinary
value is rounded to one of a handful of codes near zero.

SmoothQuant moves the difficulty from the activations to the weights, which quantise easily.
For input channel ``j`` it picks

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

and runs ``(X / s) @ (W * s)^T``, which equals ``X @ W^T`` exactly: channel ``j`` of ``X`` is
divided by ``s_j`` and column ``j`` of ``W`` multiplied by it. ``alpha`` says how much of the
range moves (0.5 splits it evenly). In a real model ``1 / s`` is folded into the weight of the
norm before the layer and ``s`` into the layer's weight offline, so serving pays nothing for it.
"""

from __future__ import annotations

import torch

from ..validate import bad, check_choice, check_int, check_real, check_tensor
from .quantization import INT8_QMAX, check_weight

GRANULARITIES = ("tensor", "token", "channel")


def check_activations(x, in_features: int | None = None) -> torch.Tensor:
    """``x`` as float32 (tokens, features) if it is finite floating-point activations, else a named error."""
    check_tensor("x", x, min_dim=2, why="activations are (tokens, in_features) or (batch, seq, in_features)")
    if not x.is_floating_point() or not torch.isfinite(x).all():
        raise bad("x", f"{x.dtype} tensor of shape {tuple(x.shape)}", "finite floating-point activations")
    if in_features is not None and x.shape[-1] != in_features:
        raise bad("x", f"tensor of shape {tuple(x.shape)}",
                  f"a last dimension of {in_features}, the weight's in_features")
    return x.detach().float().reshape(-1, x.shape[-1])


def plant_outlier_channels(x: torch.Tensor, channels, magnitude: float, weight: torch.Tensor | None = None):
    """A copy of activations ``x`` with hidden ``channels`` (last dimension) multiplied by ``magnitude``.

    Mimics what LLM.int8() and SmoothQuant observe in large models: the outliers sit in the same
    few channels for every token, not at random positions. With ``weight`` (out, in) of the layer
    that reads ``x``, returns ``(x_planted, weight_planted)`` with those input columns divided by
    ``magnitude``, as a norm's large gain followed by that layer would be: the float layer
    ``x @ weight^T`` is unchanged, so any error afterwards is quantisation's alone.
    """
    x = check_tensor("x", x, min_dim=1)
    check_real("magnitude", magnitude, low=0, low_open=True)
    width = x.shape[-1]
    channels = [check_int("channels", c, low=0, high=width - 1, why=f"indices of the last dimension "
                          f"(size {width})") for c in channels]
    out = x.detach().clone()
    out[..., channels] *= magnitude
    if weight is None:
        return out
    w = check_weight(weight).clone()        # check_weight may return the caller's own tensor
    if w.shape[1] != width:
        raise bad("weight", f"tensor of shape {tuple(w.shape)}", f"in_features = {width}, the width of x")
    w[:, channels] /= magnitude
    return out, w


def fake_quantize_int8(x: torch.Tensor, granularity: str = "tensor") -> torch.Tensor:
    """``x`` rounded to symmetric int8 codes and back, as float32 ("fake" quantisation).

    ``granularity``: one scale for the whole ``tensor`` (what a plain W8A8 kernel uses for
    activations), one per ``token`` (row), or one per ``channel`` (column; no int8 matmul can
    apply it to activations, since the scale would sit inside the sum over channels).
    """
    check_choice("granularity", granularity, GRANULARITIES)
    x2 = check_activations(x)
    dim = {"tensor": None, "token": 1, "channel": 0}[granularity]
    amax = x2.abs().amax() if dim is None else x2.abs().amax(dim=dim, keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_QMAX, torch.ones_like(amax))
    q = torch.round(x2 / scale).clamp(-INT8_QMAX, INT8_QMAX)
    return (q * scale).reshape(x.shape)


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, granularity: str = "tensor") -> torch.Tensor:
    """``x @ weight^T`` with ``x`` quantised to int8 at ``granularity`` and ``weight`` per output channel.

    Both are fake-quantised, so the result is exactly what an int8 x int8 kernel with int32
    accumulation and float rescaling would return, up to float rounding.
    """
    w = check_weight(weight)
    xq = fake_quantize_int8(check_activations(x, w.shape[1]), granularity)
    wq = fake_quantize_int8(w, "token")         # a row of the weight is one output channel
    return (xq @ wq.t()).reshape(*x.shape[:-1], w.shape[0])


def smoothing_factors(x: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``.

    ``x``: calibration activations (..., in_features); ``weight``: (out_features, in_features).
    """
    w = check_weight(weight)
    x2 = check_activations(x, w.shape[1])
    alpha = check_real("alpha", alpha, low=0.0, high=1.0, why="the share of the range moved to the weights")
    # A channel that is zero in X or W everywhere gets a tiny floor, as the reference code does.
    x_max = x2.abs().amax(dim=0).clamp(min=1e-5)
    w_max = w.abs().amax(dim=0).clamp(min=1e-5)
    return (x_max ** alpha / w_max ** (1 - alpha)).clamp(min=1e-5)


def smooth(x: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5,
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x / s, weight * s, s)`` with ``s = smoothing_factors(x, weight, alpha)``.

    The product is unchanged: ``(x / s) @ (weight * s)^T == x @ weight^T`` up to float rounding.
    """
    s = smoothing_factors(x, weight, alpha)
    return x.detach().float() / s, check_weight(weight) * s, s
