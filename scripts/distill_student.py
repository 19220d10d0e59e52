"""Distil the committed student LM from the trained tiny LM (the teacher), on CPU.

    nice python scripts/distill_student.py                  # the committed student
    python scripts/distill_student.py --steps 20 --out /tmp/s.safetensors   # a quick try

Deterministic (fixed seeds, one thread). Writes ``student_lm.safetensors`` and
``student_lm.json`` (config, distillation record, held-out perplexity of the
student and of the teacher, and the ``sha256`` and ``fingerprint`` that
``save_checkpoint`` adds and ``load_checkpoint`` verifies).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from lessons_lib.compression.distillation import STUDENT_PATH, distill, new_student
from lessons_lib.model import corpus_splits, count_parameters, load_tiny_lm, perplexity, save_checkpoint
from lessons_lib.model.checkpoint import TINY_LM_PATH


def main() -> None:
    ap = argparse.ArgumentParser(description="Distil a smaller student from the tiny LM.")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=STUDENT_PATH)
    args = ap.parse_args()
    for name in ("steps", "batch_size", "seq_len", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")

    torch.set_num_threads(args.threads)
    teacher, _ = load_tiny_lm()
    student = new_student(args.seed)
    train, valid = corpus_splits()
    start = time.perf_counter()
    losses = distill(teacher, student, train, steps=args.steps, batch_size=args.batch_size,
                     seq_len=args.seq_len, lr=args.lr, temperature=args.temperature,
                     alpha=args.alpha, seed=args.seed)
    seconds = time.perf_counter() - start
    student_ppl, teacher_ppl = perplexity(student, valid), perplexity(teacher, valid)
    record = {
        "distillation": {
            "teacher": TINY_LM_PATH.name, "steps": args.steps, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "peak_lr": args.lr, "temperature": args.temperature,
            "alpha": args.alpha, "loss": "alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE",
            "seed": args.seed, "threads": args.threads, "seconds": round(seconds, 1),
            "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4), "torch": torch.__version__,
        },
        "eval": {"valid_perplexity_per_byte": round(student_ppl, 4),
                 "teacher_valid_perplexity_per_byte": round(teacher_ppl, 4),
                 "valid_nll_nats_per_byte": round(math.log(student_ppl), 4)},
        "parameters": count_parameters(student),
        "teacher_parameters": count_parameters(teacher),
    }
    path = save_checkpoint(student, args.out, record)
    print(f"wrote {path} ({path.stat().st_size} bytes) in {seconds:.0f} s: student perplexity "
          f"{student_ppl:.3f} vs teacher {teacher_ppl:.3f}")


if __name__ == "__main__":
    main()
