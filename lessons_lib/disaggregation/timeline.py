"""Colocated against disaggregated serving on one trace: a discrete-event timeline over real engines.

Every device is a real engine on the tiny LM (tokens are the model's own), but *time* comes from a
stated cost model, so the comparison does not depend on this machine, on the other processes
sharing it, or on Python's overheads. A step costs

    step_fixed + (tokens computed in the step)

in units of one token's arithmetic: ``step_fixed`` stands for what a step pays whatever its size
(reading the weights once, launching the kernels; on a GPU this is the *critical batch* of lesson
01), so decoding many requests together is cheap and a long prompt makes its step long. Moving one
token's KV over the link between prefill and decode devices costs ``transfer_per_token``.

* **Colocated**: each device runs an :class:`~lessons_lib.engine.LLMEngine` that prefills and
  decodes; a request goes to the device with the fewest unfinished requests.
* **Disaggregated**: prefill devices take prompts first come first served (several prompts per
  step up to ``prefill_budget`` tokens), send each request's KV over their link (one transfer at a
  time per link) to the decode device with the fewest running requests, which decodes only.

A request's first token counts as delivered when the decode device has it (after the transfer),
so TTFT includes the transfer.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import deque
from dataclasses import dataclass, field

import torch

from ..engine import LLMEngine, SamplingParams
from ..validate import bad, check_int, check_real
from .workers import DecodeWorker, PrefillWorker

__all__ = ["Arrival", "CostModel", "ScheduleOnlyLM", "Served", "Timeline", "draw_timeline",
           "long_prompt_trace", "percentile", "run_colocated", "run_disaggregated"]


class ScheduleOnlyLM(torch.nn.Module):
    """A stand-in for the model when only the timeline matters: the same config, no arithmetic.

    Without stop tokens, which requests run in which step depends on lengths only, never on the
    tokens, so a sweep over cost parameters can run the engines on this (every token it produces
    is 0, and its KV is zeros) and get exactly the real model's timeline, far faster.
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)   # dtype and a fingerprint

    def forward(self, input_ids, *, cache=None, **_):
        return torch.zeros(*input_ids.shape, self.config.vocab_size)


@dataclass(frozen=True)
class CostModel:
    """Time of a step and of a KV transfer, in units of one token's arithmetic."""

    step_fixed: float = 256.0
    transfer_per_token: float = 0.0

    def __post_init__(self) -> None:
        check_real("step_fixed", self.step_fixed, low=0, why="what a step costs whatever its size")
        check_real("transfer_per_token", self.transfer_per_token, low=0,
                   why="time to move one token's KV over the prefill-decode link")

    def step(self, tokens: int) -> float:
        return self.step_fixed + tokens

    def transfer(self, tokens: int) -> float:
        return self.transfer_per_token * tokens


@dataclass(frozen=True)
class Arrival:
    time: float
    request_id: str
    prompt: tuple
    max_tokens: int


def long_prompt_trace(n: int, *, seed: int = 0, prompt_len=(400, 800), max_tokens=(24, 48),
                      mean_gap: float = 600.0, vocab: int = 256) -> list[Arrival]:
    """``n`` requests, prompt lengths and answer lengths uniform in the given ranges, Poisson arrivals."""
    check_int("n", n, low=1)
    check_real("mean_gap", mean_gap, low=0, low_open=True)
    rng, t, out = random.Random(seed), 0.0, []
    for i in range(n):
        prompt = tuple(rng.randrange(1, vocab) for _ in range(rng.randint(*prompt_len)))
        out.append(Arrival(round(t, 1), f"r{i}", prompt, rng.randint(*max_tokens)))
        t += rng.expovariate(1 / mean_gap)
    return out


@dataclass
class Served:
    """One request as its client saw it: when it arrived and when each token was delivered."""

    request_id: str
    arrival: float
    prompt_len: int
    tokens: list = field(default_factory=list)
    token_times: list = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def itls(self) -> list:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def tpot(self) -> float:
        gaps = self.itls
        return sum(gaps) / len(gaps) if gaps else 0.0


def percentile(xs, q: float) -> float:
    """The q-th percentile, nearest rank."""
    xs = sorted(xs)
    if not xs:
        raise ValueError("percentile of no values")
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


