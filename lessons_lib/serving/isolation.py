"""Prefix-cache isolation between tenants, and the timing side channel it closes.

A shared prefix cache is a shared resource, and shared resources leak: if tenant B's prompt is
served faster when it starts with tenant A's secret prefix, B can test guesses about A's prompts
one block at a time (a cache timing attack, the same family as Flush+Reload on CPU caches).

The fix used by serving engines: mix a **per-tenant salt** into the block hashes (vLLM's
``cache_salt``). Equal text from different tenants then hashes differently and never shares
blocks; within one tenant, caching works as before.

Here the salt is the tenant's name, which is safe only because the server sets it from the
authenticated caller: a tenant cannot send requests under another's name. A salt the *client*
supplies (vLLM's ``cache_salt`` is a request field) must instead be secret and unguessable, or
tenant B simply sends tenant A's salt.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..engine import SamplingParams
from ..validate import bad, check_int, check_str, check_token_ids
from .worker import make_engine


class TenantServer:
    """One replica serving several tenants from one engine (one prefix cache), isolated or not.

    Isolated, each request carries its tenant's name as the engine's ``cache_salt``, so blocks
    are shared within a tenant and never across tenants. The salt is derived by the server from
    the authenticated tenant, never taken from the client: a salt a client can choose, another
    client can choose too.
    """

    def __init__(self, model, isolate: bool, block_size: int = 16) -> None:
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise bad("model", model, "a TinyLM (e.g. serving.worker.load_model('random:0'))")
        if not isinstance(isolate, bool):
            raise bad("isolate", isolate, "True (a salt per tenant) or False (one shared cache)")
        self.model, self.isolate = model, isolate
        self.block_size = check_int("block_size", block_size, low=1)
        self.reset()

    def reset(self) -> None:
        """Forget everything cached (a fresh engine)."""
        self.engine = make_engine(self.model, self.block_size, max_num_seqs=4)

    def serve(self, tenant: str, prompt, max_new_tokens: int = 1) -> tuple[list[int], int, float]:
        """(new tokens, cached prompt tokens, seconds)."""
        check_str("tenant", tenant)
        check_token_ids("prompt", prompt, self.model.config.vocab_size)
        check_int("max_new_tokens", max_new_tokens, low=1)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # steadier timings, and faster for a model this small
        try:
            start = time.perf_counter()
            rid = f"{tenant}/{self.engine.num_steps}"
            self.engine.add_request(rid, list(prompt), SamplingParams(max_tokens=max_new_tokens),
                                    cache_salt=tenant if self.isolate else "")
            out = None
            while self.engine.has_unfinished_requests():
                out = next((o for o in self.engine.step() if o.finished), out)
            return out.output_token_ids, out.num_cached_tokens, time.perf_counter() - start
        finally:
            torch.set_num_threads(threads)


def probe(server: TenantServer, victim_prompt, guess_prompt, trials: int = 5) -> dict:
    """Tenant A sends ``victim_prompt``; tenant B then times ``guess_prompt`` (a hit if it guessed
    A's prefix and the cache is shared) and a control prompt of the same length (always a miss).

    Every trial starts from an empty cache, so B's own earlier probes never warm it for B.
    """
    if not isinstance(server, TenantServer):
        raise bad("server", server, "a TenantServer")
    check_int("trials", trials, low=1)
    vocab = server.model.config.vocab_size
    check_token_ids("victim_prompt", victim_prompt, vocab)
    check_token_ids("guess_prompt", guess_prompt, vocab)
    hit_t, miss_t, hit_cached, miss_cached = [], [], [], []
    for k in range(trials):
        server.reset()
        server.serve("tenant-a", victim_prompt)
        tail = [(200 + k + i) % vocab for i in range(3)]
        _, c, t = server.serve("tenant-b", list(guess_prompt) + tail)
        hit_t.append(t)
        hit_cached.append(c)
        control = [(7 * k + i) % min(vocab - 1, 250) + 1 for i in range(len(guess_prompt))] + tail
        _, c, t = server.serve("tenant-b", control)
        miss_t.append(t)
        miss_cached.append(c)
    return {"guess_cached_tokens": hit_cached, "control_cached_tokens": miss_cached,
            "guess_median_s": statistics.median(hit_t), "control_median_s": statistics.median(miss_t)}
