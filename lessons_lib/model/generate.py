"""Autoregressive generation: prefill the prompt, then decode one token at a time.

:func:`generate` talks to the model only through
``model(ids, positions=..., attention_mask=..., cache=...)``, so a tensor- or
pipeline-parallel wrapper with the same call can be passed in its place.

Two phases, with very different costs:

* prefill: the whole prompt in one forward pass (compute-bound, parallel over tokens);
* decode: one forward pass per new token (memory-bound, strictly sequential).
  The KV cache makes each decode step cost one token's worth of work instead of
  re-running every earlier token.
"""

from __future__ import annotations

import time

import torch

from ..validate import bad, check_int, check_real, check_token_ids
from .kv_cache import KVCache
from .llama import check_padding_mask, make_positions


def sample_next_token(logits: torch.Tensor, *, greedy: bool = True, temperature: float = 1.0,
                      top_k: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token id per row of ``logits`` (batch, vocab).

    Greedy takes the arg-max. Sampling divides the logits by ``temperature``
    (below 1 sharpens, above 1 flattens), keeps the ``top_k`` largest if asked,
    and draws from the softmax with ``generator`` so a seed fixes the draw.
    """
    if greedy:
        return logits.argmax(dim=-1)
    check_real("temperature", temperature, low=0, low_open=True, why="use greedy=True for arg-max")
    if top_k is not None:
        check_int("top_k", top_k, low=1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def last_token_logits(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's logits (batch, vocab) at its last real token.

    ``logits`` covers the last ``q_len`` columns of ``attention_mask``. With right
    padding the last real token is not the last column of a prefill; a one-token
    decode step has only one column to read.
    """
    q_len = logits.shape[1]
    if q_len == 1:
        return logits[:, 0]
    last = q_len - 1 - attention_mask[:, -q_len:].flip(1).argmax(dim=1)
    return logits[torch.arange(logits.shape[0], device=logits.device), last]


def _check_args(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, seed,
                eos_id) -> None:
    """Refuse, before any forward pass, every argument :func:`generate` cannot use."""
    # A parallel wrapper may not say its vocabulary; its own forward then checks the ids.
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise bad("input_ids", input_ids, "a (batch, seq) tensor of token ids")
    if input_ids.shape[1] == 0:
        raise bad("input_ids", input_ids, "at least one token per row", "the prompt needs one (e.g. BOS)")
    if vocab is not None:
        check_token_ids("input_ids", input_ids, vocab, allow_empty=True)
    check_int("max_new_tokens", max_new_tokens, low=0)
    check_real("temperature", temperature, low=0, low_open=True, why="use greedy=True for arg-max")
    if top_k is not None:
        check_int("top_k", top_k, low=1)
    if seed is not None:
        check_int("seed", seed, low=0, high=2 ** 64 - 1)
    if eos_id is not None:
        check_int("eos_id", eos_id, low=0, high=None if vocab is None else vocab - 1)
    if attention_mask is not None:
        check_padding_mask(attention_mask, input_ids.shape)
        if not bool((attention_mask.sum(dim=1) > 0).all()):
            raise bad("attention_mask", attention_mask, "at least one 1 (a real token) in every row")


def check_context_length(max_seq_len: int | None, attention_mask: torch.Tensor,
                         max_new_tokens: int) -> None:
    """Refuse, before any work, a generation whose prompt and new tokens outgrow the model.

    The context window holds each row's real prompt tokens and its new tokens; padding
    takes no position. ``max_seq_len=None`` (a model that does not say) checks nothing.
    """
    if max_seq_len is None or max_new_tokens == 0 or attention_mask.shape[0] == 0:
        return                     # (a data-parallel rank may get no rows of a small batch)
    longest = int(attention_mask.sum(dim=1).max())
    if longest + max_new_tokens > max_seq_len:
        raise ValueError(f"max_new_tokens={max_new_tokens} after a prompt of {longest} tokens needs "
                         f"{longest + max_new_tokens} positions, beyond max_seq_len={max_seq_len}: "
                         f"choose max_new_tokens <= {max(0, max_seq_len - longest)}")


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *,
             attention_mask: torch.Tensor | None = None, greedy: bool = True,
             temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
             use_cache: bool = True, eos_id: int | None = None,
             timings: dict | None = None) -> torch.Tensor:
    """Extend each row of ``input_ids`` by up to ``max_new_tokens`` tokens.

    Args:
        model: anything called as ``model(ids, positions=, attention_mask=, cache=)``
            that returns logits (batch, seq, vocab).
        input_ids: (batch, prompt_len) prompt ids, padded on either side.
        attention_mask: (batch, prompt_len), 1 for real tokens and 0 for padding.
        greedy: arg-max decoding; ``False`` samples with ``temperature`` and ``top_k``.
        seed: seeds a private ``torch.Generator``, so sampling is reproducible
            and does not disturb the global random state.
        use_cache: keep keys and values between steps (the fast path). Greedy
            output is the same token for token either way.
        eos_id: a row that emits it is finished and is filled with it after;
            generation stops early once every row is finished.
        timings: if a dict is given, ``prefill_s`` and ``decode_s`` (seconds) are
            written into it.

    Returns:
        (batch, prompt_len + new) ids: the prompt, padding included, then the
        new tokens. New tokens go after any right padding; the mask keeps the pads
        invisible and positions ignore them.
    """
    _check_args(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, seed, eos_id)
    batch = input_ids.shape[0]
    mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.long())
    check_context_length(getattr(getattr(model, "config", None), "max_seq_len", None), mask,
                         max_new_tokens)
    generator = None
    if not greedy and seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    cache = None
    if use_cache:
        cache = model.new_cache() if hasattr(model, "new_cache") else KVCache()

    def forward_last(step_ids: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
        logits = model(step_ids, positions=make_positions(step_mask, step_ids.shape[1]),
                       attention_mask=step_mask, cache=cache)
        return last_token_logits(logits, step_mask)

    def pick(last_logits: torch.Tensor) -> torch.Tensor:
        return sample_next_token(last_logits, greedy=greedy, temperature=temperature, top_k=top_k,
                                 generator=generator)

    return decode_loop(forward_last, pick, input_ids, mask, max_new_tokens, use_cache=use_cache,
                       eos_id=eos_id, timings=timings)


def decode_loop(forward_last, pick, input_ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, *,
                use_cache: bool = True, eos_id: int | None = None, timings: dict | None = None) -> torch.Tensor:
    """The library's one decode loop: prefill the prompt, then one token per step.

    ``forward_last(step_ids, mask)`` runs the model on the tokens it has not seen (all of them at the
    first step, or always without a cache) and returns each row's logits at its last real token;
    ``pick(logits)`` turns them into the next ids (batch,). :func:`generate` passes a model call and
    a sampler; the pipeline runtime passes a run through its stages and an arg-max broadcast from
    the last stage (a stage without logits gets ``None`` and must still return the ids). The serving
    engine schedules its own steps but picks tokens with the same :func:`sample_next_token`.
    """
    batch = input_ids.shape[0]
    ids = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    prefill_s = decode_s = 0.0
    for step in range(max_new_tokens):
        start = time.perf_counter()
        # With a cache, only the tokens the model has not seen yet are fed in.
        step_ids = ids[:, -1:] if (use_cache and step > 0) else ids
        next_ids = pick(forward_last(step_ids, mask))
        if eos_id is not None:
            next_ids = torch.where(finished, torch.full_like(next_ids, eos_id), next_ids)
            finished |= next_ids == eos_id
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        elapsed = time.perf_counter() - start
        if step == 0:
            prefill_s += elapsed
        else:
            decode_s += elapsed
        if eos_id is not None and bool(finished.all()):
            break
    if timings is not None:
        timings.update(prefill_s=prefill_s, decode_s=decode_s)
    return ids
