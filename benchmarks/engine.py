"""The serving engine on the tiny LM: continuous batching, paged KV memory, prefix caching, chunked prefill.

    python benchmarks/engine.py

Five measurements, each a ratio of two runs made side by side in this one process:

1. throughput of continuous batching (``LLMEngine``, 16 running sequences) against static batching
   (batches of 16 padded prompts through ``generate()``, each batch running until its longest
   request is done) on a trace of mixed output lengths (goal: at least 3x);
2. engine tokens/s with 16 running sequences against 1 (batching amortises each step's cost);
3. KV memory utilisation on one trace: tokens held / token slots held, paged (blocks of 16)
   against contiguous reservation of each request's prompt + max_tokens, and of max_seq_len
   (goal: paged at least 95 %);
4. prefill tokens computed with and without prefix caching when every request shares a
   system prompt;
5. p99 inter-token latency of running streams when long prompts arrive, with and without
   chunked prefill.
Timings are the best of 3 rounds (alternating where two runs are timed) on one thread.
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from lessons_lib.engine import LLMEngine, SamplingParams
from lessons_lib.model import generate, load_tiny_lm
from _ratios import print_ratios

ROUNDS = 3


def mixed_trace(n: int, seed: int = 0):
    """Prompts of 8-64 tokens; most answers short (8-24 tokens), one in eight long (160-200)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(1, 256) for _ in range(rng.randrange(8, 65))]
        long = rng.random() < 1 / 8
        out.append((prompt, rng.randrange(160, 201) if long else rng.randrange(8, 25)))
    return out


def best_of(*fns):
    """Best seconds of each function over ROUNDS alternating rounds (fair on a busy machine)."""
    times = [[] for _ in fns]
    results = [None] * len(fns)
    for _ in range(ROUNDS):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            results[i] = fn()
            times[i].append(time.perf_counter() - start)
    return [min(t) for t in times], results


def static_batching(model, trace, batch: int) -> int:
    """Batches of ``batch`` left-padded prompts; a batch decodes until its longest answer is done."""
    useful = 0
    for i in range(0, len(trace), batch):
        group = trace[i:i + batch]
        width = max(len(p) for p, _ in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, (p, _) in enumerate(group):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        generate(model, ids, max(m for _, m in group), attention_mask=mask)
        useful += sum(m for _, m in group)
    return useful


def continuous_batching(model, trace, max_num_seqs: int) -> int:
    engine = LLMEngine(model, max_num_seqs=max_num_seqs, enable_prefix_caching=False)
    outs = engine.generate([p for p, _ in trace], [SamplingParams(max_tokens=m) for _, m in trace])
    return sum(len(o.output_token_ids) for o in outs)


def kv_utilisation(model, trace, block_size: int = 16) -> tuple[float, float, float]:
    """Time-averaged tokens held / slots held: paged, contiguous (prompt + max_tokens), contiguous (max_seq_len)."""
    engine = LLMEngine(model, block_size=block_size, max_num_seqs=16, enable_prefix_caching=False)
    reserve = {}
    for i, (p, m) in enumerate(trace):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=m))
        reserve[f"r{i}"] = len(p) + m
    tokens = paged = exact = full = 0
    while engine.has_unfinished_requests():
        engine.step()
        s = engine.stats()
        tokens += s.kv_tokens
        paged += s.kv_slots
        running = [r.request_id for r in engine.scheduler.running]
        exact += sum(reserve[r] for r in running)
        full += len(running) * model.config.max_seq_len
    return tokens / paged, tokens / exact, tokens / full


def shared_prompt_trace(n: int, system_len: int = 256, seed: int = 1):
    rng = random.Random(seed)
    system = [rng.randrange(1, 256) for _ in range(system_len)]
    return [system + [rng.randrange(1, 256) for _ in range(rng.randrange(4, 17))] for _ in range(n)]


def prefill_tokens(model, prompts, prefix_caching: bool) -> int:
    engine = LLMEngine(model, max_num_seqs=4, enable_prefix_caching=prefix_caching)
    engine.generate(prompts, SamplingParams(max_tokens=4))
    return engine.num_computed_tokens - engine.num_generated_tokens + len(prompts)


def p99_itl_with_long_prompts(model, chunked: bool) -> float:
    """8 streams decode 96 tokens each while three 700-token prompts arrive; p99 of their gaps (s)."""
    rng = random.Random(2)
    engine = LLMEngine(model, max_num_seqs=16, enable_prefix_caching=False, enable_chunked_prefill=chunked,
                       max_num_batched_tokens=64 if chunked else 1024)
    for i in range(8):
        engine.add_request(f"s{i}", [rng.randrange(1, 256) for _ in range(16)], SamplingParams(max_tokens=96))
    gaps, step = [], 0
    while engine.has_unfinished_requests():
        if step in (10, 40, 70):
            engine.add_request(f"long{step}", [rng.randrange(1, 256) for _ in range(700)],
                               SamplingParams(max_tokens=2))
        for out in engine.step():
            if out.finished and out.request_id.startswith("s"):
                gaps += out.metrics.inter_token_latencies
        step += 1
    return statistics.quantiles(gaps, n=100)[98]


def main() -> None:
    torch.set_num_threads(1)
    model = load_tiny_lm()[0]
    trace = mixed_trace(64)
    rows = []

    (t_static, t_cont), (u_static, u_cont) = best_of(lambda: static_batching(model, trace, 16),
                                                     lambda: continuous_batching(model, trace, 16))
    rows.append(("continuous / static batching, tokens/s (16 per batch)",
                 f"{u_static / t_static:.0f}", f"{u_cont / t_cont:.0f}", (u_cont / t_cont) / (u_static / t_static)))

    decode_trace = [(p, 64) for p, _ in trace[:32]]
    (t1, t16), (n1, n16) = best_of(lambda: continuous_batching(model, decode_trace, 1),
                                   lambda: continuous_batching(model, decode_trace, 16))
    rows.append(("engine tokens/s, 16 running / 1 running", f"{n1 / t1:.0f}", f"{n16 / t16:.0f}",
                 (n16 / t16) / (n1 / t1)))

    long_trace = [(p * 4, m + 100) for p, m in mixed_trace(32, seed=3)]    # contexts of 130-560 tokens
    paged, exact, full = kv_utilisation(model, long_trace)
    rows.append(("KV utilisation, paged / contiguous (prompt + max_tokens)", f"{exact:.1%}", f"{paged:.1%}",
                 paged / exact))
    rows.append(("KV utilisation, paged / contiguous (max_seq_len)", f"{full:.1%}", f"{paged:.1%}", paged / full))

    prompts = shared_prompt_trace(16)
    plain, cached = prefill_tokens(model, prompts, False), prefill_tokens(model, prompts, True)
    rows.append(("prefill tokens, without / with prefix caching", f"{plain}", f"{cached}", plain / cached))

    p99_plain = min(p99_itl_with_long_prompts(model, False) for _ in range(ROUNDS))
    p99_chunked = min(p99_itl_with_long_prompts(model, True) for _ in range(ROUNDS))
    rows.append(("p99 inter-token latency (ms), unchunked / chunked prefill", f"{p99_plain * 1e3:.1f}",
                 f"{p99_chunked * 1e3:.1f}", p99_plain / p99_chunked))

    print_ratios(rows, "engine", f"(torch {torch.__version__}, 1 thread, best of {ROUNDS} alternating rounds)")


if __name__ == "__main__":
    main()
