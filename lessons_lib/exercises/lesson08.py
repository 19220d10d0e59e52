"""Checkers for notebook 08 (security and privacy).

- ``08.predict_sealed_bytes`` (predict): the bytes AES-GCM puts on the wire for a tensor's
  payload, measured by sealing one with the lesson's ``TensorSealer``;
- ``08.replay_window`` (build): a sliding anti-replay window: each sequence number accepted at
  most once, reordering within the window allowed, anything older refused;
- ``08.tenant_blocks`` (stretch): prefix-cache block keys isolated per tenant, with a salt the
  server derives from a secret (a salt a client can compute is no isolation).
"""

from __future__ import annotations

import functools

import torch

from ..serving.policies import block_hashes
from ..serving.security import ReplayWindow, TensorOpener, TensorSealer, new_key
from .check import (Incorrect, exercise, judge_prediction, labelled_cases, predicted_number, refuse_reference,
                    with_hidden)

# -- 08.predict_sealed_bytes (predict) --------------------------------------------------------
SEAL_SHAPE, SEAL_DTYPE = (3, 5), torch.bfloat16


@functools.lru_cache(maxsize=1)
def measured_sealed_bytes() -> int:
    """Bytes after the clear-text header of a sealed (3, 5) bfloat16 tensor."""
    message = TensorSealer(new_key(), sender="rank0").seal(torch.zeros(SEAL_SHAPE, dtype=SEAL_DTYPE))
    header_len = int.from_bytes(message[:2], "big")
    return len(message) - 2 - header_len


