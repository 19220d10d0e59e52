"""Prefill/decode disaggregation on the tiny LM: decode inter-token latency and KV bytes transferred.

    python benchmarks/disaggregation.py

Four measurements, each a ratio of two runs made side by side in this one process:

1. p99 inter-token latency of 8 decoding streams while three 700-token prompts arrive, wall clock:
   colocated (one engine prefills the prompts between the streams' steps, no chunking) against
   disaggregated (rank 0 prefills and sends the KV; rank 1's engine only decodes and installs
   each request when its KV has arrived, polling between steps); best of 3 rounds;
2. the same p99 in the cost model of lesson 17 (a step costs the critical batch of an H100 in bf16
   plus its tokens) on a 24-request long-prompt trace, two devices each way;
3. goodput under lesson 17's SLOs, disaggregated against the better colocated system;
4. KV bytes sent for each prompt against 2 x layers x kv_heads x head_dim x bytes x tokens (goal: exact).
"""

from __future__ import annotations

import queue
import random
import threading
import time

import torch

from lessons_lib.disaggregation import (CostModel, DecodeWorker, KVTransfer, PrefillWorker, ScheduleOnlyLM,
                                        kv_transfer_bytes, long_prompt_trace, percentile, run_colocated,
                                        run_disaggregated)
from lessons_lib.engine import LLMEngine, SamplingParams
from lessons_lib.launch import run_distributed
from lessons_lib.model import load_tiny_lm
from lessons_lib.sizing import H100_SXM_BF16_FLOPS, H100_SXM_HBM_BYTES_PER_S, critical_batch
from _ratios import print_ratios

ROUNDS = 3
STREAMS, STREAM_PROMPT, STREAM_TOKENS = 8, 16, 96
LONG_PROMPT, LONG_TOKENS, ARRIVALS_S = 700, 4, (0.03, 0.13, 0.23)


def workload():
    rng = random.Random(2)
    streams = [[rng.randrange(1, 256) for _ in range(STREAM_PROMPT)] for _ in range(STREAMS)]
    longs = [[rng.randrange(1, 256) for _ in range(LONG_PROMPT)] for _ in ARRIVALS_S]
    return streams, longs


def colocated_itls(model) -> list[float]:
    """One engine: the streams decode; each long prompt joins at its arrival time and is prefilled whole."""
    streams, longs = workload()
    engine = LLMEngine(model, max_num_seqs=16, enable_prefix_caching=False, enable_chunked_prefill=False,
                       max_num_batched_tokens=1024)
    for i, p in enumerate(streams):
        engine.add_request(f"s{i}", p, SamplingParams(max_tokens=STREAM_TOKENS))
    while any(not engine.requests[f"s{i}"].output_token_ids for i in range(STREAMS)):
        engine.step()                                   # the streams' own prefill, before the clock starts
    gaps, start, pending = [], time.perf_counter(), list(enumerate(longs))
    while engine.has_unfinished_requests():
        while pending and time.perf_counter() - start >= ARRIVALS_S[pending[0][0]]:
            i, p = pending.pop(0)
            engine.add_request(f"long{i}", p, SamplingParams(max_tokens=LONG_TOKENS))
        for out in engine.step():
            if out.finished and out.request_id.startswith("s"):
                gaps += out.metrics.inter_token_latencies
    return gaps


