"""Checkers for notebook 02 (parallel strategies): tensor-parallel traffic, attention split by
heads on real ranks, and the TP x DP layout that serves a load."""

from __future__ import annotations

import functools
import math
import numbers

import torch
import torch.nn.functional as F

from ..launch import run_distributed
from ..sizing import (LLAMA2_13B, LLAMA2_70B, GiB, activation_bytes, fits, kv_cache_bytes,
                      memory_per_device, weight_bytes)
from ..parallel.plan import parallelize, tiny_lm_tp_plan
from ..parallel.tensor import (ColumnParallelLinear, RowParallelLinear, all_reduce_sum,
                               shard_indices)
from .check import Incorrect, exercise, labelled_cases, refuse_reference, run_ranks, with_hidden
from ..model import load_tiny_lm


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


# -- 02.predict_tp_bytes ---------------------------------------------------------------------
TP_RANKS, TP_BATCH, TP_PROMPT = 4, 3, 5


def _all_reduce_bytes_of_one_decode_step(ids: torch.Tensor) -> tuple[int, int]:
    """On one rank of the tiny LM sharded by its TP plan: prefill ``ids``, then count the bytes
    of every tensor passed to ``dist.all_reduce`` during one decode step."""
    import torch.distributed as dist

    model = parallelize(load_tiny_lm()[0], tiny_lm_tp_plan())
    cache = model.new_cache()
    sizes = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        sizes.append(tensor.numel() * tensor.element_size())
        return real(tensor, *args, **kwargs)

    with torch.no_grad():
        logits = model(ids, cache=cache)
        dist.all_reduce = counting
        try:
            model(logits[:, -1:].argmax(dim=-1), cache=cache)
        finally:
            dist.all_reduce = real
    return sum(sizes), len(sizes)


@functools.lru_cache(maxsize=1)
def _measured_tp_bytes() -> tuple[int, int]:
    """Measured once per process: the model, the plan and the inputs are fixed."""
    ids = torch.randint(0, 256, (TP_BATCH, TP_PROMPT), generator=torch.Generator().manual_seed(2))
    measured = run_ranks(_all_reduce_bytes_of_one_decode_step, TP_RANKS, ids,
                         what=f"measuring on {TP_RANKS} ranks")
    if len(set(measured)) != 1:
        raise RuntimeError(f"ranks passed different byte counts to all_reduce: {measured}")
    return measured[0]


@exercise("02.predict_tp_bytes", "predict the all-reduce bytes of one tensor-parallel decode step")
def check_predict_tp_bytes(candidate):
    refuse_reference(candidate, run_distributed, run_ranks, parallelize, tiny_lm_tp_plan)
    got = candidate()
    if not _is_number(got):
        raise Incorrect(f"predicted_tp_bytes() returned {got!r}: return a number of bytes")
    expected, calls = _measured_tp_bytes()
    p, b = TP_RANKS, TP_BATCH
    one = expected / calls                        # one all-reduce: b tokens x dim x 4 bytes
    case = (f"tp={p}, batch {b}, one decode step: measured {expected} bytes passed to all_reduce "
            f"on rank 0, you predicted {got:g}")
    if math.isclose(got, expected, abs_tol=0.5):
        return f"{case}: exactly right"
    layers = (calls - 1) // 2
    logits = b * 264 * 4
    mistakes = [
        (one * 2 * layers, "the vocabulary-parallel embedding all-reduces too: each rank looks "
                           "up only the ids it owns (zeros for the others), and one all-reduce "
                           "fills in every row"),
        (one * (layers + 1), f"two all-reduces per layer, not one: after attention's o_proj and "
                             f"after the MLP's down_proj (both row-parallel), in each of the "
                             f"{layers} layers"),
        (one * layers, "two all-reduces per layer (after o_proj and after down_proj), and one "
                       "more for the vocabulary-parallel embedding"),
        (expected / p, f"every rank passes the full hidden vector of each token to all_reduce: a "
                       f"row-parallel layer's partial sums have the full output's shape, not "
                       f"1/{p} of it"),
        (expected / 2, "the activations are float32: 4 bytes per number, not 2"),
        (expected / b, f"each of the {b} sequences sends its own token's hidden vector"),
        (expected * TP_PROMPT, f"a decode step runs one new token per sequence, not the "
                               f"{TP_PROMPT} prompt tokens"),
        (expected * (TP_PROMPT + 1), "a decode step runs only the new token: the cache holds "
                                     "the earlier ones"),
        (expected * 8, "that is bits, not bytes"),
        (expected * 2 * (p - 1) / p, f"that is what a ring all-reduce sends on {p} ranks, "
                                     f"2(p-1)/p times the payload; the question asks for the "
                                     f"payload, the sizes of the tensors passed to all_reduce"),
        (expected + logits, "the LM head's logits are gathered with all_gather, not all-reduced"),
        (expected + logits // p, "the LM head's logits are gathered with all_gather, not "
                                 "all-reduced"),
        (one, "that is one all-reduce: count every one in the step"),
    ]
    for value, cause in mistakes:
        if math.isclose(got, value, abs_tol=0.5):
            raise Incorrect(f"{case}: {cause}")
    raise Incorrect(f"{case}. Count the all-reduces of one step (which layers are row-parallel? "
                    "the embedding?) and the size of each: batch x dim float32 numbers")