@exercise("08.predict_sealed_bytes", "predict the encrypted bytes of a sealed tensor")
def check_predict_sealed_bytes(candidate):
    refuse_reference(candidate, TensorSealer, measured_sealed_bytes)
    guess = predicted_number(candidate, "predicted_sealed_bytes")
    measured = measured_sealed_bytes()
    payload = 3 * 5 * 2
    mistakes = [
        (payload, "GCM appends a 16-byte authentication tag to the ciphertext"),
        (payload + 16 + 12, "the 12-byte nonce travels in the clear header (it is not secret), not in the "
                            "encrypted part"),
        (payload * 2 + 16, "bfloat16 is 2 bytes per element, not 4"),
        (payload + 32, "GCM's tag is 16 bytes (128 bits), not 32"),
        (-(-payload // 16) * 16 + 16, "GCM is a stream mode (counter mode): the ciphertext is as long as the "
                                      "plaintext, with no padding to whole 16-byte blocks"),
    ]
    judge_prediction(guess, measured, mistakes, "bytes",
                     "The encrypted part is the ciphertext (as long as the plaintext) plus the tag.",
                     tolerance=0.0)
    return f"{measured} bytes: {payload} of ciphertext (no padding in counter mode) and a 16-byte tag"


# -- 08.replay_window (build) -----------------------------------------------------------------
def _reference_verdicts(seqs, window):
    highest, seen, out = 0, set(), []
    for s in seqs:
        if s <= highest - window:
            out.append("old")
        elif s in seen:
            out.append("replay")
        else:
            out.append("ok")
            highest = max(highest, s)
            seen = {x for x in seen | {s} if x > highest - window}
    return out


WINDOW_CASES = [
    ("in order", [1, 2, 3, 4, 5], 4),
    ("a replay of the last message", [1, 2, 3, 3], 4),
    ("reordered within the window", [1, 3, 2, 5, 4], 4),
    ("a late message exactly at the window's edge and one past it", [1, 2, 10, 7, 6], 4),
    ("a jump far ahead", [1, 2, 3, 100, 4, 99, 99], 8),
    ("window of one", [1, 2, 2, 4, 3], 1),
    ("a replay of an old message still in the window", [5, 1, 9, 6, 7, 6], 4),
]
WINDOW_HIDDEN = [  # grading only
    ("no messages", [], 3),
    ("a wide window after a jump", [3, 1, 2, 3, 20, 5, 4, 5, 19, 19], 16),
    ("the first message far from 1", [1000, 999, 1000, 997, 996], 4),
]


@exercise("08.replay_window", "a sliding anti-replay window")
def check_replay_window(candidate, hidden=False):
    refuse_reference(candidate, ReplayWindow, TensorOpener)
    for label, (what, seqs, window) in labelled_cases(WINDOW_CASES, WINDOW_HIDDEN, hidden):
        what = f"{label}{what}"
        want = _reference_verdicts(seqs, window)
        got = candidate(list(seqs), window)
        case = f"{what}: sequence numbers {seqs}, window {window}"
        if not isinstance(got, list) or len(got) != len(seqs):
            raise Incorrect(f"{case}: return one verdict per sequence number, got {got!r}")
        for i, (g, w) in enumerate(zip(got, want)):
            if g == w:
                continue
            said = f"{case}: message {i} (seq {seqs[i]}) should be {w!r}, you said {g!r}"
            if w != "old" and g == "old":
                raise Incorrect(f"{said}: it is above highest - window = {max(seqs[:i] or [0])} - {window}, "
                                f"inside the window. Messages may arrive out of order: inside the window a "
                                f"number not accepted yet is fine, one accepted before is a replay")
            if w == "replay" and g == "ok":
                raise Incorrect(f"{said}: it was accepted before; remember every accepted number still "
                                f"inside the window")
            if w == "old" and g in ("ok", "replay"):
                top = max(seqs[:i] or [0])
                raise Incorrect(f"{said}: it is at or below highest - window = {top} - {window} = "
                                f"{top - window}, where the window no longer remembers what was accepted, "
                                f"so it must be refused as too old")
            raise Incorrect(f"{said} (window: highest - window < seq; inside it, each number once)")
    return with_hidden(f"right on {len(WINDOW_CASES)} streams: in order, reordered, replayed, too old",
                       WINDOW_HIDDEN, hidden)


# -- 08.tenant_blocks (stretch) ---------------------------------------------------------------
BLOCK = 4
SECRET_A, SECRET_B = b"server-secret-one", b"server-secret-two"


def _call(candidate, tokens, tenant, secret):
    keys = candidate(list(tokens), tenant, secret, BLOCK)
    if not isinstance(keys, list) or not all(isinstance(k, (str, bytes)) for k in keys):
        raise Incorrect(f"tenant_block_keys({tokens}, {tenant!r}, ...) returned {keys!r}; return a list "
                        f"of str or bytes, one per whole block")
    return keys


@exercise("08.tenant_blocks", "prefix-cache keys isolated per tenant with a server-derived salt")
def check_tenant_blocks(candidate):
    refuse_reference(candidate, block_hashes)
    prompt = list(range(10, 20))                  # 2 whole blocks and 2 tokens left over
    other = prompt[:4] + [99] + prompt[5:]        # differs in block 1 only
    a1 = _call(candidate, prompt, "acme", SECRET_A)
    if len(a1) != len(prompt) // BLOCK:
        raise Incorrect(f"{len(prompt)} tokens with block_size {BLOCK} make {len(prompt) // BLOCK} whole "
                        f"blocks, you returned {len(a1)} keys: a partial last block is never cached")
    if _call(candidate, prompt, "acme", SECRET_A) != a1:
        raise Incorrect("the same tenant, prompt and secret gave different keys: a key must be "
                        "deterministic, or no request ever hits the cache")
    b1 = _call(candidate, prompt, "globex", SECRET_A)
    if set(a1) & set(b1):
        raise Incorrect("tenants 'acme' and 'globex' got a common key for the same prompt: a tenant could "
                        "then time the other's cache hits. Mix the tenant into every key")
    if _call(candidate, prompt, "acme", SECRET_B) == a1:
        raise Incorrect("changing the server's secret did not change the keys: the salt is computable from "
                        "the tenant name alone, so anyone who knows (or guesses) a tenant's name can "
                        "probe its cache. Derive the salt from a server secret (e.g. HMAC(secret, tenant))")
    changed = _call(candidate, other, "acme", SECRET_A)
    if changed[0] != a1[0]:
        raise Incorrect("changing a token of block 1 changed block 0's key: a block's key depends on the "
                        "tokens up to the end of that block, not after it")
    if changed[1] == a1[1]:
        raise Incorrect("changing a token of block 1 left block 1's key unchanged: hash each block's tokens")
    later = _call(candidate, [7] + prompt[1:], "acme", SECRET_A)
    if later[1] == a1[1]:
        raise Incorrect("changing a token of block 0 left block 1's key unchanged: keys must be chained "
                        "(each includes the previous block's key), or two prompts that differ early would "
                        "share a later block and its cached KV, which depends on every token before it")
    return "deterministic, per tenant, salted by a server secret, chained, whole blocks only"
