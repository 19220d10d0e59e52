"""Checkers for notebook 09 (compression): int8 quantise and dequantise."""

import torch

from .check import Incorrect, exercise


def _weights() -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    w = torch.randn(6, 32, generator=g) * torch.tensor([1e-3, 0.1, 1.0, 3.0, 50.0, 1.0])[:, None]
    w[5] = 0.0            # an all-zero row must not divide by zero
    return w


@exercise("09.quantize_int8", "symmetric int8 quantisation, one scale per output row")
def check_quantize_int8(candidate):
    w = _weights()
    out = candidate(w.clone())
    if not (isinstance(out, tuple) and len(out) == 2):
        raise Incorrect("return a tuple (q, scale)")
    q, scale = out
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8 or q.shape != w.shape:
        raise Incorrect(f"q must be an int8 tensor of shape {tuple(w.shape)}; got "
                        f"{getattr(q, 'dtype', type(q).__name__)} {tuple(getattr(q, 'shape', ()))}")
    if not isinstance(scale, torch.Tensor) or scale.shape != (w.shape[0],):
        raise Incorrect(f"scale must have one entry per output row: shape ({w.shape[0]},); got "
                        f"{tuple(getattr(scale, 'shape', ()))}. Reduce |w| over dim=1")
    if int(q.abs().max()) > 127:
        raise Incorrect("codes must stay in [-127, 127] (symmetric: -128 is never used)")
    expected = w[:4].abs().amax(dim=1) / 127
    if not torch.allclose(scale[:4].float(), expected, rtol=1e-2):
        raise Incorrect(f"scale of rows 0-3 should be max|w| / 127 = {expected.tolist()}; "
                        f"got {scale[:4].tolist()}")
    if not torch.isfinite(scale).all() or scale[5] == 0:
        raise Incorrect("an all-zero row needs a non-zero scale (e.g. 1), or dequantising divides by zero")
    err = (w - q.float() * scale.float()[:, None]).abs()
    if (err > scale.float()[:, None] / 2 * (1 + 1e-5)).any():
        raise Incorrect("some |w - q * scale| exceeds scale / 2: round to the nearest code, "
                        "do not truncate")
    return "every weight is within half a step of its int8 code times its row's scale"


@exercise("09.dequantize_int8", "float weights back from int8 codes and per-row scales")
def check_dequantize_int8(candidate):
    g = torch.Generator().manual_seed(10)
    q = torch.randint(-127, 128, (5, 8), generator=g, dtype=torch.int8)
    scale = torch.rand(5, generator=g) + 0.01
    got = candidate(q, scale)
    if not isinstance(got, torch.Tensor) or got.shape != q.shape:
        raise Incorrect(f"return a tensor of shape {tuple(q.shape)}")
    if not got.is_floating_point():
        raise Incorrect(f"return floats (dtype {got.dtype}); convert q with .float() first: "
                        "int8 arithmetic would overflow")
    expected = q.float() * scale[:, None]
    if not torch.allclose(got.float(), expected, atol=1e-6):
        raise Incorrect("row i should be q[i] * scale[i]: broadcast the scale as a column, scale[:, None]")
    return "q * scale, one scale per row"
