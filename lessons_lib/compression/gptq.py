"""GPTQ: quantise a weight column by column and let the columns not yet quantised absorb the error.

Round-to-nearest (RTN) rounds every weight on its own. What matters is the layer's output on
real inputs, ``X @ W^T``, and weights that multiply correlated inputs can cancel each other's
errors. GPTQ (Frantar et al., arXiv:2210.17323, Algorithm 1) quantises the columns of ``W``
(input channels) in order; after rounding column ``i`` it adds a correction to every later
column that minimises the extra output error, using the inverse of the Hessian
``H = 2 X^T X / n`` of that error, computed from a few calibration inputs:

    err = (w_i - q_i) / [H^-1]_ii          (one value per output row)
    W[:, i+1:] -= err * [H^-1]_{i, i+1:}

Taking the rows of ``H^-1`` from its upper Cholesky factor makes each step's inverse the one of
the columns still left, without updating ``H^-1`` itself (the paper's section 3.3 and 3.4). The
paper also processes columns in blocks (lazy batch updates) for speed; this version updates
every later column at once, which gives the same result and reads as the formula.
"""

from __future__ import annotations

import torch

from ..validate import bad, check_int, check_real
from .quantization import check_group_size, check_weight
from .smoothquant import check_activations


def _qmax(bits: int) -> int:
    check_int("bits", bits, low=2, high=8, why="symmetric codes in [-(2^(bits-1) - 1), 2^(bits-1) - 1]")
    return 2 ** (bits - 1) - 1


def _scale(w: torch.Tensor, qmax: int) -> torch.Tensor:
    amax = w.abs().amax(dim=1)
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def _groups(group_size: int | None, in_features: int) -> int:
    if group_size is None:
        return in_features
    check_group_size(group_size, in_features)
    return group_size


def round_to_nearest(weight: torch.Tensor, bits: int = 4, group_size: int | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain symmetric rounding: ``(q, scales)`` with one scale per row, or per ``group_size`` inputs.

    ``scales`` is (out_features, groups) float32; ``dequantize_int4(q, scales)`` gives the weights back
    (for any ``bits``: it only multiplies each group by its scale).
    """
    w, qmax = check_weight(weight), _qmax(bits)
    g = _groups(group_size, w.shape[1])
    grouped = w.reshape(w.shape[0], -1, g)
    scales = torch.stack([_scale(grouped[:, j], qmax) for j in range(grouped.shape[1])], dim=1)
    q = torch.round(grouped / scales[..., None]).clamp(-qmax, qmax)
    return q.reshape(w.shape).to(torch.int8), scales


def hessian(inputs: torch.Tensor, in_features: int) -> torch.Tensor:
    """``2 X^T X / n`` of calibration inputs ``X`` (n, in_features): the curvature of the output error."""
    x = check_activations(inputs, in_features).double()
    return 2 * x.t() @ x / x.shape[0]


def gptq_quantize(weight: torch.Tensor, inputs: torch.Tensor, bits: int = 4,
                  group_size: int | None = None, damp: float = 0.01,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ codes and scales for ``weight`` (out, in), calibrated on ``inputs`` (..., in).

    Returns ``(q, scales)`` shaped like :func:`round_to_nearest`'s. ``damp`` adds that fraction
    of the mean diagonal of ``H`` to its diagonal, so ``H`` is invertible even when some inputs are
    (nearly) linearly dependent. With a group size, each group's scale is chosen when the group
    is reached, from the weights as the earlier corrections left them (as the reference code does).
    """
    w, qmax = check_weight(weight), _qmax(bits)
    out_features, in_features = w.shape
    g = _groups(group_size, in_features)
    check_real("damp", damp, low=0.0, low_open=True, why="a small positive fraction, e.g. 0.01")
    h = hessian(inputs, in_features)
    dead = torch.diag(h) == 0                 # an input that is always zero: its weights do not matter
    h[dead, dead] = 1.0
    w = w.double()
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(in_features, dtype=h.dtype)
    # Upper Cholesky factor of H^-1: row i holds the inverse Hessian of columns i.. (scaled).
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    q = torch.zeros(out_features, in_features, dtype=torch.int8)
    scales = torch.zeros(out_features, in_features // g, dtype=torch.float64)
    for i in range(in_features):
        if i % g == 0:
            scales[:, i // g] = _scale(w[:, i:i + g], qmax)
        scale = scales[:, i // g]
        codes = torch.round(w[:, i] / scale).clamp(-qmax, qmax)
        q[:, i] = codes.to(torch.int8)
        err = (w[:, i] - codes * scale) / hinv[i, i]
        w[:, i + 1:] -= err[:, None] * hinv[i, i + 1:][None, :]
    if not torch.isfinite(scales).all():
        raise bad("inputs", "calibration inputs", "inputs whose Hessian is well conditioned",
                  "the corrections diverged; raise damp")
    return q, scales.float()
