"""Checkers for notebook 13 (pipeline parallel code).

- ``13.predict_stage_bytes`` (predict): the bytes stage 0 sends to stage 1 while the library's
  pipeline generates, headers included, measured by recording its sends on real ranks;
- ``13.stage_loop`` (build): a pipeline stage's loop (receive, compute, send) whose activations
  change shape from step to step, as prefill and decode do, on 2, 3 and 4 real ranks;
- ``13.balanced_stages`` (stretch): cut layers of unequal cost (a heavy embedding and LM head)
  into contiguous stages so that the slowest stage is as fast as it can be.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn as nn

from ..launch import run_distributed
from ..parallel.pipeline import PipelineInference, execute, partition_layers, send_tensor
from ..parallel.pipeline.p2p import TensorReceiver, decode_header, encode_header
from .check import (Incorrect, bytes_sent_to, exercise, judge_prediction, labelled_cases, predicted_number,
                    refuse_reference, run_ranks, with_hidden)
from ..model import ModelConfig, TinyLM
from ..parallel.mesh import Mesh
from ..parallel.pipeline import build_stage

# -- 13.predict_stage_bytes (predict) ---------------------------------------------------------
PRED_STAGES, PRED_MICRO, PRED_BATCH, PRED_PROMPT, PRED_NEW = 3, 3, 6, 8, 5
PRED_CONFIG = dict(vocab_size=264, dim=128, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=256,
                   max_seq_len=64)


def _stage_bytes_on_rank() -> int:
    """On every rank: generate with the library's pipeline; rank 0 counts the bytes it sends."""
    torch.manual_seed(0)
    model = TinyLM(ModelConfig(**PRED_CONFIG)).eval()
    mesh = Mesh(pp=PRED_STAGES)
    runner = PipelineInference(build_stage(model, mesh), mesh, n_microbatches=PRED_MICRO)
    ids = torch.randint(0, 256, (PRED_BATCH, PRED_PROMPT), generator=torch.Generator().manual_seed(1))
    _, sent = bytes_sent_to(lambda: runner.generate(ids, PRED_NEW), dst=1)
    return sent if dist.get_rank() == 0 else 0


@functools.lru_cache(maxsize=1)
def measured_stage_bytes() -> int:
    return run_distributed(_stage_bytes_on_rank, PRED_STAGES, timeout=60)[0]


@exercise("13.predict_stage_bytes", "predict the bytes stage 0 sends while a pipeline generates")
def check_predict_stage_bytes(candidate):
    refuse_reference(candidate, run_distributed, run_ranks, PipelineInference, measured_stage_bytes)
    guess = predicted_number(candidate, "predicted_stage_bytes")
    measured = measured_stage_bytes()
    dim, b, L, n, m = PRED_CONFIG["dim"], PRED_BATCH, PRED_PROMPT, PRED_NEW, PRED_MICRO
    header = 10 * 8
    payload = b * L * dim * 4 + (n - 1) * b * dim * 4
    headers = n * m * header
    mistakes = [
        (payload, f"that is the activations alone: every tensor is preceded by its header "
                  f"({header} bytes: 10 int64), one per micro-batch per pass"),
        (payload + n * header, "one header per pass: each of the 3 micro-batches is sent on its own, "
                               "with its own header"),
        (payload + b * dim * 4 + (n + 1) * m * header, "one pass too many: the prefill already produces "
                                                       "the first new token, so 5 tokens take 5 passes "
                                                       "(1 prefill + 4 decode steps)"),
        (sum(b * (L + k) * dim * 4 for k in range(n)) + headers,
         "a decode step sends only the newest position (batch, 1, dim): the KV cache holds the "
         "rest, so earlier positions are never sent again"),
        ((payload + headers) * 8, "that is bits, not bytes"),
        (payload // 2 + headers, "the tiny LM runs in float32 here: 4 bytes per element"),
        (2 * (payload + headers), "count what stage 0 sends to stage 1 only, not every hop of the pipeline"),
        (payload + headers + n * b * 8, "stage 0 does not send the new token ids: the last stage "
                                        "broadcasts them to the others"),
    ]
    judge_prediction(guess, measured, mistakes, "bytes",
                     "Count per pass: the prefill sends (batch, prompt, dim) float32, each decode step "
                     "(batch, 1, dim), each split into micro-batches that each carry a header.",
                     tolerance=0.0)
    return (f"{measured} bytes: {PRED_NEW} passes (1 prefill + {PRED_NEW - 1} decode steps) x "
            f"{PRED_MICRO} micro-batches, each an activation plus an {header}-byte header")


# -- 13.stage_loop (build) --------------------------------------------------------------------
DIM = 6


def stage_layers(p: int) -> list[nn.Sequential]:
    """The layers of each of ``p`` stages of a small MLP stack (same weights on every rank)."""
    torch.manual_seed(13 + p)
    layers = [nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh()) for _ in range(2 * p)]
    return [nn.Sequential(*layers[2 * s: 2 * s + 2]) for s in range(p)]