@dataclass
class Timeline:
    """What a run produced: each request as served, and every device's busy intervals."""

    served: dict
    busy: list                     # (device, start, end, kind, tokens): kind is prefill, decode, mixed or transfer
    n_devices: int
    transfer_tokens: int = 0

    @property
    def makespan(self) -> float:
        return max(s.token_times[-1] for s in self.served.values())

    def itls(self) -> list:
        return [g for s in self.served.values() for g in s.itls]

    def summary(self, ttft_slo: float, tpot_slo: float) -> dict:
        """p50/p99 ITL and TTFT, SLO attainment, and goodput (requests within both SLOs per 10,000 time
        units per device)."""
        check_real("ttft_slo", ttft_slo, low=0, low_open=True)
        check_real("tpot_slo", tpot_slo, low=0, low_open=True)
        ttfts = [s.ttft for s in self.served.values()]
        met = sum(s.ttft <= ttft_slo and s.tpot <= tpot_slo for s in self.served.values())
        return {"itl_p50": percentile(self.itls(), 50), "itl_p99": percentile(self.itls(), 99),
                "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
                "tpot_p99": percentile([s.tpot for s in self.served.values()], 99),
                "slo_met": met / len(self.served),
                "goodput": 1e4 * met / self.makespan / self.n_devices}


def _check_common(arrivals, cost) -> list[Arrival]:
    if not isinstance(cost, CostModel):
        raise bad("cost", cost, "a CostModel(step_fixed=..., transfer_per_token=...)")
    if not isinstance(arrivals, (list, tuple)) or not arrivals or not all(isinstance(a, Arrival) for a in arrivals):
        raise bad("arrivals", arrivals, "a non-empty list of Arrival, e.g. long_prompt_trace(16)")
    return sorted(arrivals, key=lambda a: a.time)


class _Device:
    def __init__(self, name: str) -> None:
        self.name, self.time = name, 0.0


def _kind(num_prefill: int, num_decode: int) -> str:
    return "mixed" if num_prefill and num_decode else ("prefill" if num_prefill else "decode")


def run_colocated(model, arrivals, cost: CostModel, *, n_devices: int = 1, **engine_kwargs) -> Timeline:
    """Serve ``arrivals`` on ``n_devices`` engines that each prefill and decode."""
    pending = deque(_check_common(arrivals, cost))
    check_int("n_devices", n_devices, low=1)
    devices = [_Device(f"device {i}") for i in range(n_devices)]
    engines = [LLMEngine(model, enable_prefix_caching=False, **engine_kwargs) for _ in devices]
    served, busy = {}, []
    while pending or any(e.has_unfinished_requests() for e in engines):
        working = [i for i, e in enumerate(engines) if e.has_unfinished_requests()]
        t_step = min((devices[i].time for i in working), default=math.inf)
        if pending and pending[0].time <= t_step:
            a = pending.popleft()
            i = min(range(n_devices), key=lambda j: (engines[j].get_num_unfinished_requests(), j))
            devices[i].time = max(devices[i].time, a.time)
            engines[i].add_request(a.request_id, list(a.prompt), SamplingParams(max_tokens=a.max_tokens))
            served[a.request_id] = Served(a.request_id, a.time, len(a.prompt))
            continue
        i = min(working, key=lambda j: (devices[j].time, j))
        engine, device = engines[i], devices[i]
        outputs = engine.step()
        plan = engine.last_schedule
        # A decode computes one token past the prompt; anything else in the step is prefill.
        prefill = sum(n for r, n in plan.scheduled if n > 1 or r.num_computed_tokens <= len(r.prompt_token_ids))
        start = device.time
        device.time += cost.step(plan.num_batched_tokens)
        busy.append((device.name, start, device.time, _kind(prefill, plan.num_batched_tokens - prefill),
                     plan.num_batched_tokens))
        for out in outputs:
            served[out.request_id].tokens.extend(out.new_token_ids)
            served[out.request_id].token_times.append(device.time)
    return Timeline(served, busy, n_devices)


