"""A draft that is right with probability alpha, independently at every proposal.

The formula ``(1 - alpha^(k+1)) / (1 - alpha)`` assumes exactly that; a real draft's acceptances
are correlated (easy and hard stretches of text). :class:`CoinFlipDraft` knows the target's greedy
continuation in advance and proposes its next token with probability ``alpha``, a wrong token
otherwise, so the target's real verification can be measured against the formula. It runs no
model: a proposal costs nothing.
"""

from __future__ import annotations

import random

import torch

from ..model import generate
from ..validate import bad, check_int, check_probability


class _PositionCache:
    """Only what the decoding loop asks of a cache: how many tokens it has seen, and a rollback."""

    def __init__(self) -> None:
        self.seq_len = 0

    def truncate(self, n: int) -> None:
        self.seq_len = check_int("n", n, low=0, high=self.seq_len)


class CoinFlipDraft:
    """Proposes the target's greedy token with probability ``alpha`` (seeded), another one otherwise."""

    def __init__(self, target, prompt_ids, max_new_tokens: int, alpha: float, seed: int = 0) -> None:
        self.config = target.config
        self.alpha = check_probability("alpha", alpha)
        check_int("seed", seed)
        prompt = [int(t) for t in prompt_ids]
        self.truth = generate(target, torch.tensor([prompt]), max_new_tokens)[0].tolist()
        self.rng = random.Random(seed)

    def truth_ids(self) -> torch.Tensor:
        """The target's own greedy output (1, prompt + new), which speculative decoding must match."""
        return torch.tensor([self.truth])

    def new_cache(self) -> _PositionCache:
        return _PositionCache()

    def __call__(self, ids: torch.Tensor, cache: _PositionCache | None = None) -> torch.Tensor:
        if cache is None:
            raise bad("cache", cache, "the cache from new_cache(): the draft finds its position in it")
        cache.seq_len += ids.shape[1]
        pos = cache.seq_len                       # the position of the token to propose
        right = self.truth[pos] if pos < len(self.truth) else 0
        token = right if self.rng.random() < self.alpha else (right + 1) % self.config.vocab_size
        logits = torch.zeros(1, ids.shape[1], self.config.vocab_size)
        logits[0, -1, token] = 1.0
        return logits
