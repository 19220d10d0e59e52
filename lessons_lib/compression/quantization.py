"""Weight-only quantisation: int8 per output channel and int4 per group, symmetric.

Decoding one token at batch 1 reads every weight once and does two flops with
it, so its speed is bounded by the bytes read, not by arithmetic. Storing weights
in fewer bits and expanding them inside the matmul kernel cuts those bytes
(against bf16, the dtype LLMs are served in: 2x for int8 and 4x for int4 codes, a little
less once the scales are counted) while activations stay in floating point:
"weight-only" quantisation, what gpt-fast, llama.cpp and vLLM's W8A16/W4A16 do.

Symmetric quantisation maps ``w`` to ``q = round(w / scale)`` with ``scale =
max|w| / qmax`` (qmax = 127 for int8, 7 for int4), so zero stays exactly zero and
``|w - q * scale| <= scale / 2`` for every element. A scale per output channel
(int8) or per group of ``group_size`` consecutive inputs (int4) keeps one large
weight from ruining the resolution of all the others.

The layers call PyTorch's CPU kernels ``torch._weight_int8pack_mm`` and
``torch._weight_int4pack_mm_for_cpu``. Both are vectorised for bfloat16
activations (the float32 path of the int8 kernel is a much slower loop), so by
default the activations enter the kernel as bfloat16 and the output goes back
to the caller's dtype.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..validate import BadArgument, bad, check_choice, check_int

INT8_QMAX = 127
INT4_QMAX = 7
# The int4 CPU kernel packs 16 output rows together and supports these groups.
INT4_KERNEL_GROUPS = (32, 64, 128, 256)
# Scales are stored in bfloat16 (as gpt-fast does); bfloat16 keeps 8 significant
# bits, so a scale is rounded up by this factor first and never ends below max|w|/qmax.
_ROUND_UP = 1 + 2 ** -7
# The dtypes the int8 and int4 CPU kernels accept for activations and scales.
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _rows(rows: torch.Tensor) -> str:
    """Row indices for an error message, the first ten of them."""
    rows = rows.nonzero().flatten().tolist()
    return str(rows[:10])[:-1] + (f", ... ({len(rows)} rows)]" if len(rows) > 10 else "]")


def check_weight(weight) -> torch.Tensor:
    """``weight`` as float32 if it is a non-empty 2-D float tensor of finite values, else a named error.

    One NaN or inf in a row makes that row's scale ``max|w| / qmax`` NaN or inf, and with it
    every code of the row: the quantised layer would be silently wrong, not slightly off.
    """
    expected = "a 2-D (out_features, in_features) floating-point tensor of finite values"
    if not isinstance(weight, torch.Tensor):
        raise bad("weight", weight, expected)
    if not weight.is_floating_point():
        raise bad("weight", f"{weight.dtype} tensor", expected)
    if weight.dim() != 2 or weight.numel() == 0:
        raise bad("weight", f"tensor of shape {tuple(weight.shape)}", expected,
                  "it has no weights to quantise" if weight.dim() == 2 else "")
    w = weight.detach().float()
    non_finite = ~torch.isfinite(w).all(dim=1)
    if non_finite.any():
        raise bad("weight", f"tensor of shape {tuple(w.shape)}", expected,
                  f"rows {_rows(non_finite)} hold NaN or inf, which would make their scale NaN or inf")
    return w


def _stored_scale(amax: torch.Tensor, qmax: int, dtype: torch.dtype) -> torch.Tensor:
    check_choice("scale_dtype", dtype, FLOAT_DTYPES)
    # An all-zero row gets scale 1: its codes are all 0 and it dequantises to 0 exactly.
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    if dtype != torch.float32:
        scale = scale * _ROUND_UP
    stored = scale.to(dtype)
    # float16 holds 6e-8 to 65504: a scale outside that would become 0 or inf, and every
    # code of its row garbage.
    unheld = ~torch.isfinite(stored) | (stored == 0)
    if unheld.any():
        raise bad("scale_dtype", dtype, "a dtype that can hold every scale, e.g. torch.float32",
                  f"rows {_rows(unheld.reshape(len(unheld), -1).any(dim=1))} need scales from "
                  f"{scale[unheld].min().item():.3g} to {scale[unheld].max().item():.3g}")
    return stored


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of a (out, in) weight and one scale per output row.

    Returns ``(q, scale)``: ``q`` int8 in [-127, 127], ``scale`` (out,) in
    ``scale_dtype``, with ``|weight - q * scale| <= scale / 2`` elementwise.
    """
    w = check_weight(weight)
    scale = _stored_scale(w.abs().amax(dim=1), INT8_QMAX, scale_dtype)
    q = torch.round(w / scale.float()[:, None]).clamp(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 weights back from int8 codes and per-row scales."""
    return q.float() * scale.float()[:, None]


def check_group_size(group_size: int, in_features: int) -> None:
    """A clear error unless ``group_size`` is a positive divisor of ``in_features``."""
    expected = f"a divisor of in_features={in_features}, one of {_divisors(in_features)}"
    check_int("group_size", group_size, low=1, why=expected)
    if in_features % group_size:
        raise bad("group_size", group_size, expected)


def quantize_int4(weight: torch.Tensor, group_size: int = 32,
                  scale_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 codes of a (out, in) weight with one scale per group of inputs.

    Returns ``(q, scales)``: ``q`` int8 holding values in [-7, 7] (two of them fit
    in a byte once packed), ``scales`` (out, in // group_size).
    """
    w = check_weight(weight)
    out_features, in_features = w.shape
    check_group_size(group_size, in_features)
    w = w.reshape(out_features, in_features // group_size, group_size)
    scales = _stored_scale(w.abs().amax(dim=2), INT4_QMAX, scale_dtype)
    q = torch.round(w / scales.float()[..., None]).clamp(-INT4_QMAX, INT4_QMAX)
    return q.to(torch.int8).reshape(out_features, in_features), scales


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Float32 weights back from int4 codes and per-group scales."""
    out_features, in_features = q.shape
    if scales.dim() != 2 or scales.shape[0] != out_features or not 0 < scales.shape[1] <= in_features \
            or in_features % scales.shape[1]:
        raise bad("scales", f"tensor of shape {tuple(scales.shape)}",
                  f"(out_features, groups) = ({out_features}, a divisor of {in_features})")
    group_size = in_features // scales.shape[1]
    w = q.float().reshape(out_features, -1, group_size) * scales.float()[..., None]
    return w.reshape(out_features, in_features)


def _check_linear(linear, kind: str) -> None:
    if not isinstance(linear, nn.Linear):
        raise bad("linear", linear, "an nn.Linear")
    if linear.bias is not None:
        raise bad("linear", linear, "an nn.Linear without bias",
                  f"{kind} has no bias term (the tiny LM's layers have none)")


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights and per-output-channel scales (no bias)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scale", scale.to(compute_dtype).contiguous())

    @classmethod
    def from_float(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> "Int8Linear":
        _check_linear(linear, "Int8Linear")
        return cls(*quantize_int8(linear.weight, scale_dtype=compute_dtype), compute_dtype=compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)
        y = torch._weight_int8pack_mm(x2, self.weight_int8, self.scale)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int8(self.weight_int8, self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int4Linear(nn.Module):
    """``nn.Linear`` with int4 weights, one scale per ``group_size`` inputs (no bias).

    Where the CPU int4 kernel applies (``group_size`` in 32/64/128/256,
    ``out_features`` a multiple of 16) the codes are packed two per byte in its
    tiled layout; elsewhere they are packed two per byte plainly and unpacked on
    the fly (same bytes, slower).
    """

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, group_size: int,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.compute_dtype = compute_dtype
        self.uses_kernel = (group_size in INT4_KERNEL_GROUPS and self.out_features % 16 == 0
                            and self.in_features % 2 == 0)
        unsigned = (q.to(torch.int32) + 8)                    # [-7, 7] -> [1, 15]
        if self.uses_kernel:
            packed = torch._convert_weight_to_int4pack_for_cpu(unsigned.contiguous(), 1)
            # The kernel computes (code - 8) * scale + zero; symmetric means zero = 0.
            zeros = torch.zeros_like(scales)
            aux = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
        else:
            packed = (unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)).to(torch.uint8)
            aux = scales
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scales_and_zeros", aux.to(compute_dtype))

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 32,
                   compute_dtype: torch.dtype = torch.bfloat16) -> "Int4Linear":
        _check_linear(linear, "Int4Linear")
        q, scales = quantize_int4(linear.weight, group_size, scale_dtype=compute_dtype)
        return cls(q, scales, group_size, compute_dtype)

    def scales(self) -> torch.Tensor:
        return self.scales_and_zeros[..., 0].transpose(0, 1) if self.uses_kernel else self.scales_and_zeros

    def codes(self) -> torch.Tensor:
        """The signed int4 codes, (out, in), unpacked (for checking and the fallback path)."""
        if self.uses_kernel:
            # Multiplying the identity recovers each code: (q - 8) * 1 + 0 per element.
            eye = torch.eye(self.in_features, dtype=torch.float32)
            ones = torch.stack([torch.ones_like(self.scales()), torch.zeros_like(self.scales())], -1)
            ones = ones.float().transpose(0, 1).contiguous()
            return torch._weight_int4pack_mm_for_cpu(eye, self.weight_int4, self.group_size,
                                                     ones).t().round().to(torch.int8)
        low = (self.weight_int4 & 0xF).to(torch.int8) - 8
        high = (self.weight_int4 >> 4).to(torch.int8) - 8
        return torch.stack([low, high], dim=-1).reshape(self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int4(self.codes(), self.scales())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)
        if self.uses_kernel:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.weight_int4, self.group_size,
                                                  self.scales_and_zeros)
        else:
            y = x2 @ self.dequantized_weight().to(self.compute_dtype).t()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 group_size={self.group_size}, kernel={self.uses_kernel}")


SCHEMES = ("int8", "int4")


def quantize_model(model: nn.Module, scheme: str = "int8", *, group_size: int = 32,
                   compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` replaced by its quantised twin.

    The embedding and the norms stay float32: the embedding is a lookup (one row
    read per token, so it does not dominate decode bytes) and norms are tiny.
    """
    check_choice("scheme", scheme, SCHEMES)
    check_choice("compute_dtype", compute_dtype, FLOAT_DTYPES)
    if scheme == "int4":
        check_int("group_size", group_size, low=1)
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                try:
                    if scheme == "int8":
                        new = Int8Linear.from_float(child, compute_dtype)
                    else:
                        new = Int4Linear.from_float(child, group_size, compute_dtype)
                except BadArgument as e:   # say which layer: the model has dozens
                    raise BadArgument(f"{name + '.' if name else ''}{child_name}: {e}") from None
                setattr(module, child_name, new)
    return model


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of every Linear-like layer's stored weight tensors (codes and scales included)."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif isinstance(module, (Int8Linear, Int4Linear)):
            total += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
    return total


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (embedding and norms included)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
