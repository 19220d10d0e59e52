"""Requests to serve, and the single-process oracle their answers must equal.

Prompts are short byte-tokenised sentences, several sharing a long prefix (a "system prompt"),
so prefix caching has something to find. Everything is seeded: the same call gives the same
requests, and greedy decoding gives the same answers, on any number of workers.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import FIRST_COMPLETED, wait

import torch

from ..engine import SamplingParams
from ..model import generate
from ..tokenizer import ByteTokenizer
from ..validate import bad, check_int, check_probability, check_real, check_str, check_str_list
from .policies import Policy, make_policy
from .protocol import Request
from .simulate import fit_cost_model, percentile
from .worker import load_model, make_engine

SYSTEM_PROMPTS = (
    "You are a helpful assistant for a distributed inference course. Answer briefly. ",
    "System: translate the user's sentence into French, keeping names unchanged. ",
)
QUESTIONS = ("What is tensor parallelism?", "Why cache keys and values?", "Name a collective.",
             "How big is the KV cache?", "What does a router do?", "Explain pipeline bubbles.",
             "Hello", "Is gloo faster than NCCL?")


def make_prompt(rng: random.Random, shared_prefix_share: float = 0.5, tag: str = "") -> list[int]:
    text = rng.choice(QUESTIONS) + " #" + str(rng.randrange(1000))
    if rng.random() < shared_prefix_share:
        text = rng.choice(SYSTEM_PROMPTS) + text
    # A tag at the very start makes every block hash new: earlier runs' cached prefixes never match.
    return ByteTokenizer().encode(tag + text)


def make_requests(n: int, seed: int = 0, max_new_tokens: int = 3, prefix: str = "r",
                  shared_prefix_share: float = 0.5, tag: str = "") -> list[Request]:
    """``n`` seeded requests with ids ``{prefix}0 .. {prefix}{n-1}``; ``tag`` starts every prompt."""
    check_int("n", n, low=1)
    check_int("seed", seed)
    check_int("max_new_tokens", max_new_tokens, low=1)
    check_str("prefix", prefix, allow_empty=True)
    check_probability("shared_prefix_share", shared_prefix_share)
    check_str("tag", tag, allow_empty=True)
    rng = random.Random(seed)
    return [Request(f"{prefix}{i}", make_prompt(rng, shared_prefix_share, tag), max_new_tokens)
            for i in range(n)]


def reference_tokens(requests, model=None, model_spec: str = "auto") -> dict[str, tuple[int, ...]]:
    """The oracle: each request's new tokens from one process running :func:`generate`."""
    requests = list(requests)
    for r in requests:
        if not isinstance(r, Request):
            raise bad("requests", r, "a list of Request")
    model = load_model(model_spec) if model is None else model
    out, memo = {}, {}
    threads = torch.get_num_threads()
    # The tiny LM's matmuls are too small to split: on a busy machine, intra-op threads spend
    # more time waiting for each other than computing (measured: up to 60x slower with 2).
    torch.set_num_threads(1)
    try:
        for r in requests:
            key = (r.prompt, r.max_new_tokens)
            if key not in memo:
                ids = generate(model, torch.tensor([list(r.prompt)]), r.max_new_tokens)
                memo[key] = tuple(ids[0, len(r.prompt):].tolist())
            out[r.id] = memo[key]
    finally:
        torch.set_num_threads(threads)
    return out


def _policy(spec):

    if isinstance(spec, Policy):
        return spec
    return make_policy(spec)   # refuses an unknown name with the list of known ones


def measure_step_costs(model, requests, max_num_seqs: int = 8, block_size: int = 16):
    """A :class:`~.simulate.CostModel` fitted to the engine's own steps on ``requests`` (served
    together, one thread, as a worker does): each step timed, with the prompt and decode tokens
    it computed."""
    requests = list(requests)
    for r in requests:
        if not isinstance(r, Request):
            raise bad("requests", r, "a list of Request")
    engine = make_engine(model, block_size, max_num_seqs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    samples = []
    try:
        for r in requests:
            engine.add_request(r.id, list(r.prompt), SamplingParams(max_tokens=r.max_new_tokens))
        while engine.has_unfinished_requests():
            before = {rid: q.num_computed_tokens < len(q.prompt_token_ids) for rid, q in engine.requests.items()}
            start = time.perf_counter()
            engine.step()
            seconds = time.perf_counter() - start
            plan = engine.last_schedule.scheduled
            prompt = sum(n for q, n in plan if before.get(q.request_id, False))
            samples.append((prompt, sum(n for q, n in plan) - prompt, seconds))
    finally:
        torch.set_num_threads(threads)
    return fit_cost_model(samples[2:], max_num_seqs, engine.max_num_batched_tokens)   # 2 warm-up steps out


def measure_fleet_capacity(router, n: int = 120, seed: int = 0, max_new_tokens: int = 8,
                     concurrency: int | None = None, tag: str = "[capacity] ",
                     timeout: float = 120.0) -> float:
    """The fleet's capacity in requests per second, measured at saturation, closed loop: keep
    ``concurrency`` requests in flight (default: 2 x the workers' ``max_num_seqs`` summed, so
    every engine runs full batches with a queue behind them), send a new one as each is answered,
    routed to the least loaded worker; ``n`` answers / the time they took."""
    check_int("n", n, low=1)
    if concurrency is None:
        concurrency = 2 * sum(h.spec.max_num_seqs for h in router.workers.values() if h.alive)
    check_int("concurrency", concurrency, low=1)
    check_real("timeout", timeout, low=0, low_open=True)
    reqs = make_requests(n, seed=seed, max_new_tokens=max_new_tokens, prefix="capacity-",
                         shared_prefix_share=0.8, tag=tag)
    before, router.policy = router.policy, make_policy("least-outstanding")
    try:
        start = time.monotonic()
        pending, sent = set(), 0
        while sent < n or pending:
            while sent < n and len(pending) < concurrency:
                pending.add(router.submit(reqs[sent]))
                sent += 1
            done, pending = wait(pending, timeout=max(0.1, start + timeout - time.monotonic()),
                                 return_when=FIRST_COMPLETED)
            for f in done:
                f.result()
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"capacity measurement: {len(pending)} requests unanswered after {timeout} s")
        return n / (time.monotonic() - start)
    finally:
        router.policy = before


