"""A discrete-event simulation of a router in front of N continuously batching workers.

Each worker is what a serving worker runs (lesson 15's engine, in miniature): requests wait, up to
``max_num_seqs`` run together, and every *step* computes one token for each decoding request plus
chunks of prompts being prefilled, at most ``max_num_batched_tokens`` tokens in all. A step costs

    (step_overhead_s + prefill_s_per_token x prompt tokens + decode_s_per_token x decode tokens) / speed

the same formula for every step, whatever mixes in it (:class:`CostModel`): the overhead is what a
step costs however few tokens it computes (on a GPU, reading the weights), so a decode token, one
per step per request, costs ``decode_s_per_token + step_overhead_s / batch``. A request's first
token comes at the end of the step that finishes its prefill (TTFT), then one per step (TPOT).
A prompt whose prefix the worker has cached skips that part of prefill.

The router applies a policy from ``policies.py`` at each arrival, seeing what the real router sees:
requests and tokens it sent and not yet answered, and what the workers report (queue, running, KV
use, cached blocks). With ``load_report_interval > 0`` it sees only the workers' last report, taken
every that many seconds, as a router fed by metrics (or one of several routers) does.
Same trace, same policy, same seed: same numbers, to the last bit.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

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


def retime(trace, rate: float, seed: int = 0) -> list[TraceItem]:
    """The same requests, arriving as a Poisson process of ``rate`` per second (an offered load)."""
    check_real("rate", rate, low=0, low_open=True, why="arrivals per second")
    check_int("seed", seed)
    rng, t, out = random.Random(seed), 0.0, []
    for item in _check_trace(trace):
        t += rng.expovariate(rate)
        out.append(TraceItem(t, item.request))
    return out


@dataclass(frozen=True)
class CostModel:
    """What a worker's engine step costs, in seconds at speed 1 (the simulator's one cost formula).

    step = step_overhead_s + prefill_s_per_token x prompt tokens + decode_s_per_token x decode tokens.
    """

    step_overhead_s: float = 5e-3
    prefill_s_per_token: float = 1e-4
    decode_s_per_token: float = 1e-4
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 256

    def __post_init__(self) -> None:
        for name in ("step_overhead_s", "prefill_s_per_token", "decode_s_per_token"):
            check_real(name, getattr(self, name), low=0)
        check_int("max_num_seqs", self.max_num_seqs, low=1)
        check_int("max_num_batched_tokens", self.max_num_batched_tokens, low=self.max_num_seqs,
                  why="at least one decode token per running request")

    def step_s(self, prefill_tokens: int, decode_tokens: int) -> float:
        return (self.step_overhead_s + self.prefill_s_per_token * prefill_tokens
                + self.decode_s_per_token * decode_tokens)

    def token_costs(self) -> dict:
        """The token-cost policy's weights, from this model: a prompt token costs its own compute
        (prefill rides on steps that run anyway); a decode token costs its compute plus its share
        of a step's overhead with a full batch (each decode token needs a step of its own)."""
        return {"prefill_cost": self.prefill_s_per_token,
                "decode_cost": self.decode_s_per_token + self.step_overhead_s / self.max_num_seqs}


