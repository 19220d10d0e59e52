"""Speculative decoding (lesson 16): the distilled student drafts, the tiny LM verifies."""

from .decoding import (SpeculativeStats, check_draft_compatible, expected_speedup,
                       expected_tokens_per_forward, greedy_verify, rejection_verify,
                       speculative_generate)
from .lossless import chi_square
from .oracle import CoinFlipDraft

__all__ = ["CoinFlipDraft", "SpeculativeStats", "check_draft_compatible", "chi_square", "expected_speedup",
           "expected_tokens_per_forward", "greedy_verify", "rejection_verify", "speculative_generate"]