def replay(router, policy_names, n: int = 40, seed: int = 0, max_new_tokens: int = 8,
           rate: float = 60.0, slo_ttft_s: float = 0.5, slo_tpot_s: float = 0.05, rounds: int = 1) -> list[dict]:
    """Send the same seeded requests through ``router`` once per policy (a name or a Policy):
    TTFT, TPOT, latency percentiles, throughput and goodput under the SLO, per policy.

    Arrivals are Poisson at ``rate`` per second. Each policy's prompts start with a different tag,
    so no policy profits from prefixes another left in the workers' caches. With ``rounds`` > 1 the
    requests are split into that many slices and the policies take turns, slice by slice, so a
    slow spell of a shared machine falls on every policy alike rather than on one. TTFT is the
    client's (:attr:`Response.client_ttft_s`: network and router queue included), TPOT the
    engine's; goodput counts the requests within both SLOs, per second of the policy's runs.
    """
    if isinstance(policy_names, (str, bytes)) or not hasattr(policy_names, "__iter__"):
        check_str_list("policy_names", policy_names)   # refused: a bare string is not a list
    policies = [_policy(p) for p in policy_names]   # every name checked before a request is sent
    if not policies:
        raise bad("policy_names", policy_names, "at least one policy name or Policy")
    check_int("n", n, low=1)
    check_int("seed", seed)
    check_int("max_new_tokens", max_new_tokens, low=1)
    check_real("rate", rate, low=0, low_open=True, why="requests per second")
    check_real("slo_ttft_s", slo_ttft_s, low=0, low_open=True)
    check_real("slo_tpot_s", slo_tpot_s, low=0, low_open=True)
    check_int("rounds", rounds, low=1, high=n, why="slices of the requests, at least one request each")
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        arrivals.append(t)
    bounds = [n * i // rounds for i in range(rounds + 1)]
    requests = [make_requests(n, seed=seed, max_new_tokens=max_new_tokens, prefix=f"{p.name}-{k}-",
                              shared_prefix_share=0.8, tag=f"[{k}] ") for k, p in enumerate(policies)]
    responses = [[] for _ in policies]
    walls = [0.0] * len(policies)
    for lo, hi in zip(bounds, bounds[1:]):
        offsets = [a - (arrivals[lo - 1] if lo else 0.0) for a in arrivals[lo:hi]]
        for k, policy in enumerate(policies):
            router.policy = policy
            start = time.monotonic()
            responses[k] += router.run(requests[k][lo:hi], arrival_times=offsets)
            walls[k] += time.monotonic() - start
    rows = []
    for policy, reqs, got, wall in zip(policies, requests, responses, walls):
        lat = sorted(r.latency_s for r in got)
        ttft = sorted(r.client_ttft_s for r in got)
        tpot = sorted(r.tpot_s for r in got if r.tpot_s is not None)
        good = sum(r.client_ttft_s <= slo_ttft_s and (r.tpot_s or 0.0) <= slo_tpot_s for r in got)
        rows.append({"policy": policy.name, "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99),
                     "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
                     "tpot_p50_s": percentile(tpot, 50) if tpot else 0.0,
                     "tpot_p99_s": percentile(tpot, 99) if tpot else 0.0,
                     "throughput_rps": n / wall, "goodput_rps": good / wall, "slo_attainment": good / n,
                     "prefix_hit_rate": sum(r.cached_tokens for r in got) / sum(len(q.prompt) for q in reqs),
                     "served_by": {w: sum(r.worker == w for r in got) for w in sorted(router.workers)}})
    return rows