@dataclass
class SimResult:
    policy: str
    latency: dict = field(default_factory=dict)      # request id -> seconds from arrival to last token
    ttft: dict = field(default_factory=dict)         # request id -> seconds from arrival to first token
    tpot: dict = field(default_factory=dict)         # request id -> mean seconds between later tokens
    queue: dict = field(default_factory=dict)        # request id -> seconds from arrival to first step
    worker_of: dict = field(default_factory=dict)    # request id -> worker
    cached_tokens: int = 0
    prompt_tokens: int = 0
    makespan: float = 0.0
    timeline: list = field(default_factory=list)     # (time, worker, requests there: waiting + running)
    steps: int = 0

    def goodput(self, slo_ttft_s: float, slo_tpot_s: float) -> tuple[float, float]:
        """(requests per second that met both SLOs, fraction of requests that did)."""
        check_real("slo_ttft_s", slo_ttft_s, low=0, low_open=True)
        check_real("slo_tpot_s", slo_tpot_s, low=0, low_open=True)
        good = sum(1 for rid, t in self.ttft.items()
                   if t <= slo_ttft_s and self.tpot.get(rid, 0.0) <= slo_tpot_s)
        return (good / self.makespan if self.makespan else 0.0), good / max(1, len(self.ttft))

    def summary(self, slo_ttft_s: float = 0.5, slo_tpot_s: float = 0.05) -> dict:
        lat, ttft, tpot = sorted(self.latency.values()), sorted(self.ttft.values()), sorted(self.tpot.values())
        good_rps, attained = self.goodput(slo_ttft_s, slo_tpot_s)
        return {"policy": self.policy, "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99),
                "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
                "tpot_p50_s": percentile(tpot, 50) if tpot else 0.0,
                "tpot_p99_s": percentile(tpot, 99) if tpot else 0.0,
                "throughput_rps": len(lat) / self.makespan if self.makespan else 0.0,
                "goodput_rps": good_rps, "slo_attainment": attained,
                "prefix_hit_rate": self.cached_tokens / max(1, self.prompt_tokens)}


