"""Caching on the tiny LM, each against no cache: model cache, prefix cache, paged KV memory.

    python benchmarks/caching.py

- model cache: latency of the first request for a model (load from the
  safetensors checkpoint and run one token) cold vs after warm-up (a cache hit);
- prefix cache: prefill time and tokens computed for 8 requests sharing a system
  prompt, with and without prefix caching (paged KV in both);
- paged KV: decode rate on a paged cache vs the contiguous cache (the cost of the
  gather), and KV slots reserved for a batch of mixed lengths, contiguous
  (max_seq_len each) vs paged (blocks of 16).
Timings are the best of 5 alternating rounds on one thread.
"""

from __future__ import annotations

import time

import torch

from lessons_lib.caching import (KVBlockPool, ModelCache, PagedSequenceCache, PrefixCache,
                                 blocks_needed, prefill)
from lessons_lib.model import load_tiny_lm
from lessons_lib.tokenizer import ByteTokenizer

REPEATS = 5
SYSTEM = ("You are the course assistant. Answer questions on distributed inference: tensor, pipeline "
          "and data parallelism, KV caches, routers, heartbeats and failures. Be brief and exact. ")
QUESTIONS = ["What is a rank?", "Why page the KV cache?", "What does all-reduce do?",
             "When is a block evicted?", "What is a bubble?", "Why GQA?", "What is TP?", "Why warm up?"]


def best_pair(without, with_cache) -> tuple[float, float]:
    """Best seconds of each function over REPEATS rounds, alternating them.

    Alternating puts both through the same moments of machine load, so their ratio
    is fair even on a busy machine.
    """
    a, b = [], []
    for _ in range(REPEATS):
        for fn, times in ((without, a), (with_cache, b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return min(a), min(b)


def first_request(model_loader, warm: bool) -> float:
    cache = ModelCache(lambda name: model_loader(), budget_bytes=1 << 30)
    if warm:
        cache.warm_up(["tiny_lm"])
    start = time.perf_counter()
    with torch.no_grad():
        cache.get("tiny_lm")(torch.tensor([[256, 72]]))
    return time.perf_counter() - start


def serve(model, prompts, use_prefix_cache: bool) -> int:
    pool = KVBlockPool.for_model(model.config, num_blocks=256, block_size=16)
    pc = PrefixCache(pool.allocator) if use_prefix_cache else None
    computed = 0
    for ids in prompts:
        _, seq, reused = prefill(model, ids, pool, pc)
        computed += len(ids) - reused
        pc.release(seq.block_table) if pc else seq.free()
    return computed


def decode(model, ids, steps: int, paged: bool) -> None:
    cache = (PagedSequenceCache(KVBlockPool.for_model(model.config, 64, 16)) if paged
             else model.new_cache())
    ids = list(ids)
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            logits = model(x, attention_mask=torch.ones(1, len(ids), dtype=torch.long), cache=cache)
            ids.append(int(logits[0, -1].argmax()))
            x = torch.tensor([[ids[-1]]])


def main() -> None:
    torch.set_num_threads(1)
    model, tok = load_tiny_lm()
    loader = lambda: load_tiny_lm()[0]  # noqa: E731
    rows = []

    colds, warms = [], []
    for _ in range(REPEATS):
        colds.append(first_request(loader, warm=False))
        warms.append(first_request(loader, warm=True))
    cold, warm = min(colds), min(warms)
    rows.append(("model cache: first request latency", f"{cold * 1e3:.2f} ms", f"{warm * 1e3:.2f} ms",
                 f"{cold / warm:.0f}x faster"))

    prompts = [tok.encode(SYSTEM + q) for q in QUESTIONS]
    t_off, t_on = best_pair(lambda: serve(model, prompts, False), lambda: serve(model, prompts, True))
    n_off, n_on = serve(model, prompts, False), serve(model, prompts, True)
    rows.append((f"prefix cache: prefill {len(prompts)} requests", f"{t_off * 1e3:.1f} ms",
                 f"{t_on * 1e3:.1f} ms", f"{t_off / t_on:.2f}x faster"))
    rows.append(("prefix cache: tokens prefilled", f"{n_off}", f"{n_on}",
                 f"{n_off / n_on:.2f}x fewer"))

    prompt = tok.encode("A paged KV cache stores keys")
    t_contig, t_paged = best_pair(lambda: decode(model, prompt, 64, paged=False),
                                  lambda: decode(model, prompt, 64, paged=True))
    rows.append(("paged KV: decode 64 tokens", f"{t_contig * 1e3:.1f} ms", f"{t_paged * 1e3:.1f} ms",
                 f"{t_contig / t_paged:.2f}x speed"))
    lengths = [37, 300, 812, 95, 1024, 12, 460, 150]
    contiguous = model.config.max_seq_len * len(lengths)
    paged = sum(blocks_needed(n, 16) * 16 for n in lengths)
    rows.append(("paged KV: slots reserved, 8 requests", f"{contiguous}", f"{paged}",
                 f"{contiguous / paged:.2f}x less memory"))

    print(f"tiny LM caching, best of {REPEATS} alternating rounds, {torch.get_num_threads()} thread, torch {torch.__version__}; "
          f"system prompt {len(ByteTokenizer().encode(SYSTEM))} tokens")
    header = f"{'measurement':<40} | {'no cache':>12} | {'with cache':>12} | {'ratio':>20}"
    print(header)
    print("-" * len(header))
    for name, a, b, r in rows:
        print(f"{name:<40} | {a:>12} | {b:>12} | {r:>20}")
    print("(paged KV row 1: 'no cache' = contiguous KVCache, 'with cache' = paged; row 2: contiguous "
          "reserves max_seq_len per request)")


if __name__ == "__main__":
    main()