# -- 02.tp_attention (build) -----------------------------------------------------------------
HEAD_DIM, SEQ = 4, 5
# (tp, n_heads, n_kv_heads, dim): 2 query heads and 1 KV head a rank; then more ranks than KV
# heads (a KV head on 2 or 3 ranks), and one KV head for all (multi-query attention).
ATTENTION_CASES = {3: ((6, 3, 12), (3, 1, 8)), 4: ((8, 4, 12), (4, 2, 8), (4, 1, 8))}
# Grading only: 5 ranks, two query heads each; KV heads split, and one KV head for all.
ATTENTION_HIDDEN = {5: ((10, 5, 12), (10, 1, 8))}


def attention(x, wq, wk, wv, wo, head_dim):
    """Causal grouped-query attention, then the output projection; head counts from the weights."""
    batch, seq, _ = x.shape
    n_q, n_kv = wq.shape[0] // head_dim, wk.shape[0] // head_dim
    q = (x @ wq.T).view(batch, seq, n_q, head_dim).transpose(1, 2)
    k = (x @ wk.T).view(batch, seq, n_kv, head_dim).transpose(1, 2)
    v = (x @ wv.T).view(batch, seq, n_kv, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_q != n_kv)
    return out.transpose(1, 2).reshape(batch, seq, n_q * head_dim) @ wo.T


def _attention_case(n_heads: int, n_kv: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, SEQ, dim, generator=g)
    wq, wk, wv = (torch.randn(n * HEAD_DIM, dim, generator=g) / dim ** 0.5
                  for n in (n_heads, n_kv, n_kv))
    wo = torch.randn(dim, n_heads * HEAD_DIM, generator=g) / dim ** 0.5
    return x, wq, wk, wv, wo


def _heads_of(rank: int, tp: int, n_heads: int, n_kv: int, kv_rule: str = "grouped"):
    """Query heads and KV heads of ``rank``; ``kv_rule="round_robin"`` is the classic slip."""
    per = n_heads // tp
    q = list(range(rank * per, (rank + 1) * per))
    if tp <= n_kv:
        kv_per = n_kv // tp
        return q, list(range(rank * kv_per, (rank + 1) * kv_per))
    if kv_rule == "round_robin":
        return q, [rank % n_kv]
    return q, [q[0] // (n_heads // n_kv)]


def _rows(heads):
    return torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in heads])


def _partial(case, rank, tp, n_heads, n_kv, kv_rule="grouped"):
    x, wq, wk, wv, wo = case
    q, kv = _heads_of(rank, tp, n_heads, n_kv, kv_rule)
    return attention(x, wq[_rows(q)], wk[_rows(kv)], wv[_rows(kv)], wo[:, _rows(q)], HEAD_DIM)


def _tp_attention_on_rank(candidate, cases):
    import torch.distributed as dist

    outputs = []
    for x, wq, wk, wv, wo, n_heads, n_kv in cases:
        try:
            with torch.no_grad():
                out = candidate(x.clone(), wq.clone(), wk.clone(), wv.clone(), wo.clone(),
                                n_heads, n_kv)
        except NotImplementedError:
            raise
        except Exception as exc:  # noqa: BLE001 - a slicing slip, made alike on every rank
            outputs.append(f"rank {dist.get_rank()} raised {type(exc).__name__}: {exc}")
            return outputs
        outputs.append(out)
    return outputs


def _shapes_hint(tp, n_heads, n_kv, dim):
    q, kv = n_heads // tp, max(1, n_kv // tp)
    return (f"Each rank keeps {q} query head(s): rows of wq, shape ({q * HEAD_DIM}, {dim}), and "
            f"the matching columns of wo, shape ({dim}, {q * HEAD_DIM}); and {kv} KV head(s): rows "
            f"of wk and wv, shape ({kv * HEAD_DIM}, {dim})")


