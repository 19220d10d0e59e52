"""Is speculative sampling lossless? A chi-square goodness-of-fit test, from counts to a p-value.

"Looks right" is not evidence: draw many tokens, count each value, and ask how likely counts at
least this far from the target's probabilities would be if the draws really came from them.
"""

from __future__ import annotations

import math

import torch

from ..validate import bad, check_real

__all__ = ["chi_square"]


def chi_square(counts, probs, *, min_expected: float = 5.0) -> tuple[float, int, float]:
    """Pearson's chi-square test of ``counts`` (one per token) against ``probs``.

    Tokens whose expected count is below ``min_expected`` are pooled into one bin (the test's
    chi-square approximation needs about 5 per bin). Returns ``(statistic, degrees of freedom,
    p-value)``; a p-value below the chosen significance (say 0.001) rejects "same distribution".
    """
    counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
    probs = torch.as_tensor(probs, dtype=torch.float64).flatten()
    if counts.shape != probs.shape or counts.numel() < 2:
        raise bad("counts", f"{counts.numel()} counts", f"one count per probability ({probs.numel()})")
    if bool((counts < 0).any()) or float(counts.sum()) <= 0:
        raise bad("counts", counts.tolist()[:8], "non-negative counts with at least one draw")
    if bool((probs < 0).any()) or not math.isclose(float(probs.sum()), 1.0, abs_tol=1e-4):
        raise bad("probs", probs.tolist()[:8], "a probability vector (non-negative, summing to 1)")
    check_real("min_expected", min_expected, low=0.0, low_open=True)
    n = counts.sum()
    expected = probs / probs.sum() * n
    small = expected < min_expected
    if bool((counts[expected == 0] > 0).any()):
        return math.inf, 0, 0.0          # a token the target never produces was drawn
    obs = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    dof = obs.numel() - 1
    if dof < 1:
        raise bad("counts", f"{int(n)} draws", "enough draws for two bins of at least min_expected each")
    stat = float(((obs - exp) ** 2 / exp).sum())
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                            torch.tensor(stat / 2, dtype=torch.float64)))
    return stat, dof, p_value
