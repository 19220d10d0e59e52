"""Perplexity: how surprised the model is by text it did not train on.

Perplexity is exp(mean negative log-likelihood per token). A model that guesses
uniformly over 256 bytes scores 256; a perfect one scores 1. For a byte-level
model it is a per-byte number, so it is not comparable with a BPE model's.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..tokenizer import ByteTokenizer
from ..validate import bad, check_int, check_real, check_token_ids

CORPUS_PATH = Path(__file__).resolve().parents[1] / "data" / "corpus.txt"
VALID_FRACTION = 0.05


def random_windows(ids: torch.Tensor, batch_size: int, seq_len: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random training windows of ``ids``, each after a BOS (as at evaluation): inputs and targets."""
    check_int("batch_size", batch_size, low=1)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        raise bad("ids", ids, "a 1-D tensor of token ids")
    check_int("seq_len", seq_len, low=1, high=ids.numel() - 1, why=f"a window inside the {ids.numel()} ids")
    starts = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=generator)
    windows = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
    bos = torch.full((batch_size, 1), ByteTokenizer.bos_id, dtype=torch.long)
    x = torch.cat([bos, windows], dim=1)
    return x[:, :-1], x[:, 1:]


def corpus_splits(path: str | Path | None = None, valid_fraction: float = VALID_FRACTION,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte ids of the corpus, split into (train, validation).

    The validation split is the last ``valid_fraction`` of the bytes, cut at a
    paragraph break so no paragraph is in both.
    """
    check_real("valid_fraction", valid_fraction, low=0, high=1, low_open=True, high_open=True)
    data = Path(CORPUS_PATH if path is None else path).read_bytes()
    cut = int(len(data) * (1 - valid_fraction))
    brk = data.find(b"\n\n", cut)
    cut = brk + 2 if brk != -1 else cut
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    return ids[:cut], ids[cut:]


@torch.no_grad()
def mean_nll(model, ids: torch.Tensor, *, window: int = 256, batch_size: int = 16) -> float:
    """Mean negative log-likelihood (nats per token) of 1-D ``ids``.

    The text is cut into windows of ``window`` tokens, each starting with BOS;
    every byte is predicted once, from the bytes before it in its window.
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.numel() < 2:
        raise bad("ids", ids, "a 1-D tensor of at least 2 token ids")
    config = getattr(model, "config", None)
    if config is not None:
        check_token_ids("ids", ids, config.vocab_size)
    max_len = getattr(config, "max_seq_len", None)
    check_int("window", window, low=2, high=max_len, why="each window is one forward pass, BOS included")
    check_int("batch_size", batch_size, low=1)
    bos = ByteTokenizer.bos_id
    chunks = [ids[i:i + window - 1] for i in range(0, ids.numel(), window - 1)]
    total, count = 0.0, 0
    for b in range(0, len(chunks), batch_size):
        group = chunks[b:b + batch_size]
        width = max(c.numel() for c in group) + 1
        x = torch.full((len(group), width), ByteTokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, c in enumerate(group):
            x[i, 0], x[i, 1:c.numel() + 1] = bos, c
            mask[i, :c.numel() + 1] = 1
        logits = model(x, attention_mask=mask)
        targets = x[:, 1:].masked_fill(mask[:, 1:] == 0, -100)   # -100: ignored by cross_entropy
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                 targets.reshape(-1), ignore_index=-100, reduction="sum").item()
        count += int(mask[:, 1:].sum())
    return total / count


def perplexity(model, ids: torch.Tensor, *, window: int = 256, batch_size: int = 16) -> float:
    """exp of :func:`mean_nll`: the effective number of choices per token."""
    return math.exp(mean_nll(model, ids, window=window, batch_size=batch_size))
