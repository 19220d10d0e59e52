"""A discrete-event simulation of a router in front of N workers: deterministic, so testable.

Each worker serves its FIFO queue one request at a time. A request's service time is

    (uncached prompt tokens * prefill_s_per_token + new tokens * decode_s_per_token) / speed

so a long prompt costs more than a short one, a worker with ``speed < 1`` is slow, and a prompt
whose prefix the worker has cached skips that part of prefill. The router applies a policy from
``policies.py`` at each arrival, seeing exactly what the real router sees (outstanding requests
and tokens per worker). Same trace, same policy, same seed: same numbers, to the last bit.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from ..validate import bad, check_int, check_probability, check_real, check_str_list
from .policies import POLICIES, Policy, WorkerLoad, block_hashes, make_policy
from .protocol import Request


@dataclass(frozen=True)
class TraceItem:
    arrival: float
    request: Request


def make_trace(n: int = 300, seed: int = 0, *, base_rate: float = 20.0, burst_rate: float = 120.0,
               burst_every: float = 3.0, burst_len: float = 0.6, long_share: float = 0.2,
               shared_prefix_share: float = 0.6, n_prefixes: int = 4, block_size: int = 16) -> list[TraceItem]:
    """A seeded, bursty trace: Poisson arrivals at ``base_rate``/s, ``burst_rate``/s during bursts
    of ``burst_len`` s every ``burst_every`` s; prompts short (8-40 tokens) or long (150-300);
    new tokens 4, 16 or 64; a share of prompts start with one of ``n_prefixes`` shared prefixes."""
    check_int("n", n, low=1)
    check_int("seed", seed)
    for name, rate in (("base_rate", base_rate), ("burst_rate", burst_rate)):
        check_real(name, rate, low=0, low_open=True, why="arrivals per second")
    check_real("burst_every", burst_every, low=0, low_open=True)
    check_real("burst_len", burst_len, low=0, high=burst_every, why="a burst fits in its period")
    check_probability("long_share", long_share)
    check_probability("shared_prefix_share", shared_prefix_share)
    check_int("n_prefixes", n_prefixes, low=1)
    check_int("block_size", block_size, low=1)
    rng = random.Random(seed)
    prefixes = [[rng.randrange(256) for _ in range(4 * block_size)] for _ in range(n_prefixes)]
    t, out = 0.0, []
    for i in range(n):
        rate = burst_rate if (t % burst_every) < burst_len else base_rate
        t += rng.expovariate(rate)
        length = rng.randint(150, 300) if rng.random() < long_share else rng.randint(8, 40)
        prompt = [rng.randrange(256) for _ in range(length)]
        if rng.random() < shared_prefix_share:
            prompt = rng.choice(prefixes) + prompt
        out.append(TraceItem(t, Request(f"t{i}", prompt, rng.choice((4, 16, 64)))))
    return out


@dataclass
class SimResult:
    policy: str
    latency: dict = field(default_factory=dict)      # request id -> seconds from arrival to done
    worker_of: dict = field(default_factory=dict)    # request id -> worker
    cached_tokens: int = 0
    prompt_tokens: int = 0
    makespan: float = 0.0
    timeline: list = field(default_factory=list)     # (time, worker, queue length incl. running)

    def summary(self) -> dict:
        lat = sorted(self.latency.values())
        return {"policy": self.policy, "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99),
                "throughput_rps": len(lat) / self.makespan if self.makespan else 0.0,
                "prefix_hit_rate": self.cached_tokens / max(1, self.prompt_tokens)}


def percentile(sorted_values, q: float) -> float:
    """Nearest-rank percentile of an already sorted list (what load-testing tools report)."""
    if not sorted_values:
        raise bad("sorted_values", sorted_values, "at least one value", "a percentile of nothing is undefined")
    check_real("q", q, low=0, high=100)
    k = max(0, min(len(sorted_values) - 1, int(-(-q * len(sorted_values) // 100)) - 1))
    return sorted_values[k]


def simulate(trace, policy: str | Policy, speeds=(1.0, 1.0, 1.0, 0.3), *,
             prefill_s_per_token: float = 2e-4, decode_s_per_token: float = 2e-3,
             block_size: int = 16, cache_blocks: int = 64) -> SimResult:
    """Run ``trace`` through a router with ``policy`` and workers of the given ``speeds``."""
    policy = make_policy(policy) if isinstance(policy, str) else policy
    if not isinstance(policy, Policy):
        raise bad("policy", policy, f"a policy name ({', '.join(sorted(POLICIES))}) or a Policy")
    if isinstance(speeds, (str, bytes)) or not hasattr(speeds, "__iter__") or not len(speeds):
        raise bad("speeds", speeds, "a non-empty list of positive numbers, one per worker")
    speeds = [check_real("speeds[]", s, low=0, low_open=True) for s in speeds]
    check_real("prefill_s_per_token", prefill_s_per_token, low=0)
    check_real("decode_s_per_token", decode_s_per_token, low=0)
    check_int("block_size", block_size, low=1)
    check_int("cache_blocks", cache_blocks, low=0)
    trace = list(trace)
    for item in trace:
        if not isinstance(item, TraceItem):
            raise bad("trace", item, "a list of TraceItem (from make_trace)")
        check_real("trace[].arrival", item.arrival, low=0)
    ids = [f"w{i}" for i in range(len(speeds))]
    queues = {w: deque() for w in ids}
    busy = {w: False for w in ids}
    caches = {w: OrderedDict() for w in ids}
    res = SimResult(policy.name)
    arrival = {}
    events: list = []  # (time, seq, kind, payload): seq breaks ties, so order is deterministic
    seq = 0
    for item in trace:
        heapq.heappush(events, (item.arrival, seq, "arrive", item.request))
        seq += 1

    def load(w):
        reqs = list(queues[w])
        # The blocks it caches are what its KV events would have told a real router.
        return WorkerLoad(w, len(reqs), sum(r.cost_tokens for r in reqs), cached_blocks=frozenset(caches[w]))

    def start_next(w, now):
        nonlocal seq
        r = queues[w][0]
        hashes = block_hashes(r.prompt, block_size)
        hit = 0
        while hit < len(hashes) and hashes[hit] in caches[w]:
            caches[w].move_to_end(hashes[hit])
            hit += 1
        cached = min(hit * block_size, len(r.prompt) - 1)
        for h in hashes:
            caches[w][h] = True
            caches[w].move_to_end(h)
        while len(caches[w]) > cache_blocks:
            caches[w].popitem(last=False)
        res.cached_tokens += cached
        res.prompt_tokens += len(r.prompt)
        service = ((len(r.prompt) - cached) * prefill_s_per_token
                   + r.max_new_tokens * decode_s_per_token) / speeds[ids.index(w)]
        busy[w] = True
        heapq.heappush(events, (now + service, seq, "done", w))
        seq += 1

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            r = payload
            arrival[r.id] = now
            w = policy(r, [load(x) for x in ids])
            queues[w].append(r)
            res.worker_of[r.id] = w
            res.timeline.append((now, w, len(queues[w])))
            if not busy[w]:
                start_next(w, now)
        else:
            w = payload
            r = queues[w].popleft()
            res.latency[r.id] = now - arrival[r.id]
            res.makespan = now
            busy[w] = False
            res.timeline.append((now, w, len(queues[w])))
            if queues[w]:
                start_next(w, now)
    return res


def compare_policies(trace, names=None, seed: int = 0, **kwargs) -> list[SimResult]:
    """Every policy (fresh state each; power-of-two seeded) on the same trace."""
    names = list(POLICIES) if names is None else check_str_list("names", names)
    for name in names:
        make_policy(name)   # an unknown name is refused before any simulation runs
    results = []
    for name in names:
        policy = make_policy(name, seed=seed) if name == "power-of-two" else make_policy(name)
        results.append(simulate(trace, policy, **kwargs))
    return results
