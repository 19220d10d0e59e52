"""Speculative decoding: a small draft model guesses, the target model checks all guesses at once.

Decoding one token costs one forward pass of the target, and at batch size 1 that pass is
bound by reading the weights (and by per-operation overhead on a small model), not by
arithmetic: scoring ``k + 1`` tokens costs about as much as scoring one. So a cheap draft
proposes ``k`` tokens, the target scores them in ONE forward, and every token the target
agrees with is kept, plus one token of the target's own: between 1 and ``k + 1`` tokens per
target forward, and the output is what the target alone would produce.

* greedy (``temperature=0``): keep the longest prefix of proposals equal to the target's
  arg-max, then the target's arg-max after it: token for token :func:`generate`'s output;
* sampling: accept proposal ``x`` with probability ``min(1, p(x) / q(x))`` (``p`` the target's
  distribution, ``q`` the draft's); on a rejection draw from ``max(0, p - q)`` renormalised.
  Every kept token is then distributed exactly as the target's (Leviathan et al., ICML 2023,
  https://arxiv.org/abs/2211.17192; Chen et al. 2023,
  https://arxiv.org/abs/2302.01318).

Both models keep a KV cache; after each verification both are truncated to the tokens kept.
Batch size 1 only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.generate import check_context_length
from ..validate import bad, check_int, check_real, check_token_ids

__all__ = ["SpeculativeStats", "check_draft_compatible", "expected_speedup",
           "expected_tokens_per_forward", "greedy_verify", "rejection_verify", "speculative_generate"]


@dataclass
class SpeculativeStats:
    """What one :func:`speculative_generate` run did.

    ``rounds`` has one ``(proposed, accepted)`` pair per target forward: how many tokens the
    draft proposed (``num_speculative_tokens``, fewer near the end of the generation) and how
    many of them the target accepted. Every round also emits one token of the target's own.
    """

    num_speculative_tokens: int
    rounds: list = field(default_factory=list)
    draft_forwards: int = 0
    generated: int = 0

    @property
    def target_forwards(self) -> int:
        """Target forward passes, the prompt's prefill included (it is fused into round 1)."""
        return len(self.rounds)

    def proposed_per_position(self) -> list[int]:
        """How often the target judged the draft's i-th proposal (i = 1..k): it does only when
        proposals 1..i-1 were all accepted."""
        k = self.num_speculative_tokens
        return [sum(1 for p, a in self.rounds if p >= i and a >= i - 1) for i in range(1, k + 1)]

    def accepted_per_position(self) -> list[int]:
        k = self.num_speculative_tokens
        return [sum(1 for _, a in self.rounds if a >= i) for i in range(1, k + 1)]

    def acceptance_by_position(self) -> list[float]:
        """Acceptance rate of the i-th proposal, given that it was judged (nan if it never was)."""
        return [a / p if p else float("nan")
                for a, p in zip(self.accepted_per_position(), self.proposed_per_position())]

    @property
    def acceptance_rate(self) -> float:
        """alpha: accepted proposals / judged proposals, over every position."""
        judged = sum(self.proposed_per_position())
        return sum(self.accepted_per_position()) / judged if judged else float("nan")

    @property
    def tokens_per_target_forward(self) -> float:
        """Generated tokens per target forward (plain decoding: exactly 1)."""
        return self.generated / self.target_forwards if self.rounds else float("nan")

    def full_rounds(self) -> list[tuple[int, int]]:
        """The rounds that proposed all ``k`` tokens (the ones the formula describes)."""
        return [r for r in self.rounds if r[0] == self.num_speculative_tokens]


def expected_tokens_per_forward(alpha: float, k: int) -> float:
    """``(1 - alpha^(k+1)) / (1 - alpha)``: tokens per target forward when each proposal is
    accepted independently with probability ``alpha`` (Leviathan et al., equation 1)."""
    alpha = check_real("alpha", alpha, low=0.0, high=1.0)
    k = check_int("k", k, low=0)
    return float(k + 1) if alpha == 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)


def expected_speedup(alpha: float, k: int, cost_ratio: float) -> float:
    """Walltime improvement over plain decoding when a draft forward costs ``cost_ratio`` of a
    target forward: ``(1 - alpha^(k+1)) / ((1 - alpha)(k c + 1))`` (Leviathan et al., Theorem 3.8).
    It assumes the target scores ``k + 1`` tokens for the price of one."""
    c = check_real("cost_ratio", cost_ratio, low=0.0)
    return expected_tokens_per_forward(alpha, k) / (k * c + 1)


