"""Train the course's tiny LM on the generated corpus, on CPU, in a few minutes.

    nice python scripts/train_tiny_lm.py                       # the committed checkpoint
    python scripts/train_tiny_lm.py --steps 50 --out /tmp/t.safetensors   # a quick try

Deterministic: a fixed seed, a fixed thread count and a private random generator
for the batches, so the same command on the same machine gives the same weights.
One thread by default: on a shared machine a multi-threaded step waits for its
slowest thread, so one thread is both steadier and nearly as fast for a model
this small.
Writes ``tiny_lm.safetensors`` and ``tiny_lm.json`` (config, training record,
held-out perplexity, the seconds it took, and the file's ``sha256`` and the weights'
``fingerprint``, which ``load_checkpoint`` verifies: ``save_checkpoint`` adds them).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lessons_lib.model import (ModelConfig, TinyLM, corpus_splits,
                               count_parameters, generate, perplexity, random_windows,
                               save_checkpoint)
from lessons_lib.model.checkpoint import TINY_LM_PATH
from lessons_lib.model.perplexity import CORPUS_PATH, VALID_FRACTION
from lessons_lib.tokenizer import ByteTokenizer

CONFIG = ModelConfig(vocab_size=264, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384,
                     max_seq_len=1024, rope_theta=10000.0, norm_eps=1e-5)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak``, then cosine decay to a tenth of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    ap = argparse.ArgumentParser(description="Train the tiny LM on CPU.")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=TINY_LM_PATH)
    args = ap.parse_args()
    for name in ("steps", "batch_size", "seq_len", "threads", "warmup"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)
    train, valid = corpus_splits()
    model = TinyLM(CONFIG)
    # Weight decay on matrices only; norms' gains stay free.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    # Wall time is what a learner waits; CPU time is the work itself, and stays
    # honest when other jobs share the machine.
    start, cpu_start, losses = time.perf_counter(), time.process_time(), []
    bar = tqdm(range(args.steps), desc="train", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x, y = random_windows(train, args.batch_size, args.seq_len, gen)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    train_seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start

    model.eval()
    valid_ppl = perplexity(model, valid, window=args.seq_len)
    record = {
        "training": {
            "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "peak_lr": args.lr, "warmup_steps": args.warmup, "schedule": "linear warm-up + cosine to 10%",
            "optimizer": "AdamW(betas=(0.9, 0.95), weight_decay=0.1 on matrices)",
            "seed": args.seed, "threads": args.threads, "device": "cpu",
            "final_train_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
            "seconds": round(train_seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
            "torch": torch.__version__,
        },
        "data": {
            "corpus": "lessons_lib/data/corpus.txt (scripts/make_corpus.py)",
            "corpus_sha256": hashlib.sha256(CORPUS_PATH.read_bytes()).hexdigest(),
            "train_bytes": train.numel(), "valid_bytes": valid.numel(),
            "valid_split": f"last {VALID_FRACTION:.0%} of the bytes, cut at a paragraph break",
        },
        "eval": {"valid_perplexity_per_byte": round(valid_ppl, 4),
                 "valid_nll_nats_per_byte": round(math.log(valid_ppl), 4)},
        "parameters": count_parameters(model),
    }
    path = save_checkpoint(model, args.out, record)
    tok = ByteTokenizer()
    prompt = "In tensor parallelism,"
    out = generate(model, torch.tensor([tok.encode(prompt)]), 120)
    print(f"saved {path} ({path.stat().st_size / 1e6:.2f} MB), {count_parameters(model)} parameters")
    print(f"trained {args.steps} steps in {train_seconds:.0f} s ({cpu_seconds:.0f} s of CPU), final train loss "
          f"{record['training']['final_train_loss']:.3f}, held-out perplexity {valid_ppl:.3f} per byte")
    print("greedy sample:", tok.decode(out[0]))


if __name__ == "__main__":
    main()