def step_inputs(lengths, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(sum(lengths) + len(lengths))
    return [torch.randn(batch if i % 3 else batch + 1, n, DIM, generator=g) for i, n in enumerate(lengths)]


def _stage_loop_on_rank(candidate, lengths):
    p, rank = dist.get_world_size(), dist.get_rank()
    stage = stage_layers(p)[rank]
    inputs = step_inputs(lengths) if rank == 0 else None
    with torch.no_grad():
        return candidate(stage, inputs, len(lengths))


CASES = [(2, (5, 1, 1, 1)), (3, (4, 4, 4)), (3, (7, 1, 1, 3, 1)), (4, (3, 1, 1))]
HIDDEN_CASES = [(5, (2, 6, 1, 1)), (3, (1,))]   # grading only: five stages; a single step


def _diagnose_outputs(p, lengths, outs, case) -> None:
    stages = stage_layers(p)
    inputs = step_inputs(lengths)
    with torch.no_grad():
        expected = [nn.Sequential(*stages)(x) for x in inputs]
    if not isinstance(outs, (list, tuple)):
        raise Incorrect(f"{case}: the last rank returned {type(outs).__name__}; return the list of "
                        f"outputs, one per step")
    if len(outs) != len(expected):
        raise Incorrect(f"{case}: the last rank returned {len(outs)} outputs for {len(expected)} steps")
    for step, (got, want, x) in enumerate(zip(outs, expected, inputs)):
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            hint = (" The length changed at this step: a receiver that reuses the shape of an earlier "
                    "message reads the wrong amount; send the shape first (a small fixed-size header)."
                    if step and x.shape != inputs[step - 1].shape else "")
            raise Incorrect(f"{case}, step {step}: the output has shape {shape}, expected "
                            f"{tuple(want.shape)}.{hint}")
        if torch.allclose(got, want, atol=1e-5):
            continue
        with torch.no_grad():
            for skipped in range(p):
                without = nn.Sequential(*(s for i, s in enumerate(stages) if i != skipped))(x)
                if torch.allclose(got, without, atol=1e-5):
                    raise Incorrect(f"{case}, step {step}: the output is the model without stage "
                                    f"{skipped}'s layers: every stage applies its own layers to what "
                                    f"it receives before sending it on")
            if torch.allclose(got, nn.Sequential(*reversed(stages))(x), atol=1e-5):
                raise Incorrect(f"{case}, step {step}: the stages ran in reverse order: activations "
                                f"flow from rank r to rank r + 1")
        raise Incorrect(f"{case}, step {step}: the output differs from the whole model's by "
                        f"{(got - want).abs().max().item():.3g}; does each receive fill a buffer of "
                        f"the shape that was sent, and is each step's data the data of that step?")


@exercise("13.stage_loop", "a pipeline stage's loop: receive, compute, send, with a shape header")
def check_stage_loop(candidate, hidden=False):
    refuse_reference(candidate, send_tensor, TensorReceiver, execute, PipelineInference,
                     encode_header, decode_header, run_distributed, run_ranks)
    for label, (p, lengths) in labelled_cases(CASES, HIDDEN_CASES, hidden):
        case = f"{label}p={p} stages, steps of lengths {list(lengths)}"
        try:
            results = run_ranks(_stage_loop_on_rank, p, candidate, lengths, what=case)
        except Incorrect as failed:
            if "deadlock" in str(failed) or len({x.shape for x in step_inputs(lengths)}) == 1:
                raise
            raise Incorrect(f"{failed} The activation's shape changes between steps here (prefill, then "
                            f"decode; the batch too): a receiver must size its buffer from a shape sent "
                            f"first, a small fixed-size header, never from an earlier message.") from None
        for rank, out in enumerate(results[:-1]):
            if out is not None:
                raise Incorrect(f"{case}: rank {rank} returned {type(out).__name__}; only the last "
                                f"stage holds the outputs, the others return None")
        if results[-1] is None:
            raise Incorrect(f"{case}: the last rank (rank {p - 1}) returned None; it holds the "
                            f"model's outputs: return them, one per step")
        _diagnose_outputs(p, lengths, results[-1], case)
    return with_hidden("equal to the whole model at every step on 2, 3 and 4 stages, with lengths and "
                       "batch sizes changing between steps", HIDDEN_CASES, hidden)


# -- 13.balanced_stages (stretch) -------------------------------------------------------------
def best_bottleneck(costs: list[float], p: int) -> float:
    """The smallest possible cost of the slowest stage over contiguous cuts into ``p`` stages."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(p + 1)]
    best[0][0] = 0.0
    for s in range(1, p + 1):
        for j in range(1, n + 1):
            for i in range(s - 1, j):
                best[s][j] = min(best[s][j], max(best[s - 1][i], prefix[j] - prefix[i]))
    return best[p][n]


# (name, cost per block: embedding, decoder layers..., final norm + LM head, stages)
BALANCE_CASES = [
    ("8 equal layers, 4 stages", [1.0] * 8, 4),
    ("embedding 3, 6 layers of 1, LM head 4; 3 stages", [3.0] + [1.0] * 6 + [4.0], 3),
    ("a 32k-vocab head: embedding 0.5, 10 layers of 1, head 6; 4 stages", [0.5] + [1.0] * 10 + [6.0], 4),
    ("7 blocks on 7 stages", [2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0], 7),
    ("uneven layers, 2 stages", [1.0, 5.0, 1.0, 1.0, 1.0, 4.0], 2),
    ("7 layers of 2 and a light head; 3 stages", [2.0] * 7 + [1.0], 3),
]


@exercise("13.balanced_stages", "contiguous stages balanced by cost, with a heavy embedding and LM head")
def check_balanced_stages(candidate):
    refuse_reference(candidate, partition_layers, best_bottleneck)
    for name, costs, p in BALANCE_CASES:
        got = candidate(list(costs), p)
        case = f"{name} (costs {costs})"
        if not isinstance(got, (list, tuple)) or not all(isinstance(r, range) for r in got):
            raise Incorrect(f"{case}: return a list of p ranges of block indices, got {got!r}")
        if len(got) != p:
            raise Incorrect(f"{case}: {len(got)} stages, expected p={p}")
        empty = [s for s, r in enumerate(got) if len(r) == 0]
        if empty:
            raise Incorrect(f"{case}: stage {empty[0]} has no blocks; every stage needs at least one")
        flat = [i for r in got for i in r]
        if flat != list(range(len(costs))):
            raise Incorrect(f"{case}: your stages cover blocks {flat}; they must be contiguous, in order, "
                            f"covering every block once ({got})")
        loads = [sum(costs[i] for i in r) for r in got]
        best = best_bottleneck(costs, p)
        if max(loads) > best + 1e-9:
            equal_counts = partition_layers(len(costs), p)
            hint = ("that is the cut by equal block counts, which ignores the heavy embedding and head"
                    if [list(r) for r in got] == [list(r) for r in equal_counts] else
                    "a greedy fill that closes a stage only when it would pass the average can leave too "
                    "much for the last stage; search the smallest feasible bottleneck instead (it is "
                    "one of the sums of contiguous blocks), or cut by dynamic programming")
            raise Incorrect(f"{case}: your stages cost {loads}, the slowest {max(loads):g}; a cut with "
                            f"slowest stage {best:g} exists: {hint}")
    return "the slowest stage is as fast as any contiguous cut allows, in every case"