def greedy_verify(proposal: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """Greedy verification: ``(accepted, next_token)``.

    Row ``i`` of ``target_logits`` (k + 1 rows) is the target's prediction for the position of
    ``proposal[i]``; the last row predicts the token after the whole proposal.
    """
    choices = target_logits.argmax(dim=-1).tolist()
    accepted = 0
    while accepted < len(proposal) and proposal[accepted] == choices[accepted]:
        accepted += 1
    return accepted, choices[accepted]


def rejection_verify(proposal: list[int], draft_probs: torch.Tensor, target_probs: torch.Tensor,
                     generator: torch.Generator | None = None) -> tuple[int, int]:
    """Speculative sampling: ``(accepted, next_token)``, each kept token distributed as the target's.

    ``draft_probs`` (k, vocab) are the distributions the proposals were drawn from;
    ``target_probs`` (k + 1, vocab) the target's at the same positions and one more.
    """
    for i, token in enumerate(proposal):
        p, q = target_probs[i, token], draft_probs[i, token]
        if torch.rand((), generator=generator) * q <= p:   # u <= p/q, without dividing by q
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp_min(0)
        if float(residual.sum()) <= 0:    # p == q up to rounding: any draw from p will do
            residual = target_probs[i]
        return i, int(torch.multinomial(residual, 1, generator=generator))
    bonus = target_probs[len(proposal)]
    return len(proposal), int(torch.multinomial(bonus, 1, generator=generator))


def check_draft_compatible(target, draft, target_tokenizer=None, draft_tokenizer=None) -> None:
    """Refuse a draft whose token ids do not mean what the target's mean.

    The target verifies the draft's token *ids*; if the vocabularies differ (in size, or because
    the tokenisers cut text differently), its verdicts are about other tokens.
    """
    tv = getattr(getattr(target, "config", None), "vocab_size", None)
    dv = getattr(getattr(draft, "config", None), "vocab_size", None)
    if tv is None:
        raise bad("target", type(target).__name__, "a model with a config.vocab_size")
    if dv != tv:
        raise bad("draft", f"a model with vocab_size={dv}", f"the target's vocab_size={tv}",
                  "the target verifies the draft's token ids, so both must share one vocabulary")
    if (target_tokenizer is None) != (draft_tokenizer is None):
        raise bad("draft_tokenizer", draft_tokenizer, "both tokenizers or neither")
    if target_tokenizer is not None:
        probe = "Speculative decoding: the KV cache, 2 ranks, ünïcode."
        same = (type(target_tokenizer) is type(draft_tokenizer)
                and target_tokenizer.vocab_size == draft_tokenizer.vocab_size
                and target_tokenizer.encode(probe) == draft_tokenizer.encode(probe)
                and getattr(target_tokenizer, "eos_id", None) == getattr(draft_tokenizer, "eos_id", None))
        if not same:
            raise bad("draft_tokenizer", type(draft_tokenizer).__name__,
                      f"the target's tokenizer ({type(target_tokenizer).__name__})",
                      "the two cut the same text into different ids or have other special tokens")


def _prompt_list(prompt_ids, vocab: int) -> list[int]:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1:
            prompt_ids = prompt_ids[0]
        if prompt_ids.dim() != 1:
            raise bad("prompt_ids", prompt_ids, "one prompt: a list of ids, a 1-D tensor or a (1, n) tensor",
                      "speculative decoding here runs at batch size 1")
    check_token_ids("prompt_ids", prompt_ids, vocab)
    return [int(t) for t in prompt_ids]


@torch.no_grad()
def speculative_generate(target, draft, prompt_ids, max_new_tokens: int, *, num_speculative_tokens: int = 4,
                         temperature: float = 0.0, seed: int | None = None, eos_id: int | None = None,
                         verify=None, trace: list | None = None) -> tuple[torch.Tensor, SpeculativeStats]:
    """Generate up to ``max_new_tokens`` tokens with ``draft`` proposing and ``target`` verifying.

    Args:
        target, draft: models called as ``model(ids, cache=...)`` with ``new_cache()`` (the tiny LM).
        prompt_ids: one prompt (a list of ids, a 1-D tensor or a (1, n) tensor).
        num_speculative_tokens: ``k``, proposals per target forward (fewer near the end, so no
            token past ``max_new_tokens`` is computed).
        temperature: 0 is greedy (output equal to ``generate(target, ...)``); above 0 samples
            from ``softmax(logits / temperature)`` by rejection sampling (lossless).
        seed: seeds the one ``torch.Generator`` every draw uses.
        eos_id: generation stops after this token (accepted proposals after it are dropped).
        verify: greedy only, a replacement for :func:`greedy_verify` with its signature.
        trace: if a list is given, one dict per round is appended (for the step widget).

    Returns:
        ``(ids, stats)``: ids (1, prompt + new) like :func:`generate`, and :class:`SpeculativeStats`.
    """
    check_draft_compatible(target, draft)
    vocab = target.config.vocab_size
    prompt = _prompt_list(prompt_ids, vocab)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=0)
    k = check_int("num_speculative_tokens", num_speculative_tokens, low=1,
                  why="the draft proposes at least one token per target forward")
    temperature = check_real("temperature", temperature, low=0.0, why="0 means greedy")
    if seed is not None:
        check_int("seed", seed, low=0, high=2 ** 64 - 1)
    if eos_id is not None:
        check_int("eos_id", eos_id, low=0, high=vocab - 1)
    if verify is not None and (temperature > 0 or not callable(verify)):
        raise bad("verify", verify, "a greedy verification function, with temperature=0")
    mask = torch.ones(1, len(prompt), dtype=torch.long)
    for who, model in (("target", target), ("draft", draft)):
        try:
            check_context_length(model.config.max_seq_len, mask, max_new_tokens)
        except ValueError as err:
            raise bad("max_new_tokens", max_new_tokens, "a generation that fits the " + who + "'s context",
                      str(err)) from None
    greedy = temperature == 0
    verify = verify or greedy_verify
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    stats = SpeculativeStats(k)
    seq, t_cache, d_cache = list(prompt), target.new_cache(), draft.new_cache()
    # Invariant between rounds: both caches hold every kept token but the last, which has been
    # emitted but not yet fed to either model.
    while len(seq) - len(prompt) < max_new_tokens:
        left = max_new_tokens - (len(seq) - len(prompt))
        k_now = min(k, left - 1)         # the round emits k_now + 1 tokens at most
        proposal, draft_rows = [], []
        feed = seq[d_cache.seq_len:]
        for _ in range(k_now):
            logits = draft(torch.tensor([feed]), cache=d_cache)[0, -1]
            stats.draft_forwards += 1
            if greedy:
                token = int(logits.argmax())
            else:
                q = torch.softmax(logits.float() / temperature, dim=-1)
                token = int(torch.multinomial(q, 1, generator=generator))
                draft_rows.append(q)
            proposal.append(token)
            feed = [token]
        base = len(seq)
        logits = target(torch.tensor([seq[t_cache.seq_len:] + proposal]), cache=t_cache)[0, -(k_now + 1):]
        if greedy:
            accepted, token = verify(list(proposal), logits)
        else:
            p = torch.softmax(logits.float() / temperature, dim=-1)
            q = torch.stack(draft_rows) if draft_rows else p.new_zeros(0, vocab)
            accepted, token = rejection_verify(proposal, q, p, generator)
        kept = proposal[:accepted] + [int(token)]
        if eos_id is not None and eos_id in kept:
            kept = kept[:kept.index(eos_id) + 1]
        stats.rounds.append((k_now, accepted))
        if trace is not None:
            trace.append({"position": base - len(prompt), "context": list(seq), "proposal": proposal,
                          "target_choices": logits.argmax(dim=-1).tolist(), "accepted": accepted,
                          "token": int(token), "bonus": accepted == k_now})
        seq += kept
        # Roll back: forget the rejected proposals (the target saw all k_now, the draft k_now - 1).
        t_cache.truncate(min(t_cache.seq_len, len(seq) - 1))
        d_cache.truncate(min(d_cache.seq_len, len(seq) - 1))
        if eos_id is not None and seq[-1] == eos_id:
            break
    seq = seq[:len(prompt) + max_new_tokens]
    stats.generated = len(seq) - len(prompt)
    return torch.tensor([seq]), stats
