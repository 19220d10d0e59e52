"""Checkers for notebook 05 (consistency)."""

import torch

from ..serving.fingerprint import state_fingerprint
from .check import Incorrect, exercise


def _states():
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(3, 4, generator=g), "b": torch.zeros(4), "n": torch.arange(3)}
    yield "a copy", base, {k: v.clone() for k, v in base.items()}, True
    yield "the same tensors inserted in another order", base, dict(reversed(list(base.items()))), True
    one = {k: v.clone() for k, v in base.items()}
    one["w"][2, 3] = torch.nextafter(one["w"][2, 3], torch.tensor(10.0))
    yield "one element changed by one ulp", base, one, False
    yield "a tensor renamed", base, {("bias" if k == "b" else k): v for k, v in base.items()}, False
    yield "a tensor reshaped (same bytes)", base, {**base, "w": base["w"].reshape(4, 3)}, False
    yield "a tensor cast to float64", base, {**base, "b": base["b"].double()}, False
    yield "+0.0 replaced by -0.0", base, {**base, "b": -base["b"]}, False
    yield "a non-contiguous view with equal values", base, {**base, "w": base["w"].t().contiguous().t()}, True


@exercise("05.fingerprint", "a SHA-256 fingerprint of a state_dict")
def check_fingerprint(candidate):
    for what, a, b, same in _states():
        fa, fb = candidate(a), candidate(b)
        if not (isinstance(fa, str) and len(fa) == 64 and all(c in "0123456789abcdef" for c in fa)):
            raise Incorrect(f"return hashlib.sha256(...).hexdigest(): 64 lowercase hex characters; got {fa!r}")
        if (fa == fb) != same:
            raise Incorrect(f"{what}: the fingerprints should be {'equal' if same else 'different'}. "
                            "Hash each name, dtype, shape and the raw bytes, with names sorted.")
    if candidate({"x": torch.ones(2)}) != candidate({"x": torch.ones(2)}):
        raise Incorrect("the same state gave two fingerprints: is something random in it?")
    return "detects one-ulp, name, shape, dtype and sign-of-zero changes; ignores order and layout"