def _diagnose_attention(got, case, rank, tp, n_heads, n_kv, dim, what):
    full = attention(*case, HEAD_DIM)
    replicated = (f" With more ranks than KV heads a rank cannot hold a fraction of a head: query "
                  f"head h uses KV head h // (n_heads / n_kv_heads) = h // {n_heads // n_kv}, so "
                  f"that head is replicated on the {tp // n_kv} ranks whose query heads use it."
                  if tp > n_kv else "")
    if isinstance(got, str):
        raise Incorrect(f"{what}: {got}. {_shapes_hint(tp, n_heads, n_kv, dim)}.{replicated}")
    if not isinstance(got, torch.Tensor) or got.shape != full.shape:
        raise Incorrect(f"{what}: rank {rank} returned "
                        f"{tuple(got.shape) if isinstance(got, torch.Tensor) else repr(got)}, "
                        f"expected a tensor of shape {tuple(full.shape)}, the whole output on "
                        "every rank")
    close = lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-5)   # noqa: E731
    if close(got, _partial(case, rank, tp, n_heads, n_kv)):
        raise Incorrect(f"{what}: rank {rank} returned only its own heads' part of the output: "
                        "the output projection of each rank's heads is one term of a sum; "
                        "all-reduce (sum) the partial outputs")
    if close(got, full / tp):
        raise Incorrect(f"{what}: rank {rank} returned the output divided by {tp}: each rank's "
                        "part is a different term of the sum, so add them (ReduceOp.SUM); do "
                        "not average")
    if tp > n_kv:
        round_robin = sum(_partial(case, r, tp, n_heads, n_kv, "round_robin") for r in range(tp))
        if close(got, round_robin):
            r = next(r for r in range(tp) if _heads_of(r, tp, n_heads, n_kv, "round_robin")
                     != _heads_of(r, tp, n_heads, n_kv))
            queries, (right,) = _heads_of(r, tp, n_heads, n_kv)
            wrong = _heads_of(r, tp, n_heads, n_kv, "round_robin")[1][0]
            raise Incorrect(f"{what}: rank {r} holds query head(s) {queries}, which use KV head "
                            f"{right}, but it took KV head {wrong} (rank % n_kv_heads)."
                            f"{replicated}")
    raise Incorrect(f"{what}: rank {rank}'s output differs from one process's attention (largest "
                    f"difference {float((got - full).abs().max()):.3g}). "
                    f"{_shapes_hint(tp, n_heads, n_kv, dim)}, consecutive heads in rank order; "
                    f"then one all-reduce of the partial outputs.{replicated}")


@exercise("02.tp_attention", "grouped-query attention split by heads over tensor-parallel ranks")
def check_tp_attention(candidate, hidden=False):
    refuse_reference(candidate, shard_indices, ColumnParallelLinear, RowParallelLinear,
                     all_reduce_sum, parallelize, tiny_lm_tp_plan)
    for label, (tp, shapes) in labelled_cases(list(ATTENTION_CASES.items()),
                                              list(ATTENTION_HIDDEN.items()), hidden):
        cases = [(*_attention_case(n_heads, n_kv, dim, seed=10 * tp + i), n_heads, n_kv)
                 for i, (n_heads, n_kv, dim) in enumerate(shapes)]
        results = run_ranks(_tp_attention_on_rank, tp, candidate, cases,
                            what=f"{label}tp={tp}, n_heads/n_kv_heads "
                                 + " then ".join(f"{h}/{kv}" for h, kv, _ in shapes))
        for i, (n_heads, n_kv, dim) in enumerate(shapes):
            case = cases[i][:5]
            what = f"{label}tp={tp}, n_heads={n_heads}, n_kv_heads={n_kv}, head_dim={HEAD_DIM}"
            full = attention(*case, HEAD_DIM)
            for rank, outputs in enumerate(results):
                got = outputs[i] if i < len(outputs) else outputs[-1]
                if isinstance(got, torch.Tensor) and got.is_floating_point():
                    got = got.detach().float()
                if (isinstance(got, torch.Tensor) and got.shape == full.shape
                        and torch.allclose(got, full, rtol=1e-4, atol=1e-5)):
                    continue
                _diagnose_attention(got, case, rank, tp, n_heads, n_kv, dim, what)
    return with_hidden("equal to one process's attention on 3 and 4 ranks, with KV heads split, "
                       "replicated on 2 and 3 ranks, and shared by all", ATTENTION_HIDDEN, hidden)


# -- 02.choose_layout (stretch) --------------------------------------------------------------
RESERVE = 0.1
LAYOUT_CASES = [  # shape, gpus, device GiB, context, sequences
    (LLAMA2_70B, 8, 80, 4096, 200),
    (LLAMA2_13B, 8, 80, 4096, 64),
    (LLAMA2_70B, 8, 80, 4096, 300),
    (LLAMA2_70B, 8, 80, 4096, 255),
    (LLAMA2_70B, 8, 80, 4096, 400),
    (LLAMA2_70B, 16, 80, 4096, 750),
    (LLAMA2_13B, 16, 24, 4096, 100),
]


def _valid_tp(shape, tp, gpus) -> bool:
    kv = shape.n_kv_heads
    return gpus % tp == 0 and shape.n_heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)


