"""Router policies: which worker gets the next request.

A policy sees the request and a snapshot of every live worker (:class:`WorkerLoad`) and returns
one worker id. The same policy objects drive the discrete-event simulation (``simulate.py``) and
the real router (``router.py``), so what the simulation predicts is what the router does.

* ``RoundRobin``: the next worker in turn; blind to load.
* ``LeastOutstanding``: fewest requests in flight (queued or running).
* ``PowerOfTwoChoices``: sample two workers at random, take the less loaded (Mitzenmacher):
  nearly as good as least-outstanding and needs no global view, so it scales to many routers.
* ``TokenCostAware``: least outstanding *work*: prompt tokens and new tokens each weighted by
  what they cost the worker (``prefill_cost``, ``decode_cost``), since one long request costs as
  much as many short ones, and a decode token (one engine step each) costs more than a prompt
  token (hundreds per step).
* ``PrefixCacheAware``: the worker that holds the longest cached prefix of the prompt (its KV
  cache skips that prefill); ties, and prompts nobody has cached, go to the least loaded.
* ``BoundedPrefixAffinity``: the same, among workers whose load is within a bound of the mean.
* ``KVAware``: cached overlap minus alpha x load, from what the workers report they hold.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from ..caching.prefix_cache import block_hashes
from ..validate import check_choice, check_int, check_real


@dataclass
class WorkerLoad:
    """What a router knows about one live worker when it routes."""

    id: str
    outstanding: int = 0          # requests sent and not yet answered
    outstanding_tokens: int = 0   # sum of their prompt + max_new_tokens
    # The same split in two (None: unknown, and a cost-aware policy uses outstanding_tokens):
    outstanding_prompt_tokens: int | None = None
    outstanding_decode_tokens: int | None = None
    # What the worker's last heartbeat said (a real router only; the simulator leaves the defaults):
    queue: int = 0                # requests waiting in its engine
    running: int = 0              # requests its engine is decoding
    kv_usage: float = 0.0         # fraction of its KV blocks in use
    cached_blocks: frozenset = frozenset()   # block hashes its prefix cache holds


class Policy:
    name = "policy"

    def choose(self, request, workers: Sequence[WorkerLoad]) -> str:
        raise NotImplementedError

    def __call__(self, request, workers: Sequence[WorkerLoad]) -> str:
        if not workers:
            raise ValueError("no live worker to route to")
        return self.choose(request, workers)


class RoundRobin(Policy):
    name = "round-robin"

    def __init__(self) -> None:
        self.turn = 0

    def choose(self, request, workers):
        w = workers[self.turn % len(workers)]
        self.turn += 1
        return w.id


class LeastOutstanding(Policy):
    name = "least-outstanding"

    def choose(self, request, workers):
        # min() keeps the first of equals, so ties go to the lowest-listed worker: deterministic.
        return min(workers, key=lambda w: w.outstanding).id


class PowerOfTwoChoices(Policy):
    name = "power-of-two"

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(check_int("seed", seed))

    def choose(self, request, workers):
        if len(workers) == 1:
            return workers[0].id
        a, b = self.rng.sample(range(len(workers)), 2)
        return min(workers[a], workers[b], key=lambda w: w.outstanding).id


class TokenCostAware(Policy):
    """Least outstanding work, in seconds if the costs are seconds per token.

    work = ``prefill_cost`` x outstanding prompt tokens + ``decode_cost`` x outstanding new tokens.
    With both 1 it counts tokens. The simulator passes its own costs (``simulate.CostModel.token_costs``):
    a prompt token costs its share of a prefill step, a decode token a whole step shared by the batch.
    """

    name = "token-cost"

    def __init__(self, prefill_cost: float = 1.0, decode_cost: float = 1.0) -> None:
        self.prefill_cost = check_real("prefill_cost", prefill_cost, low=0, why="cost of one prompt token")
        self.decode_cost = check_real("decode_cost", decode_cost, low=0, why="cost of one new token")

    def work(self, w: WorkerLoad) -> float:
        if w.outstanding_prompt_tokens is None or w.outstanding_decode_tokens is None:
            return float(w.outstanding_tokens)
        return self.prefill_cost * w.outstanding_prompt_tokens + self.decode_cost * w.outstanding_decode_tokens

    def choose(self, request, workers):
        return min(workers, key=lambda w: (self.work(w), w.outstanding)).id


class PrefixCacheAware(Policy):
    """Keeps its own picture of each worker's prefix cache: the block hashes it sent there."""

    name = "prefix-aware"

    def __init__(self, block_size: int = 16, capacity: int = 64) -> None:
        self.block_size = check_int("block_size", block_size, low=1)
        self.capacity = check_int("capacity", capacity, low=1)
        self.cached: dict[str, OrderedDict] = {}

    def matched_blocks(self, worker_id: str, hashes: list[str]) -> int:
        have = self.cached.get(worker_id, {})
        n = 0
        while n < len(hashes) and hashes[n] in have:
            n += 1
        return n

    def choose(self, request, workers):
        hashes = block_hashes(request.prompt, self.block_size)
        best = min(workers, key=lambda w: (-self.matched_blocks(w.id, hashes),
                                           w.outstanding_tokens, w.outstanding))
        seen = self.cached.setdefault(best.id, OrderedDict())
        for h in hashes:
            seen[h] = True
            seen.move_to_end(h)
        while len(seen) > self.capacity:
            seen.popitem(last=False)
        return best.id