def run_disaggregated(model, arrivals, cost: CostModel, *, n_prefill: int = 1, n_decode: int = 1,
                      prefill_budget: int = 2048, **engine_kwargs) -> Timeline:
    """Serve ``arrivals`` with ``n_prefill`` prefill devices and ``n_decode`` decode-only devices."""
    pending = deque(_check_common(arrivals, cost))
    check_int("n_prefill", n_prefill, low=1)
    check_int("n_decode", n_decode, low=1)
    check_int("prefill_budget", prefill_budget, low=1, why="prompt tokens one prefill step may take")
    block_size = engine_kwargs.get("block_size", 16)
    prefillers = [PrefillWorker(model, block_size=block_size) for _ in range(n_prefill)]
    pdev = [_Device(f"prefill {i}") for i in range(n_prefill)]
    links = [0.0] * n_prefill
    decoders = [DecodeWorker(model, enable_prefix_caching=False, **engine_kwargs) for _ in range(n_decode)]
    ddev = [_Device(f"decode {i}") for i in range(n_decode)]
    queue, in_flight, served, busy = deque(), [], {}, []       # in_flight: (arrival at decode, seq, transfer)
    moved, order = 0, itertools.count()
    while pending or queue or in_flight or any(d.has_unfinished_requests() for d in decoders):
        t_arrive = pending[0].time if pending else math.inf
        t_kv = min((t for t, _, _ in in_flight), default=math.inf)
        t_prefill = min((d.time for d in pdev), default=math.inf) if queue else math.inf
        working = [i for i, d in enumerate(decoders) if d.has_unfinished_requests()]
        t_decode = min((ddev[i].time for i in working), default=math.inf)
        now = min(t_arrive, t_kv, t_prefill, t_decode)
        if t_arrive == now:                                     # a prompt joins the prefill queue
            a = pending.popleft()
            queue.append(a)
            served[a.request_id] = Served(a.request_id, a.time, len(a.prompt))
            for d in pdev:
                d.time = max(d.time, a.time)
        elif t_kv == now:                                       # a KV transfer lands: a decode device takes it
            in_flight.sort(key=lambda x: (x[0], x[1]))
            _, _, transfer = in_flight.pop(0)
            i = min(range(n_decode), key=lambda j: (decoders[j].engine.get_num_unfinished_requests(), j))
            ddev[i].time = max(ddev[i].time, now)
            decoders[i].accept(transfer)
            served[transfer.request_id].tokens.append(transfer.first_token)
            served[transfer.request_id].token_times.append(now)
        elif t_prefill == now:                                  # a prefill step: prompts up to the budget
            i = min(range(n_prefill), key=lambda j: (pdev[j].time, j))
            batch = [queue.popleft()]
            while queue and sum(len(a.prompt) for a in batch) + len(queue[0].prompt) <= prefill_budget:
                batch.append(queue.popleft())
            tokens = sum(len(a.prompt) for a in batch)
            start = pdev[i].time
            pdev[i].time += cost.step(tokens)
            busy.append((pdev[i].name, start, pdev[i].time, "prefill", tokens))
            for a in batch:
                transfer = prefillers[i].prefill(a.request_id, list(a.prompt), a.max_tokens)
                begin = max(links[i], pdev[i].time)
                links[i] = begin + cost.transfer(transfer.num_tokens)
                moved += transfer.num_tokens
                if links[i] > begin:
                    busy.append((f"link {i}", begin, links[i], "transfer", transfer.num_tokens))
                if a.max_tokens == 1:                           # done at the prefill device
                    served[a.request_id].tokens.append(transfer.first_token)
                    served[a.request_id].token_times.append(links[i])
                else:
                    in_flight.append((links[i], next(order), transfer))
        else:                                                   # a decode step
            i = min(working, key=lambda j: (ddev[j].time, j))
            outputs = decoders[i].step()
            n = decoders[i].engine.last_schedule.num_batched_tokens
            start = ddev[i].time
            ddev[i].time += cost.step(n)
            busy.append((ddev[i].name, start, ddev[i].time, "decode", n))
            for out in outputs:
                served[out.request_id].tokens.extend(out.new_token_ids)
                served[out.request_id].token_times.append(ddev[i].time)
    return Timeline(served, busy, n_prefill + n_decode, moved)


KIND_COLOURS = {"prefill": "tab:orange", "decode": "tab:blue", "mixed": "tab:red", "transfer": "tab:green"}


def draw_timeline(timeline: Timeline, ax, title: str = "", until: float | None = None) -> None:
    """Each device's busy intervals as bars (prefill, decode, mixed steps and transfers by colour)."""
    rows = sorted({b[0] for b in timeline.busy}, key=lambda n: (n.startswith("link"), n), reverse=True)
    for y, name in enumerate(rows):
        spans = [(s, e - s) for dev, s, e, kind, _ in timeline.busy if dev == name and (until is None or s < until)]
        colours = [KIND_COLOURS[kind] for dev, s, e, kind, _ in timeline.busy
                   if dev == name and (until is None or s < until)]
        ax.broken_barh(spans, (y - 0.4, 0.8), facecolors=colours, edgecolor="white", linewidth=0.3)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("time (units of one token's arithmetic)")
    if until is not None:
        ax.set_xlim(0, until)
    if title:
        ax.set_title(title)
