"""Model-state fingerprints: one SHA-256 that changes if any weight, name, dtype or shape does.

At inference the weights are read-only, so "consistency" means every replica and every shard
serves the same model version. Comparing fingerprints is how you check it cheaply: 64 hex
characters per replica instead of gigabytes of weights. Checkpoints record theirs
(``model.checkpoint``); lesson 05 compares them across replicas and shards
(``serving.fingerprint``).
"""

from __future__ import annotations

import hashlib

import torch

from ..validate import bad, check_str


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        raise bad(f"state[{name!r}]" if name else "t", t, "a dense torch.Tensor")


def _check_state(arg: str, state) -> None:
    if not isinstance(state, dict):
        raise bad(arg, state, "a dict of name -> tensor (a state_dict)", f"got a {type(state).__name__}")
    for name, t in state.items():
        if not isinstance(name, str):
            raise bad(arg, state, "a dict of name -> tensor (a state_dict)", f"the key {name!r} is not a str")
        _check_tensor(name, t)


def tensor_digest(name: str, t: torch.Tensor) -> str:
    """SHA-256 over the name, dtype, shape and raw bytes of one tensor."""
    check_str("name", name, allow_empty=True)
    _check_tensor("", t)
    h = hashlib.sha256()
    h.update(name.encode())
    h.update(str(t.dtype).encode())
    h.update(str(tuple(t.shape)).encode())
    # view as bytes: bit-exact, so -0.0 != 0.0 and NaN payloads count, as they should.
    h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state_fingerprint(state: dict) -> str:
    """One hex digest of a whole ``state_dict`` (names sorted, so insertion order is irrelevant)."""
    _check_state("state", state)
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(tensor_digest(name, state[name]).encode())
    return h.hexdigest()


def diff_states(a: dict, b: dict) -> list[str]:
    """Names whose tensors differ (or exist on one side only), sorted."""
    _check_state("a", a)
    _check_state("b", b)
    names = sorted(set(a) | set(b))
    return [n for n in names if n not in a or n not in b
            or tensor_digest(n, a[n]) != tensor_digest(n, b[n])]


def short(fp: str) -> str:
    """The first 12 hex digits: enough to tell versions apart in a table."""
    check_str("fp", fp)
    return fp[:12]