class BoundedPrefixAffinity(PrefixCacheAware):
    """Prefix affinity with a load bound: the longest cached prefix among workers not overloaded.

    Pure prefix affinity sends every request of a popular system prompt to one worker. Here a
    worker is a candidate only while its outstanding requests stay within ``load_factor`` x the
    mean (+1), the bound of consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam,
    SODA 2018); among candidates the longest match wins.
    """

    name = "prefix-affinity-bounded"

    def __init__(self, block_size: int = 16, capacity: int = 64, load_factor: float = 1.25) -> None:
        super().__init__(block_size, capacity)
        self.load_factor = check_real("load_factor", load_factor, low=1,
                                      why="1 allows no worker above the mean load")

    def choose(self, request, workers):
        bound = self.load_factor * sum(w.outstanding for w in workers) / len(workers) + 1
        return super().choose(request, [w for w in workers if w.outstanding <= bound] or workers)


class KVAware(Policy):
    """Score = blocks of the prompt the worker's KV cache holds - alpha x its load; highest wins.

    The router learns what each worker holds from the worker's own events (blocks stored and
    removed by its prefix cache, sent with its heartbeats: ``WorkerLoad.cached_blocks``), not from
    a guess of where it sent what, as llm-d's precise prefix-cache scorer and NVIDIA Dynamo's KV
    router do. Load is the worker's outstanding requests.
    """

    name = "kv-aware"

    def __init__(self, block_size: int = 16, alpha: float = 1.0) -> None:
        self.block_size = check_int("block_size", block_size, low=1)
        self.alpha = check_real("alpha", alpha, low=0, why="blocks of overlap one outstanding request is worth")

    def choose(self, request, workers):
        hashes = block_hashes(request.prompt, self.block_size)

        def overlap(w):
            n = 0
            while n < len(hashes) and hashes[n] in w.cached_blocks:
                n += 1
            return n

        return max(workers, key=lambda w: (overlap(w) - self.alpha * w.outstanding, -w.outstanding)).id


POLICIES = {cls.name: cls for cls in (RoundRobin, LeastOutstanding, PowerOfTwoChoices,
                                      TokenCostAware, PrefixCacheAware, BoundedPrefixAffinity, KVAware)}


def make_policy(name: str, **kwargs) -> Policy:
    """A fresh policy by name (policies keep state, so each run gets its own)."""
    check_choice("policy", name, sorted(POLICIES))
    return POLICIES[name](**kwargs)
