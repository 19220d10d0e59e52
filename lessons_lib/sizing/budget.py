"""The time budget of one step: where a token's milliseconds go on a tensor x pipeline layout.

A step (the prefill of a prompt, or one decode step) on ``tp`` x ``pp`` GPUs is modelled as
``pp`` stages run one after another, each on a tensor-parallel group of ``tp`` GPUs:

* a stage reads its share of the weights, ``weights / (tp x pp)``, and of the KV cache from
  memory (HBM) and does its share of the arithmetic; the two overlap, so the stage takes the
  longer of the two (the roofline: memory-bound decode, compute-bound prefill);
* then it pays its all-reduces: two per decoder layer (after attention and after the MLP), each
  of ``tokens x hidden`` activations, on the TP link, with the ring cost model of lesson 03
  (:mod:`lessons_lib.comm.cost_model`) plus a fixed start-up latency per collective;
* between stages the activations cross the PP link once (a *hop*);
* with ``m`` micro-batches, the last of them leaves the last stage after
  ``m x t_stage + (pp - 1) x (t_stage + t_hop)``: the ``(pp - 1) x t_stage`` that the first
  micro-batch spends filling the pipeline is the **bubble** (Megatron-LM's definition,
  Narayanan et al., arXiv:2104.04473, section 2.2).

The parts of :func:`step_budget` add up exactly to the step's time. It is a lower-bound model: no
kernel launches, no overlap of communication with compute, one ring per all-reduce.

Hardware figures, each with its source:

* H100 SXM: HBM 3.35 TB/s and about 990 dense bf16 TFLOP/s (:mod:`lessons_lib.sizing.throughput`).
* NVLink 4 on H100 SXM: 900 GB/s total per GPU, so 450 GB/s each way (NVIDIA H100 datasheet).
* InfiniBand NDR: 400 Gb/s per port = 50 GB/s each way (NVIDIA Quantum-2 / ConnectX-7 pages).
* Latencies: NCCL's own tuning model (``src/graph/tuning.cc``) estimates a ring all-reduce with
  its low-latency (LL) protocol, the one it picks for small messages, at a base of 6.6 us plus
  0.6 us per ring step over NVLink or 2.7 us per step over the network. They are NCCL's
  estimates, not measurements.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from dataclasses import dataclass

import torch

from ..comm.cost_model import INFINIBAND_NDR_GBIT_S, NVLINK4_H100_GB_S, ring_all_reduce_terms
from .memory import DTYPE_BYTES, LLMShape, kv_cache_bytes, weight_bytes
from .throughput import H100_SXM_BF16_FLOPS, H100_SXM_HBM_BYTES_PER_S
from ..validate import bad, check_choice, check_int, check_real, check_str

__all__ = ["INFINIBAND_NDR", "LAYOUTS", "NVLINK4", "PARTS", "PART_LABELS", "Layout", "Link", "budget_table",
           "dp_against_tp", "laptop_link", "loopback_alpha_beta", "step_budget"]

NCCL_TUNING_SOURCE = "https://github.com/NVIDIA/nccl/blob/master/src/graph/tuning.cc"
NCCL_RING_LL_BASE_S = 6.6e-6        # baseLat, Ring / LL
NCCL_NVLINK_RING_LL_STEP_S = 0.6e-6  # hwLat[NVLINK], Ring / LL
NCCL_NET_RING_LL_STEP_S = 2.7e-6     # hwLat[NET], Ring / LL
PARTS = ("weights", "kv_cache", "compute", "tp_all_reduce", "pp_hops", "pp_bubble")
PART_LABELS = {"weights": "weights read", "kv_cache": "KV cache read/write",
               "compute": "compute beyond the memory time", "tp_all_reduce": "TP all-reduces",
               "pp_hops": "PP hops", "pp_bubble": "PP bubble"}


@dataclass(frozen=True)
class Link:
    """A link between GPUs in the alpha-beta model: ``bytes_per_s`` one way, ``step_latency_s`` per
    message (one ring step), ``base_latency_s`` once per collective."""

    name: str
    bytes_per_s: float
    step_latency_s: float
    base_latency_s: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        check_str("name", self.name)
        check_real("bytes_per_s", self.bytes_per_s, low=0, low_open=True)
        check_real("step_latency_s", self.step_latency_s, low=0)
        check_real("base_latency_s", self.base_latency_s, low=0)

    def send_s(self, n_bytes: float) -> float:
        """One message of ``n_bytes`` from one GPU to the next (a pipeline hop)."""
        check_real("n_bytes", n_bytes, low=0)
        return self.base_latency_s + self.step_latency_s + n_bytes / self.bytes_per_s

    def all_reduce_s(self, n_bytes: float, p: int) -> float:
        """A ring all-reduce of ``n_bytes`` on ``p`` GPUs: ``base + 2(p-1) alpha + 2(p-1)/p n beta``
        (0 on one GPU)."""
        check_int("p", p, low=1)
        if p == 1:
            return 0.0
        steps, volume = ring_all_reduce_terms(n_bytes, p)
        return self.base_latency_s + steps * self.step_latency_s + volume / self.bytes_per_s


NVLINK4 = Link("NVLink 4", NVLINK4_H100_GB_S * 1e9 / 2, NCCL_NVLINK_RING_LL_STEP_S, NCCL_RING_LL_BASE_S,
               "NVIDIA H100 datasheet https://www.nvidia.com/en-us/data-center/h100/ (900 GB/s total, "
               f"450 GB/s each way); latency: NCCL's tuning model, {NCCL_TUNING_SOURCE}")
INFINIBAND_NDR = Link("InfiniBand NDR", INFINIBAND_NDR_GBIT_S * 1e9 / 8, NCCL_NET_RING_LL_STEP_S,
                      NCCL_RING_LL_BASE_S,
                      "NVIDIA Quantum-2 InfiniBand https://www.nvidia.com/en-us/networking/quantum2/ "
                      f"(400 Gb/s per port = 50 GB/s each way); latency: NCCL's tuning model, {NCCL_TUNING_SOURCE}")


@dataclass(frozen=True)
class Layout:
    """``tp`` x ``pp`` GPUs: tensor parallelism over ``tp_link``, pipeline hops over ``pp_link``."""

    name: str
    tp: int
    pp: int = 1
    tp_link: Link = NVLINK4
    pp_link: Link = NVLINK4

    def __post_init__(self) -> None:
        check_str("name", self.name)
        check_int("tp", self.tp, low=1)
        check_int("pp", self.pp, low=1)
        for name in ("tp_link", "pp_link"):
            if not isinstance(getattr(self, name), Link):
                raise bad(name, getattr(self, name), "a Link, e.g. NVLINK4 or INFINIBAND_NDR")

    @property
    def gpus(self) -> int:
        return self.tp * self.pp


# The three layouts of a 70B model the lesson compares. Two-node TP16: a ring over 16 GPUs moves in
# lock step, so every step waits for the slowest link, the network (one NDR port per GPU assumed).
LAYOUTS = (Layout("TP8 (one node, NVLink)", 8),
           Layout("TP4 x PP2 (one node, NVLink)", 4, 2),
           Layout("TP16 (two nodes, InfiniBand)", 16, 1, INFINIBAND_NDR, INFINIBAND_NDR))


def _check_layout_fits(shape: LLMShape, layout: Layout) -> None:
    if not isinstance(layout, Layout):
        raise bad("layout", layout, "a Layout, e.g. Layout('TP8', 8)")
    if shape.n_heads % layout.tp:
        raise bad("tp", layout.tp, f"a divisor of n_heads={shape.n_heads}",
                  "tensor parallelism gives each GPU whole attention heads")
    check_int("pp", layout.pp, low=1, high=shape.n_layers,
              why=f"a stage needs at least one of the {shape.n_layers} layers")


def step_budget(shape: LLMShape, layout: Layout, *, phase: str = "decode", batch: int = 1,
                context: int = 4096, micro_batches: int = 1, dtype: str = "bf16",
                hbm_bytes_per_s: float = H100_SXM_HBM_BYTES_PER_S,
                peak_flops: float = H100_SXM_BF16_FLOPS) -> dict[str, float]:
    """Seconds of one step, in parts that add up to ``total``.

    ``phase="prefill"``: ``batch`` prompts of ``context`` tokens each (its time is the TTFT, less
    queueing and the first sampling). ``phase="decode"``: one new token for each of ``batch``
    sequences that already hold ``context`` tokens in their KV cache (its time is the TPOT).
    Every GPU is an H100 SXM unless ``hbm_bytes_per_s`` and ``peak_flops`` say otherwise.
    """
    check_choice("phase", phase, ("prefill", "decode"))
    check_int("batch", batch, low=1)
    check_int("context", context, low=1)
    check_int("micro_batches", micro_batches, low=1, high=batch,
              why=f"each micro-batch needs at least one of the batch={batch} sequences")
    check_choice("dtype", dtype, DTYPE_BYTES)
    check_real("hbm_bytes_per_s", hbm_bytes_per_s, low=0, low_open=True)
    check_real("peak_flops", peak_flops, low=0, low_open=True)
    _check_layout_fits(shape, layout)
    tp, pp, m = layout.tp, layout.pp, micro_batches
    seqs = batch / m                                      # sequences per micro-batch
    tokens = seqs * (context if phase == "prefill" else 1)
    params = shape.param_count()
    # A GPU holds n_kv_heads / tp KV heads, or one (replicated) once tp exceeds them.
    kv_share = max(1, math.ceil(shape.n_kv_heads / tp)) / shape.n_kv_heads
    weights = weight_bytes(shape, dtype) / (tp * pp) / hbm_bytes_per_s
    kv = kv_cache_bytes(shape, 1, context, dtype) * seqs * kv_share / pp / hbm_bytes_per_s
    # 2 FLOPs per weight per token, plus attention: q.k and p.v over the context (causal in prefill).
    attention = 4 * shape.n_layers * shape.hidden * seqs * (context * context / 2 if phase == "prefill"
                                                            else context)
    compute = (2 * params * tokens + attention) / (tp * pp) / peak_flops
    message = tokens * shape.hidden * DTYPE_BYTES[dtype]
    all_reduce = 2 * (shape.n_layers / pp) * layout.tp_link.all_reduce_s(message, tp)
    hop = layout.pp_link.send_s(message) if pp > 1 else 0.0
    stage = max(weights + kv, compute) + all_reduce
    parts = {"weights": m * weights, "kv_cache": m * kv, "compute": m * max(0.0, compute - weights - kv),
             "tp_all_reduce": m * all_reduce, "pp_hops": (pp - 1) * hop, "pp_bubble": (pp - 1) * stage}
    parts["total"] = sum(parts[p] for p in PARTS)
    return parts


def budget_table(shape: LLMShape, layouts=LAYOUTS, *, batch: int = 1, context: int = 4096,
                 prompt: int = 2048, micro_batches: int = 1, dtype: str = "bf16") -> list[dict]:
    """For each layout, the prefill of ``batch`` prompts of ``prompt`` tokens (TTFT) and a decode
    step at ``context`` tokens (TPOT), with decode tokens/s per GPU (one batch in flight)."""
    rows = []
    for layout in layouts:
        ttft = step_budget(shape, layout, phase="prefill", batch=batch, context=prompt,
                           micro_batches=micro_batches, dtype=dtype)
        tpot = step_budget(shape, layout, phase="decode", batch=batch, context=context, dtype=dtype)
        rows.append({"layout": layout, "ttft": ttft, "tpot": tpot,
                     "tokens_per_s_per_gpu": batch / tpot["total"] / layout.gpus})
    return rows


def dp_against_tp(shape: LLMShape, devices: int, batch: int, *, context: int = 1024,
                  link: Link = NVLINK4, dtype: str = "bf16") -> dict[str, float]:
    """Decode tokens/s per device of ``batch`` sequences on ``devices`` GPUs, two ways.

    ``dp``: ``devices`` replicas, each decoding ``batch / devices`` sequences alone, with no
    communication. ``tp``: one tensor-parallel group decoding the whole batch, paying two
    all-reduces per layer per step on ``link``. Also returns each one's step time (``*_step_s``).
    """
    check_int("devices", devices, low=1)
    check_int("batch", batch, low=devices, why="data parallelism gives every replica a sequence")
    if batch % devices:
        raise bad("batch", batch, f"a multiple of devices={devices}", "so every replica has as many sequences")
    if not isinstance(link, Link):
        raise bad("link", link, "a Link, e.g. NVLINK4")
    dp = step_budget(shape, Layout("DP replica", 1), phase="decode", batch=batch // devices,
                     context=context, dtype=dtype)["total"]
    tp = step_budget(shape, Layout(f"TP{devices}", devices, 1, link, link), phase="decode", batch=batch,
                     context=context, dtype=dtype)["total"]
    return {"dp": batch / dp / devices, "tp": batch / tp / devices, "dp_step_s": dp, "tp_step_s": tp}


def loopback_alpha_beta(sizes=(1 << 10, 1 << 14, 1 << 18, 1 << 20), repeats: int = 5) -> tuple[float, float]:
    """This machine's cost of one message between two threads over a local socket pair, fitted as
    ``alpha + n x beta`` (best of ``repeats`` round trips per size; the one-byte reply is counted
    in alpha). A cheap stand-in, in well under a second, for lesson 03's fit over gloo ranks; no
    port is opened."""
    check_int("repeats", repeats, low=1)
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__") or len(list(sizes)) < 2:
        raise bad("sizes", sizes, "at least two message sizes in bytes")
    sizes = list(sizes)
    for i, n in enumerate(sizes):
        check_int(f"sizes[{i}]", n, low=1)
    if len(set(sizes)) < 2:
        raise bad("sizes", sizes, "at least two different message sizes")
    here, there = socket.socketpair()

    def echo():
        while header := there.recv(8):
            left = int.from_bytes(header, "little")
            while left:
                left -= len(there.recv(min(left, 1 << 20)))
            there.sendall(b"k")

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    best = []
    try:
        for n in sizes:
            message = n.to_bytes(8, "little") + bytes(n)
            times = []
            for _ in range(repeats + 1):                      # the first is a warm-up
                start = time.perf_counter()
                here.sendall(message)
                here.recv(1)
                times.append(time.perf_counter() - start)
            best.append(min(times[1:]))
    finally:
        here.close()
        thread.join(timeout=5)
        there.close()
    x = torch.tensor([[1.0, float(n)] for n in sizes], dtype=torch.float64)
    y = torch.tensor(best, dtype=torch.float64)
    # relative errors, so the small messages weigh as much as the large ones
    alpha, beta = torch.linalg.lstsq(x / y[:, None], torch.ones_like(y)[:, None]).solution[:, 0].tolist()
    return max(alpha, 0.0), max(beta, 1e-15)


def laptop_link(alpha: float, beta: float) -> Link:
    """A :class:`Link` with this machine's fitted ``alpha`` (seconds per message) and ``beta``
    (seconds per byte)."""
    check_real("alpha", alpha, low=0)
    check_real("beta", beta, low=0, low_open=True)
    return Link("this machine", 1 / beta, alpha, 0.0, "fitted here (loopback_alpha_beta)")
