"""Serving one model version end to end, during a rolling update.

Weights never change *while* serving; they change between versions. During a rolling update the
fleet is mixed: some replicas serve v1, some v2. A request that takes several steps (a chat turn
continued, a long generation split into chunks, a speculative-decoding verify step) must see one
version for all of them, or its output matches neither version. The fix is **version pinning**:
the first step records the version that served it, and later steps carry it, so the router only
sends them to replicas of that version (``Request.version``).
"""

from __future__ import annotations

from ..validate import bad, check_int, check_str
from .protocol import Request


def run_session(router, session_id: str, prompt, steps: int = 2, tokens_per_step: int = 3,
                pin: bool = True) -> dict:
    """Generate ``steps * tokens_per_step`` tokens in ``steps`` separate requests.

    Returns the tokens, and the (worker, version) that served each step.
    """
    check_str("session_id", session_id)
    check_int("steps", steps, low=1)
    check_int("tokens_per_step", tokens_per_step, low=1)
    context, tokens, served, version = list(prompt), [], [], None
    for k in range(steps):
        req = Request(f"{session_id}/step{k}", tuple(context), tokens_per_step,
                      version=version if pin else None)
        resp = router.submit(req).result(timeout=120)
        served.append((resp.worker, resp.version))
        version = resp.version if version is None else version
        tokens += resp.tokens
        context += resp.tokens
    return {"tokens": tuple(tokens), "served": served,
            "mixed": len({v for _, v in served}) > 1}


def rolling_update(router, old_ids, new_specs, on_step=None) -> None:
    """Replace ``old_ids`` one at a time: start the new replica first, then drain the old one, so
    capacity never drops. ``on_step(router)`` runs after each replacement (e.g. to send traffic)."""
    old_ids, new_specs = list(old_ids), list(new_specs)
    if len(old_ids) != len(new_specs):
        raise bad("new_specs", f"{len(new_specs)} specs", f"one per old worker ({len(old_ids)})")
    for old in old_ids:
        if old not in router.workers:
            raise bad("old_ids", old, f"ids of running workers ({', '.join(sorted(router.workers))})")
    for old, spec in zip(old_ids, new_specs):
        router.add_worker(spec)
        router.drain(old)
        if on_step is not None:
            on_step(router)