def _layout(shape, gpus, device_gib, context, sequences, *, order=1, reserve=RESERVE,
            kv_replicated=True, heads_divide=True, split_sequences=math.ceil):
    """The layout rule with switches for the classic slips."""
    tps = [t for t in range(1, gpus + 1) if gpus % t == 0
           and (_valid_tp(shape, t, gpus) or (not heads_divide))][::order]
    for tp in tps:
        dp = gpus // tp
        mine = split_sequences(sequences / dp) if split_sequences else sequences
        weights = weight_bytes(shape, "bf16") / tp
        heads = (max(1, -(-shape.n_kv_heads // tp)) if kv_replicated
                 else shape.n_kv_heads / tp)
        per_sequence = kv_cache_bytes(shape, 1, context, "bf16") * heads / shape.n_kv_heads
        total = weights + per_sequence * mine
        if total <= device_gib * GiB * (1 - reserve):
            return tp, dp
    return None


_SLIPS = [
    (dict(order=-1), "both fit, and you took the most tensor parallelism; the exercise asks for "
                     "the most replicas that hold the load: fewer ranks per all-reduce, more "
                     "independent decode streams"),
    (dict(split_sequences=None), "each replica serves only its share of the sequences "
                                 "(ceil(sequences / dp)), not all of them"),
    (dict(split_sequences=math.floor), "sequences are whole: the busiest replica serves "
                                       "ceil(sequences / dp)"),
    (dict(split_sequences=lambda x: x), "sequences are whole: the busiest replica serves "
                                        "ceil(sequences / dp)"),
    (dict(reserve=0.0), "keep 10% of each device free for the runtime: a layout fits when its "
                        "bytes are at most 0.9 x device memory"),
    (dict(kv_replicated=False), "a device cannot hold a fraction of a KV head: with tp above "
                                "n_kv_heads each device holds one KV head, replicated, so the "
                                "KV cache per device stops shrinking"),
    (dict(heads_divide=False, kv_replicated=False),
     "tp must divide the number of attention heads (whole heads per device), and divide "
     "n_kv_heads or be a multiple of it"),
]


def _describe(shape, gpus, device_gib, context, sequences) -> str:
    budget = device_gib * (1 - RESERVE)
    rows = []
    for tp in (t for t in range(1, gpus + 1) if _valid_tp(shape, t, gpus)):
        dp = gpus // tp
        mine = -(-sequences // dp)
        heads = max(1, -(-shape.n_kv_heads // tp))
        used = (weight_bytes(shape, "bf16") / tp + kv_cache_bytes(shape, mine, context, "bf16")
                * heads / shape.n_kv_heads) / GiB
        rows.append(f"tp={tp} x dp={dp}: {mine} sequences per replica, {used:.1f} GiB per device "
                    f"({'fits' if used <= budget else 'too much'})")
    return f"budget {budget:.1f} GiB per device; " + "; ".join(rows)


@exercise("02.choose_layout", "the TP x DP layout with the most replicas that holds a load")
def check_choose_layout(candidate):
    refuse_reference(candidate, memory_per_device, kv_cache_bytes, weight_bytes, activation_bytes,
                     fits)
    answers = []
    for shape, gpus, device_gib, context, sequences in LAYOUT_CASES:
        got = candidate(shape, gpus, device_gib, context, sequences)
        if got is not None:
            if (not isinstance(got, (tuple, list)) or len(got) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in got)):
                raise Incorrect(f"choose_layout({shape.name}, gpus={gpus}, ...) returned {got!r}; "
                                "return a pair of ints (tp, dp), or None when nothing fits")
            got = tuple(got)
        answers.append(got)
    expected = [_layout(*case) for case in LAYOUT_CASES]
    if answers == expected:
        return ("the most replicas that hold the load, with KV heads replicated past n_kv_heads, "
                "and None when no layout fits")
    i = next(i for i, (a, e) in enumerate(zip(answers, expected)) if a != e)
    shape, gpus, device_gib, context, sequences = LAYOUT_CASES[i]
    case = (f"{shape.name} on {gpus} GPUs of {device_gib} GiB, {sequences} sequences of {context} "
            f"tokens: you chose {answers[i]}, expected {expected[i]}")
    matching = [cause for switches, cause in _SLIPS
                if _layout(*LAYOUT_CASES[i], **switches) == answers[i]]
    whole = [cause for switches, cause in _SLIPS
             if [_layout(*c, **switches) for c in LAYOUT_CASES] == answers]
    if whole or matching:
        raise Incorrect(f"{case}: {(whole or matching)[0]}. ({_describe(*LAYOUT_CASES[i])})")
    raise Incorrect(f"{case}. ({_describe(*LAYOUT_CASES[i])})")