def _disaggregated_rank():
    import torch.distributed as dist

    torch.set_num_threads(1)
    model = load_tiny_lm()[0]
    streams, longs = workload()
    prefill = PrefillWorker(model)
    if dist.get_rank() == 0:
        transfers = [prefill.prefill(f"s{i}", p, STREAM_TOKENS) for i, p in enumerate(streams)]
        for t in transfers:
            dist.send(t.payload, 1)
        dist.barrier()                                  # the streams are decoding: start the clock
        start, works, sent = time.perf_counter(), [], []
        for i, p in enumerate(longs):
            time.sleep(max(0.0, ARRIVALS_S[i] - (time.perf_counter() - start)))
            t = prefill.prefill(f"long{i}", p, LONG_TOKENS)
            first = torch.tensor([t.first_token])
            works += [dist.isend(t.payload, 1), dist.isend(first, 1)]
            sent.append((t.payload, first, t.nbytes))
        for w in works:
            w.wait()
        return [n for _, _, n in sent]
    decode = DecodeWorker(model, max_num_seqs=16)
    cfg = model.config

    def transfer(rid, prompt, first, payload, max_tokens):
        return KVTransfer(rid, prompt, first, max_tokens, decode.layout, decode.fingerprint, payload)

    shape = (2, cfg.n_layers, None, cfg.n_kv_heads, cfg.head_dim)
    for i, p in enumerate(streams):
        payload = torch.empty(shape[:2] + (len(p),) + shape[3:])
        dist.recv(payload, 0)
        # Its first token: the prefill rank's, recomputed here from the same model on the same prompt.
        decode.accept(transfer(f"s{i}", p, prefill.prefill("x", p, 2).first_token, payload, STREAM_TOKENS))
    dist.barrier()
    # gloo marks a receive complete only inside wait(), so a thread waits for the transfers while the
    # engine decodes; the loop installs each one between two steps, once it is there.
    arrived = queue.Queue()

    def receive():
        for i, p in enumerate(longs):
            payload, first = torch.empty(shape[:2] + (len(p),) + shape[3:]), torch.empty(1, dtype=torch.long)
            dist.recv(payload, 0)
            dist.recv(first, 0)
            arrived.put((i, p, payload, first))

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    gaps, installed = [], 0
    while decode.has_unfinished_requests() or installed < len(longs):
        while not arrived.empty():
            i, p, payload, first = arrived.get()
            decode.accept(transfer(f"long{i}", p, int(first), payload, LONG_TOKENS))
            installed += 1
        if not decode.has_unfinished_requests():
            time.sleep(0.001)
            continue
        for out in decode.step():
            if out.finished and out.request_id.startswith("s"):
                gaps += out.metrics.inter_token_latencies
    return gaps


def main() -> None:
    torch.set_num_threads(1)
    model = load_tiny_lm()[0]
    rows = []

    colocated, disaggregated, sent = [], [], []
    for _ in range(ROUNDS):
        colocated.append(percentile(colocated_itls(model), 99))
        sent, gaps = run_distributed(_disaggregated_rank, 2, timeout=120)
        disaggregated.append(percentile(gaps, 99))
    c, d = min(colocated), min(disaggregated)
    rows.append(("decode ITL p99 (ms), colocated / disaggregated, 2 real ranks", f"{c * 1e3:.1f}",
                 f"{d * 1e3:.1f}", c / d))

    cost = CostModel(round(critical_batch(H100_SXM_BF16_FLOPS, H100_SXM_HBM_BYTES_PER_S)), 0.05)
    stand_in = ScheduleOnlyLM(model.config)
    trace = long_prompt_trace(24, seed=0, prompt_len=(400, 800), max_tokens=(24, 48), mean_gap=1200)
    colo = {"no chunking": run_colocated(stand_in, trace, cost, n_devices=2, enable_chunked_prefill=False,
                                         max_num_batched_tokens=1024),
            "chunks of 256": run_colocated(stand_in, trace, cost, n_devices=2, max_num_batched_tokens=256)}
    dis = run_disaggregated(stand_in, trace, cost)
    slo = (2 * cost.step(800), 1.25 * cost.step(16))
    for name, run in colo.items():
        a, b = run.summary(*slo)["itl_p99"], dis.summary(*slo)["itl_p99"]
        rows.append((f"decode ITL p99 (cost model), colocated {name} / disaggregated", f"{a:.0f}", f"{b:.0f}", a / b))
    best = max(colo.values(), key=lambda r: r.summary(*slo)["goodput"]).summary(*slo)["goodput"]
    rows.append(("goodput within SLOs (cost model), disaggregated / best colocated", f"{best:.2f}",
                 f"{dis.summary(*slo)['goodput']:.2f}", dis.summary(*slo)["goodput"] / best))

    _, longs = workload()
    formula = sum(kv_transfer_bytes(model.config, len(p)) for p in longs)
    rows.append((f"KV bytes sent / formula ({len(longs)} prompts of {LONG_PROMPT}; exact: {sum(sent) == formula})",
                 f"{formula}", f"{sum(sent)}", sum(sent) / formula))

    print_ratios(rows, "disagg.", f"(torch {torch.__version__}, 1 thread per process, wall clock best of {ROUNDS} rounds)")


if __name__ == "__main__":
    main()
