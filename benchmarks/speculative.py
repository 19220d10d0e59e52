"""Speculative decoding on the tiny LM: tokens per target forward against the formula, forwards saved,
wall clock against plain decoding.

    python benchmarks/speculative.py

Measurements, each a ratio of two numbers from this one process:

1. accepted tokens per target forward (rounds that proposed all k) against the formula
   (1 - alpha^(k+1)) / (1 - alpha), with a draft right with probability alpha independently at
   each proposal (``CoinFlipDraft``, the formula's assumption; goal: within 5 %), and with the
   distilled student as the draft (alpha measured; its acceptances are not independent);
2. target forwards per generated token, plain decoding (1) against speculative decoding with the
   student, k = 4;
3. wall-clock time of plain ``generate()`` against speculative decoding (the student, and a
   randomly initialised draft of the same shape), best of 3 alternating rounds, batch size 1, one
   thread.
"""

from __future__ import annotations

import time

import torch

from lessons_lib.compression import heldout_ids, load_student, new_student
from lessons_lib.model import generate, load_tiny_lm
from lessons_lib.speculative import (CoinFlipDraft, SpeculativeStats, expected_tokens_per_forward,
                                     speculative_generate)
from _ratios import print_ratios

ROUNDS = 3
K = 4
NEW_TOKENS = 128


def prompts(n: int = 4, length: int = 24) -> list[list[int]]:
    """Prompts starting at the first ``n`` paragraph breaks of the held-out corpus."""
    valid = heldout_ids()
    starts = [i + 2 for i in range(len(valid) - 2) if valid[i] == valid[i + 1] == 10][:n]
    return [valid[s:s + length].tolist() for s in starts]


def pooled(target, make_draft, ps, k: int = K, new: int = NEW_TOKENS) -> SpeculativeStats:
    total = SpeculativeStats(k)
    for i, p in enumerate(ps):
        _, s = speculative_generate(target, make_draft(i, p), p, new, num_speculative_tokens=k)
        total.rounds += s.rounds
        total.draft_forwards += s.draft_forwards
        total.generated += s.generated
    return total


def full_round_tokens(stats: SpeculativeStats) -> float:
    full = stats.full_rounds()
    return sum(a + 1 for _, a in full) / len(full)


def best_of(*fns):
    times = [[] for _ in fns]
    for _ in range(ROUNDS):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [min(t) for t in times]


def main() -> None:
    torch.set_num_threads(1)
    target, _ = load_tiny_lm()
    student, weak = load_student(), new_student(seed=0)
    ps = prompts()
    rows = []

    for alpha in (0.6, 0.8, 0.9):
        s = pooled(target, lambda i, p, a=alpha: CoinFlipDraft(target, p, 256, a, seed=i), ps, new=256)
        formula = expected_tokens_per_forward(alpha, K)
        rows.append((f"tokens per target forward, coin-flip draft alpha={alpha}, k={K}: measured / formula",
                     f"{formula:.3f}", f"{full_round_tokens(s):.3f}", full_round_tokens(s) / formula))

    s = pooled(target, lambda i, p: student, ps)
    formula = expected_tokens_per_forward(s.acceptance_rate, K)
    rows.append((f"tokens per target forward, student (alpha={s.acceptance_rate:.3f}): measured / formula",
                 f"{formula:.3f}", f"{full_round_tokens(s):.3f}", full_round_tokens(s) / formula))
    saved = 1 - s.target_forwards / s.generated
    rows.append((f"target forwards per token, plain / speculative (student; {saved:.3f} saved per token)",
                 "1.000", f"{s.target_forwards / s.generated:.3f}", s.generated / s.target_forwards))

    def plain():
        for p in ps:
            generate(target, torch.tensor([p]), NEW_TOKENS)

    def with_draft(draft):
        def run():
            for p in ps:
                speculative_generate(target, draft, p, NEW_TOKENS, num_speculative_tokens=K)
        return run

    t_plain, t_student, t_weak = best_of(plain, with_draft(student), with_draft(weak))
    tokens = NEW_TOKENS * len(ps)
    rows.append((f"tokens/s, speculative (student, k={K}) / plain", f"{tokens / t_plain:.0f}",
                 f"{tokens / t_student:.0f}", t_plain / t_student))
    rows.append((f"tokens/s, speculative (random draft, k={K}) / plain", f"{tokens / t_plain:.0f}",
                 f"{tokens / t_weak:.0f}", t_plain / t_weak))

    print_ratios(rows, "spec", f"(torch {torch.__version__}, 1 thread, batch size 1, {len(ps)} prompts x "
                 f"{NEW_TOKENS} tokens, best of {ROUNDS} alternating rounds)", ratio_digits=3)


if __name__ == "__main__":
    main()