def percentile(sorted_values, q: float) -> float:
    """Nearest-rank percentile of an already sorted list (what load-testing tools report)."""
    if not sorted_values:
        raise bad("sorted_values", sorted_values, "at least one value", "a percentile of nothing is undefined")
    check_real("q", q, low=0, high=100)
    k = max(0, min(len(sorted_values) - 1, int(-(-q * len(sorted_values) // 100)) - 1))
    return sorted_values[k]


def _check_trace(trace) -> list[TraceItem]:
    trace = list(trace)
    for item in trace:
        if not isinstance(item, TraceItem):
            raise bad("trace", item, "a list of TraceItem (from make_trace)")
        check_real("trace[].arrival", item.arrival, low=0)
    return trace


class _Seq:
    """One request inside a simulated worker."""

    __slots__ = ("request", "arrival", "hashes", "to_prefill", "produced", "first", "last", "started")

    def __init__(self, request, arrival, hashes):
        self.request, self.arrival, self.hashes = request, arrival, hashes
        self.to_prefill = len(request.prompt)
        self.produced, self.first, self.last, self.started = 0, None, None, None


def simulate(trace, policy: str | Policy, speeds=(1.0, 1.0, 1.0, 0.3), *,
             prefill_s_per_token: float | None = None, decode_s_per_token: float | None = None,
             step_overhead_s: float | None = None, max_num_seqs: int | None = None,
             cost: CostModel | None = None, block_size: int = 16, cache_blocks: int = 64,
             load_report_interval: float = 0.0) -> SimResult:
    """Run ``trace`` through a router with ``policy`` and workers of the given ``speeds``.

    ``cost`` (a :class:`CostModel`) sets what a step costs; the keyword arguments of the same
    names override its fields. ``load_report_interval`` > 0: the policy sees the workers' load as
    reported every that many seconds, not as it is (stale load information).
    """
    policy = make_policy(policy) if isinstance(policy, str) else policy
    if not isinstance(policy, Policy):
        raise bad("policy", policy, f"a policy name ({', '.join(sorted(POLICIES))}) or a Policy")
    if isinstance(speeds, (str, bytes)) or not hasattr(speeds, "__iter__") or not len(speeds):
        raise bad("speeds", speeds, "a non-empty list of positive numbers, one per worker")
    speeds = [check_real("speeds[]", s, low=0, low_open=True) for s in speeds]
    cost = _cost(cost, prefill_s_per_token=prefill_s_per_token, decode_s_per_token=decode_s_per_token,
                 step_overhead_s=step_overhead_s, max_num_seqs=max_num_seqs)
    check_int("block_size", block_size, low=1)
    check_int("cache_blocks", cache_blocks, low=0)
    check_real("load_report_interval", load_report_interval, low=0, why="0 for fresh load information")
    trace = _check_trace(trace)
    ids = [f"w{i}" for i in range(len(speeds))]
    speed = dict(zip(ids, speeds))
    waiting = {w: deque() for w in ids}
    running: dict[str, list[_Seq]] = {w: [] for w in ids}
    busy = {w: False for w in ids}
    caches = {w: OrderedDict() for w in ids}
    owed = {w: {} for w in ids}          # request id -> Request: sent and not yet answered
    res = SimResult(policy.name)
    events: list = []  # (time, seq, kind, payload): seq breaks ties, so order is deterministic
    counter = 0

    def push(t, kind, payload):
        nonlocal counter
        heapq.heappush(events, (t, counter, kind, payload))
        counter += 1

    for item in trace:
        push(item.arrival, "arrive", item.request)
    if load_report_interval > 0 and trace:
        last = max(item.arrival for item in trace)
        k = 0
        while k * load_report_interval <= last:
            push(k * load_report_interval, "report", None)
            k += 1

    def load(w):
        reqs = owed[w].values()
        prompt, decode = sum(len(r.prompt) for r in reqs), sum(r.max_new_tokens for r in reqs)
        held = sum(len(s.request.prompt) + s.produced for s in running[w])
        return WorkerLoad(w, len(owed[w]), prompt + decode, prompt, decode, queue=len(waiting[w]),
                          running=len(running[w]), kv_usage=min(1.0, held / (cost.max_num_seqs * 1024)),
                          cached_blocks=frozenset(caches[w]))

    reported = {w: load(w) for w in ids}

    def admit(w, now):
        while waiting[w] and len(running[w]) < cost.max_num_seqs:
            s = waiting[w].popleft()
            hit = 0
            while hit < len(s.hashes) and s.hashes[hit] in caches[w]:
                caches[w].move_to_end(s.hashes[hit])
                hit += 1
            cached = min(hit * block_size, len(s.request.prompt) - 1)   # the last token is always computed
            s.to_prefill -= cached
            s.started = now
            res.cached_tokens += cached
            res.prompt_tokens += len(s.request.prompt)
            running[w].append(s)

    def start_step(w, now):
        admit(w, now)
        budget = cost.max_num_batched_tokens
        plan, decode, prefill = [], 0, 0
        for s in running[w]:                    # decode first: one token each (as the engine does)
            if s.to_prefill == 0:
                plan.append((s, 0))
                decode += 1
                budget -= 1
        for s in running[w]:                    # then prompt chunks, first come first served
            if s.to_prefill > 0 and budget > 0:
                chunk = min(s.to_prefill, budget)
                plan.append((s, chunk))
                prefill += chunk
                budget -= chunk
        busy[w] = True
        res.steps += 1
        push(now + cost.step_s(prefill, decode) / speed[w], "step", (w, plan))

    def finish_step(w, plan, now):
        for s, chunk in plan:
            if chunk:
                s.to_prefill -= chunk
                if s.to_prefill:
                    continue                    # more prompt to go: no token yet
                for h in s.hashes:              # its full blocks now hold keys and values: cacheable
                    caches[w][h] = True
                    caches[w].move_to_end(h)
                while len(caches[w]) > cache_blocks:
                    caches[w].popitem(last=False)
            s.produced += 1
            if s.first is None:
                s.first = now
            s.last = now
            r = s.request
            if s.produced == r.max_new_tokens:
                running[w].remove(s)
                del owed[w][r.id]
                res.latency[r.id] = now - s.arrival
                res.ttft[r.id] = s.first - s.arrival
                res.queue[r.id] = s.started - s.arrival
                if r.max_new_tokens > 1:
                    res.tpot[r.id] = (now - s.first) / (r.max_new_tokens - 1)
                res.makespan = now
                res.timeline.append((now, w, len(owed[w])))
        busy[w] = False
        if running[w] or waiting[w]:
            start_step(w, now)

    hashes_of: dict[str, list[str]] = {}
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            r = payload
            if load_report_interval > 0:
                # The router's picture is the last report: not even its own sends since then.
                w = policy(r, [reported[x] for x in ids])
            else:
                w = policy(r, [load(x) for x in ids])
            if r.prompt not in hashes_of:
                hashes_of[r.prompt] = block_hashes(r.prompt, block_size)
            owed[w][r.id] = r
            waiting[w].append(_Seq(r, now, hashes_of[r.prompt]))
            res.worker_of[r.id] = w
            res.timeline.append((now, w, len(owed[w])))
            if not busy[w]:
                # Start after every arrival of this same instant has joined (one batch, not several).
                busy[w] = True
                push(now, "kick", w)
        elif kind == "kick":
            start_step(payload, now)
        elif kind == "report":
            reported = {x: load(x) for x in ids}
        else:
            finish_step(payload[0], payload[1], now)
    return res


def _cost(cost, **overrides) -> CostModel:
    if cost is None:
        cost = CostModel()
    if not isinstance(cost, CostModel):
        raise bad("cost", cost, "a CostModel (or None for the default)")
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return cost
    fields = {k: getattr(cost, k) for k in ("step_overhead_s", "prefill_s_per_token", "decode_s_per_token",
                                             "max_num_seqs", "max_num_batched_tokens")}
    return CostModel(**{**fields, **given})


def fit_cost_model(samples, max_num_seqs: int = 8, max_num_batched_tokens: int = 256) -> CostModel:
    """The :class:`CostModel` that best fits measured steps, ``samples`` a list of (prompt tokens,
    decode tokens, seconds) per step: least squares, no coefficient below 0."""
    rows = [tuple(x) for x in samples]
    if len(rows) < 3 or not all(len(x) == 3 for x in rows):
        raise bad("samples", samples, "at least 3 (prompt tokens, decode tokens, seconds) triples")
    for p, d, t in rows:
        check_int("samples[].prompt_tokens", p, low=0)
        check_int("samples[].decode_tokens", d, low=0)
        check_real("samples[].seconds", t, low=0)
    a = np.array([[1.0, p, d] for p, d, _ in rows])
    y = np.array([t for _, _, t in rows])
    keep = [0, 1, 2]
    while True:   # drop a coefficient that fits below zero and refit the others
        coef = np.zeros(3)
        coef[keep] = np.linalg.lstsq(a[:, keep], y, rcond=None)[0]
        negative = [k for k in keep if coef[k] < 0]
        if not negative:
            break
        keep.remove(min(negative, key=lambda k: coef[k]))
    return CostModel(float(coef[0]), float(coef[1]), float(coef[2]), max_num_seqs, max_num_batched_tokens)


def measure_capacity(trace, speeds=(1.0, 1.0, 1.0, 0.3), cost: CostModel | None = None, **kwargs) -> float:
    """The fleet's capacity in requests per second, measured at saturation: each worker alone gets
    every request of ``trace`` at time 0 and serves them with full batches; its requests per second
    from first arrival to last answer are summed over the workers (what a perfect balancer could
    reach: no policy does better)."""
    trace = _check_trace(trace)
    if not trace:
        raise bad("trace", trace, "at least one request")
    burst = [TraceItem(0.0, item.request) for item in trace]
    total = 0.0
    for s in speeds:
        r = simulate(burst, "round-robin", speeds=(s,), cost=cost, **kwargs)
        total += len(trace) / r.makespan
    return total


def compare_policies(trace, names=None, seed: int = 0, **kwargs) -> list[SimResult]:
    """Every policy (fresh state each; power-of-two seeded; token-cost weighted by the simulator's
    own costs) on the same trace."""
    names = list(POLICIES) if names is None else check_str_list("names", names)
    for name in names:
        make_policy(name)   # an unknown name is refused before any simulation runs
    cost = _cost(kwargs.pop("cost", None), **{k: kwargs.pop(k, None) for k in (
        "prefill_s_per_token", "decode_s_per_token", "step_overhead_s", "max_num_seqs")})
    results = []
    for name in names:
        if name == "power-of-two":
            policy = make_policy(name, seed=seed)
        elif name == "token-cost":
            policy = make_policy(name, **cost.token_costs())
        else:
            policy = make_policy(name)
        results.append(simulate(trace, policy, cost=cost, **kwargs))
    return results
