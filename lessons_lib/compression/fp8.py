"""Simulated FP8: cast to an 8-bit float with a per-tensor scale, and back to float32.

FP8 (Micikevicius et al., "FP8 Formats for Deep Learning", arXiv:2209.05433) has two encodings:
E4M3 (4 exponent bits, 3 mantissa bits, largest finite value 448; used for weights and
activations at inference) and E5M2 (5 and 2, largest 57344; more range, less precision). NVIDIA's
H100 introduced FP8 matrix multiplies on its tensor cores (Transformer Engine's FP8 primer,
https://docs.nvidia.com/deeplearning/transformer-engine/user-guide/examples/fp8_primer.html);
this CPU has none, but PyTorch's
``torch.float8_e4m3fn`` and ``torch.float8_e5m2`` dtypes round exactly as the hardware format
does, so casting to them and back shows FP8's error faithfully.

An 8-bit float keeps about the same *relative* precision at every magnitude (3 mantissa bits:
a rounding step of 1/8 to 1/16 of the value), where int8 keeps the same *absolute* step
``max|x| / 127`` everywhere. So with outliers, the small values that int8 flattens keep their
few significant bits in FP8; without outliers, int8's finer uniform grid wins.
"""

from __future__ import annotations

import torch

from ..validate import bad, check_choice, check_real, check_tensor

FP8_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def fp8_max(fmt: str = "e4m3") -> float:
    """The largest finite value of the FP8 format ``fmt`` (448 for E4M3, 57344 for E5M2)."""
    return float(torch.finfo(FP8_FORMATS[check_choice("fmt", fmt, FP8_FORMATS)]).max)


def fp8_scale(x: torch.Tensor, fmt: str = "e4m3") -> float:
    """The per-tensor scale that maps ``max|x|`` onto the format's largest value (1.0 for zeros)."""
    amax = float(x.detach().abs().max())
    return amax / fp8_max(fmt) if amax > 0 else 1.0


def fake_quantize_fp8(x: torch.Tensor, fmt: str = "e4m3", scale: float | None = None) -> torch.Tensor:
    """``x`` cast to FP8 ``fmt`` after dividing by ``scale``, then back to float32 and rescaled.

    ``scale`` defaults to :func:`fp8_scale` (per tensor, from ``x`` itself). Values beyond the
    format's range after scaling are clamped to it (a saturating cast, as FP8 kernels do) rather
    than becoming NaN.
    """
    check_tensor("x", x, min_dim=1)
    if not x.is_floating_point() or not torch.isfinite(x).all():
        raise bad("x", f"{x.dtype} tensor of shape {tuple(x.shape)}", "finite floating-point values")
    dtype = FP8_FORMATS[check_choice("fmt", fmt, FP8_FORMATS)]
    scale = fp8_scale(x, fmt) if scale is None else check_real("scale", scale, low=0.0, low_open=True)
    limit = fp8_max(fmt)
    scaled = (x.detach().float() / scale).clamp(-limit, limit)
    return scaled.to(dtype).float() * scale
