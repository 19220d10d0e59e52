"""Checkers for notebook 10 (caching): how many requests a paged KV pool admits, a prefix cache
of chained block hashes with reference counts and tail-first eviction, and a paged KV append
that neither misplaces tokens nor leaks blocks."""

from __future__ import annotations

import functools
import numbers

import torch

from ..caching import (BlockAllocator, KVBlockPool, OutOfBlocksError, PagedSequenceCache,
                       PrefixCache, block_hashes, blocks_needed, prefill)
from ..caching.paged_kv import _PagedLayerView
from ..model import ModelConfig, TinyLM, kv_cache_bytes_per_token
from .check import Incorrect, exercise, judge_prediction, labelled_cases, refuse_reference, with_hidden

# -- predict: requests admitted by a paged KV pool of a fixed size -------------------------
BUDGET_BYTES = 2 ** 20        # 1 MiB of KV memory
BLOCK_TOKENS = 16
PROMPT_TOKENS = 100


@functools.lru_cache(maxsize=1)
def measured_paged_requests() -> int:
    """Prefill 100-token prompts into a 1 MiB paged pool for the tiny LM until one is refused.

    The pool holds as many blocks as fit the budget, each block's bytes measured on a real
    one-block pool; every prompt really runs through the model into its blocks."""
    config = ModelConfig()
    model = TinyLM(config).eval()
    block_bytes = KVBlockPool.for_model(config, 1, BLOCK_TOKENS).nbytes()
    pool = KVBlockPool.for_model(config, BUDGET_BYTES // block_bytes, BLOCK_TOKENS)
    assert pool.nbytes() <= BUDGET_BYTES
    prompt = [i % config.vocab_size for i in range(PROMPT_TOKENS)]
    admitted = 0
    while admitted <= pool.allocator.num_blocks:
        try:
            prefill(model, prompt, pool)
        except OutOfBlocksError:
            break
        admitted += 1
    return admitted


def _paged_mistakes() -> list[tuple[float, str]]:
    config = ModelConfig()
    per_token = kv_cache_bytes_per_token(config)
    blocks = BUDGET_BYTES // (per_token * BLOCK_TOKENS)
    per_request = blocks_needed(PROMPT_TOKENS, BLOCK_TOKENS)

    def fit(bytes_per_token: float) -> int:
        return int(BUDGET_BYTES // (bytes_per_token * BLOCK_TOKENS)) // per_request

    return [
        (BUDGET_BYTES // (PROMPT_TOKENS * per_token),
         f"That divides the budget by {PROMPT_TOKENS} tokens' worth of bytes, but a request holds "
         f"whole blocks of {BLOCK_TOKENS} tokens: its last block is allocated in full even though "
         "it is only partly used, and a request that does not fit entirely is refused"),
        (fit(per_token / 2), "That counts half the bytes per token: every token stores a key AND a "
         "value, in float32 (4 bytes per element)"),
        (fit(per_token * config.n_heads / config.n_kv_heads),
         f"That counts all {config.n_heads} query heads: with grouped-query attention the cache "
         f"holds only the {config.n_kv_heads} KV heads"),
        (fit(per_token / config.n_layers), f"That counts one layer: every one of the "
         f"{config.n_layers} layers keeps its own keys and values"),
        (BUDGET_BYTES // (config.max_seq_len * per_token),
         f"That is a contiguous cache reserving max_seq_len = {config.max_seq_len} slots per request; "
         "a paged pool gives a request only the blocks it fills"),
    ]


@exercise("10.paged_requests", "predict: how many 100-token prompts a 1 MiB paged KV pool admits")
def check_paged_requests(candidate):
    refuse_reference(candidate, measured_paged_requests, KVBlockPool, PagedSequenceCache, prefill,
                     kv_cache_bytes_per_token, blocks_needed)
    guess = candidate()
    judge_prediction(guess, measured_paged_requests(), _paged_mistakes(), "requests",
                     "Count the bytes of one block (per token: K and V, every layer, every KV head, "
                     "head_dim floats), the blocks in the budget, and the blocks one prompt holds.",
                     tolerance=0)
    return "exactly the number of prompts the tiny LM prefilled into the pool before it was full"


# -- build: a prefix cache with reference counts and tail-first eviction ------------------
class _Full(Exception):
    pass


class _Reference:
    """The prefix cache the exercise asks for; ``mistake`` switches on one typical error, so the
    checker can tell which one a wrong answer behaves like."""

    def __init__(self, num_blocks: int, block_size: int, mistake: str | None = None) -> None:
        self.bs, self.mistake = block_size, mistake
        self.refs = [0] * num_blocks
        self.plain = list(range(num_blocks))     # free, holding no cached prefix
        self.cached_free: list[int] = []         # free and cached, released longest ago first
        self.block_of: dict[tuple, int] = {}
        self.prefix_of: dict[int, tuple] = {}

    def _prefixes(self, tokens: list[int]) -> list[tuple]:
        # The full prefix up to a block's end identifies it: what a chained hash stands for.
        return [tuple(tokens[:end]) for end in range(self.bs, len(tokens) + 1, self.bs)]

    def admit(self, tokens: list[int]) -> tuple[int, list[int]]:
        shared = []
        for prefix in self._prefixes(tokens[:-1]):
            block = self.block_of.get(prefix)
            if block is None:
                break
            shared.append(block)
        need = blocks_needed(len(tokens), self.bs) - len(shared)
        evictable = 0 if self.mistake == "never_evicts" else len(self.cached_free)
        available = len(self.plain) + evictable - sum(self.refs[b] == 0 for b in shared)
        if need > available:
            if self.mistake == "leaks":
                for block in shared:
                    self._hold(block)
                for _ in range(max(0, available)):
                    self._take()
            raise _Full()
        for block in shared:
            self._hold(block)
        table = shared + [self._take() for _ in range(need)]
        for prefix, block in zip(self._prefixes(tokens), table):
            if prefix not in self.block_of and block not in self.prefix_of:
                self.block_of[prefix], self.prefix_of[block] = block, prefix
        return len(shared) * self.bs, table

    def _hold(self, block: int) -> None:
        if self.refs[block] == 0:
            self.cached_free.remove(block)
        self.refs[block] += 1

    def _take(self) -> int:
        if self.cached_free and (not self.plain or self.mistake == "cached_first"):
            block = self.cached_free.pop(-1 if self.mistake == "evicts_newest" else 0)
            del self.block_of[self.prefix_of.pop(block)]
        else:
            block = self.plain.pop(0)
        self.refs[block] = 1
        return block

    def release(self, table: list[int]) -> None:
        for block in (table if self.mistake == "head_first" else reversed(table)):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                (self.cached_free if block in self.prefix_of else self.plain).append(block)


MISTAKES = {
    "leaks": "a refused admit must take nothing: check that all the blocks it needs are available "
             "before taking any, or the blocks it took are lost to every later request",
    "never_evicts": "a free block that still holds a cached prefix may be evicted (its hash "
                    "forgotten) when no never-cached free block is left",
    "cached_first": "new tokens should take a free block that holds no cached prefix first, and "
                    "evict a cached one only when none is left: your cache evicted cached blocks "
                    "while blank ones were free",
    "evicts_newest": "evict the cached free block released longest ago (least recently used), "
                     "not the one released last",
    "head_first": "release a table tail first (its last block becomes free first): your cache "
                  "evicted the head of a prefix, which breaks the chain and makes every block "
                  "after it unreachable, while the tail should go first",
}

BS = 4
_S = list(range(1, 9))               # a shared system prompt: two full blocks
_A = list(range(20, 24))             # one block after it
_B = list(range(30, 34))
_T = list(range(40, 48))             # another two-block prompt


def _seq(*parts) -> list[int]:
    return [t for part in parts for t in part]


# Each scenario: (what it tests, num_blocks, steps). A step admits a named request, or
# releases one; the checker compares every admit with the reference.
SCENARIOS = [
    ("sharing", 16, [
        ("admit", "A = S + a + [1]", _seq(_S, _A, [1])),
        ("admit", "A' = A + [9]", _seq(_S, _A, [1, 9])),
        ("admit", "B = S + b + [2]", _seq(_S, _B, [2])),
        ("admit", "B2 = S + b + [3]", _seq(_S, _B, [3])),
        ("admit", "U = T + b + [4]", _seq(_T, _B, [4])),
        ("admit", "V = T + b + [5]", _seq(_T, _B, [5])),
        ("admit", "B3 = S + b + [6]", _seq(_S, _B, [6])),
        ("admit", "W = S (8 tokens)", list(_S)),
    ]),
    ("shared blocks stay held", 7, [
        ("admit", "A = S + a + [1]", _seq(_S, _A, [1])),
        ("admit", "B = S + b + [2]", _seq(_S, _B, [2])),
        ("release", "A"),
        ("admit", "X (13 tokens)", list(range(120, 133))),
        ("admit", "Y (5 tokens)", list(range(140, 145))),
    ]),
    ("running out", 6, [
        ("admit", "A = S + a + [1]", _seq(_S, _A, [1])),
        ("admit", "C (13 tokens)", list(range(100, 113))),
        ("admit", "X (8 tokens)", list(range(120, 128))),
        ("release", "A"),
        ("release", "X"),
        ("admit", "D (20 tokens)", list(range(140, 160))),
    ]),
    ("which free block", 6, [
        ("admit", "A = S + a + [1]", _seq(_S, _A, [1])),
        ("release", "A"),
        ("admit", "X (5 tokens)", list(range(120, 125))),
        ("admit", "A2 = S + a + [2]", _seq(_S, _A, [2])),
    ]),
    ("eviction order", 8, [
        ("admit", "A = S + a + [1]", _seq(_S, _A, [1])),
        ("admit", "P (13 tokens)", list(range(60, 73))),
        ("release", "A"),
        ("release", "P"),
        ("admit", "X (9 tokens)", list(range(120, 129))),
        ("admit", "A2 = S + a + [2]", _seq(_S, _A, [2])),
    ]),
]
HIDDEN_SCENARIOS = [  # grading only
    ("prompts of whole blocks and a pool that fills", 4, [
        ("admit", "W = S (8 tokens)", list(_S)),
        ("admit", "W2 = S (8 tokens)", list(_S)),
        ("admit", "Z (1 token)", [200]),
        ("admit", "Y (1 token)", [201]),
        ("release", "W"),
        ("admit", "Y2 (1 token)", [202]),
        ("admit", "A = S + a + [1]", _seq(_S, _A, [1])),
        ("release", "W2"),
        ("admit", "A2 = S + a + [2]", _seq(_S, _A, [2])),
    ]),
    ("a pool of one block", 1, [
        ("admit", "X (4 tokens)", [300, 301, 302, 303]),
        ("admit", "X2 (4 tokens)", [300, 301, 302, 303]),
        ("release", "X"),
        ("admit", "X3 (5 tokens)", [300, 301, 302, 303, 304]),
        ("admit", "Q (3 tokens)", [310, 311, 312]),
    ]),
]
LEGEND = "S = tokens 1..8 (two blocks), a = 20..23, b = 30..33, T = 40..47"


def _label(step) -> str:
    return step[1].split(" ")[0]


def _story(num_blocks: int, done: list[str], label: str = "") -> str:
    return (f"{label}a pool of {num_blocks} blocks of {BS} tokens ({LEGEND}): " + ", ".join(done))


def _diagnose(outcomes: list, variants: dict[str, list]) -> str:
    """The typical mistakes whose simulation gave the same outcomes as the answer, as a hint."""
    alike = [MISTAKES[m] for m, seen in variants.items() if seen[:len(outcomes)] == outcomes]
    return (" Likely cause: " + "; or ".join(alike)) if alike else ""


def _run_variants(num_blocks: int, steps, mistakes) -> dict[str, list]:
    seen = {}
    for mistake in mistakes:
        ref, tables, out = _Reference(num_blocks, BS, mistake), {}, []
        for step in steps:
            if step[0] == "admit":
                try:
                    reused, tables[_label(step)] = ref.admit(step[2])
                    out.append(reused)
                except _Full:
                    out.append("refused")
            elif _label(step) in tables:
                ref.release(tables.pop(_label(step)))
        seen[mistake] = out
    return seen


def _check_scenario(candidate, num_blocks: int, steps, plausible: set, label: str = "") -> None:
    """Drive the answer through ``steps`` beside the reference; ``plausible`` (the mistakes the
    answer has not been cleared of yet) loses those that behave differently from it here."""
    cache = candidate(num_blocks, BS)
    ref = _Reference(num_blocks, BS)
    variants = _run_variants(num_blocks, steps, [m for m in MISTAKES if m in plausible])
    tables, ref_tables = {}, {}
    holders: dict[int, set] = {}       # block -> labels of live requests that hold it
    content: dict[int, tuple] = {}     # block -> the tokens whose K/V it holds (the whole prefix)
    done, outcomes = [], []
    for step in steps:
        label = _label(step)
        story = _story(num_blocks, done, label)
        if step[0] == "release":
            try:
                cache.release(list(tables[label]))
            except NotImplementedError:
                raise
            except Exception as exc:  # noqa: BLE001 - a learner's error is a hint
                raise Incorrect(f"{story}, release({label}): raised {type(exc).__name__}: {exc}") from None
            ref.release(ref_tables.pop(label))
            for block in tables.pop(label):
                holders[block].discard(label)
            done.append(f"release({label})")
            continue
        tokens = step[2]
        call = f"admit({step[1]}, {len(tokens)} tokens)"
        free_before = len(ref.plain) + len(ref.cached_free)
        try:
            expected, ref_table = ref.admit(list(tokens))
        except _Full:
            expected, ref_table = "refused", None
        try:
            got = cache.admit(list(tokens))
        except NotImplementedError:
            raise
        except RuntimeError as exc:
            outcomes.append("refused")
            if expected != "refused":
                raise Incorrect(f"{story}, {call}: raised RuntimeError ({exc}), but it fits: it reuses "
                                f"{expected} tokens and the pool had {free_before} free blocks before it."
                                + _diagnose(outcomes, variants)) from None
            done.append(f"{call} refused")
            continue
        except Exception as exc:  # noqa: BLE001 - a learner's error is a hint
            raise Incorrect(f"{story}, {call}: raised {type(exc).__name__}: {exc}") from None
        if not (isinstance(got, tuple) and len(got) == 2):
            raise Incorrect(f"{story}, {call}: returned {got!r}; return (block_table, reused_tokens)")
        table, reused = got
        n_blocks = blocks_needed(len(tokens), BS)
        if not (isinstance(table, (list, tuple)) and all(isinstance(b, numbers.Integral) for b in table)):
            raise Incorrect(f"{story}, {call}: the block table must be a list of block ids; got {table!r}")
        table = [int(b) for b in table]
        if len(table) != n_blocks or len(set(table)) != n_blocks or not all(0 <= b < num_blocks for b in table):
            raise Incorrect(f"{story}, {call}: returned the block table {table}; {len(tokens)} tokens "
                            f"need {n_blocks} distinct blocks of {BS}, ids 0..{num_blocks - 1}")
        if not isinstance(reused, numbers.Integral) or isinstance(reused, bool):
            raise Incorrect(f"{story}, {call}: reused must be an int (tokens taken from the cache); got {reused!r}")
        reused = int(reused)
        if reused != expected and reused * BS == expected:
            raise Incorrect(f"{story}, {call}: returned reused = {reused}, expected {expected}: that is "
                            "the number of shared blocks; return the tokens they hold, "
                            "block_size x shared blocks")
        if reused > len(tokens) // BS * BS:
            raise Incorrect(f"{story}, {call}: reused {reused} tokens, but its {len(tokens)} tokens fill "
                            f"only {len(tokens) // BS} blocks of {BS}: the last, partly filled block "
                            "is still growing, so only full blocks are hashed and shared")
        if reused >= len(tokens):
            raise Incorrect(f"{story}, {call}: reused {reused} of its {len(tokens)} tokens, leaving nothing "
                            "to run through the model: the next token's logits come from the last prompt "
                            "token, so look up the blocks of tokens[:-1] only")
        if reused % BS or reused < 0:
            raise Incorrect(f"{story}, {call}: reused {reused} tokens, not a multiple of the block size "
                            f"{BS}: only full blocks are hashed and shared")
        k = reused // BS
        for i, block in enumerate(table[:k]):
            want = tuple(tokens[:(i + 1) * BS])
            held = content.get(block)
            if held != want:
                if held is not None and held[-BS:] == want[-BS:]:
                    raise Incorrect(
                        f"{story}, {call}: shared block {block} as the K/V of tokens {list(want[-BS:])} "
                        f"after {list(want[:-BS])}, but block {block} was computed after "
                        f"{list(held[:-BS])}. Equal tokens after a different prefix have different "
                        "keys and values: chain each block's hash to the hash of the block before it")
                raise Incorrect(
                    f"{story}, {call}: shared block {block} as the K/V of {list(want)}, but it now holds "
                    f"{list(held) if held else 'nothing computed'}: when a block is evicted and "
                    "reused, forget its old hash")
        for i, block in enumerate(table[k:], start=k):
            others = holders.get(block, set())
            if others:
                raise Incorrect(
                    f"{story}, {call}: gave block {block} to new tokens while {sorted(others)[0]} still "
                    "holds it, overwriting that request's keys and values. Only a block with no "
                    "references is free: count a reference per holder, take a shared hit off the "
                    "free pool, and evict only free blocks")
            content[block] = tuple(tokens[:min((i + 1) * BS, len(tokens))])
        outcomes.append(reused)
        if expected == "refused":
            raise Incorrect(f"{story}, {call}: was admitted, but it needs {n_blocks - k} new blocks "
                            "and fewer are free (blank or evictable): raise RuntimeError and take nothing")
        if reused != expected:
            raise Incorrect(f"{story}, {call}: reused {reused} tokens, expected {expected}."
                            + (_diagnose(outcomes, variants) or
                               " Look up the full blocks of tokens[:-1] in order and stop at the first miss"))
        tables[label], ref_tables[label] = table, ref_table
        for block in table:
            holders.setdefault(block, set()).add(label)
        done.append(f"{call} -> {reused}")
    plausible.intersection_update(m for m, seen in variants.items() if seen == outcomes)


@exercise("10.prefix_blocks", "build: a prefix cache with reference counts and tail-first eviction")
def check_prefix_blocks(candidate, hidden=False):
    refuse_reference(candidate, PrefixCache, block_hashes, BlockAllocator, prefill)
    plausible = set(MISTAKES)
    for label, (_, num_blocks, steps) in labelled_cases(SCENARIOS, HIDDEN_SCENARIOS, hidden):
        _check_scenario(candidate, num_blocks, steps, plausible, label)
    return with_hidden("shares exactly the cached prefix, never reuses a held block, refuses what does not "
                       "fit without leaking, and evicts least recently released blocks, tail first",
                       HIDDEN_SCENARIOS, hidden)


# -- stretch: a paged KV append that misplaces nothing and leaks nothing -------------------
HEADS, HEAD_DIM, POOL_BLOCKS = 2, 3, 8


def _blocks(n: int) -> str:
    return f"{n} block" + ("" if n == 1 else "s")


def _token_kv(position: int) -> tuple[torch.Tensor, torch.Tensor]:
    base = torch.arange(HEADS * HEAD_DIM, dtype=torch.float32).view(HEADS, HEAD_DIM) / 100
    return base + 1000 + position, -(base + 1000 + position)


def _locate(pool: torch.Tensor, vector: torch.Tensor) -> tuple[int, int] | None:
    hits = (pool == vector).flatten(2).all(dim=2).nonzero()
    return tuple(int(i) for i in hits[0]) if len(hits) else None


def _append_case(candidate, pool_k, pool_v, allocator, table, seq_len, n, what):
    pairs = [_token_kv(p) for p in range(seq_len, seq_len + n)]
    k = torch.stack([kv[0] for kv in pairs]) if pairs else torch.zeros(0, HEADS, HEAD_DIM)
    v = torch.stack([kv[1] for kv in pairs]) if pairs else torch.zeros(0, HEADS, HEAD_DIM)
    free_before, blocks_before = allocator.num_free, list(table)
    case = (f"{what} (block_size {BS}, table {blocks_before}, seq_len {seq_len}, {n} new "
            f"token{'' if n == 1 else 's'})")
    try:
        new_len = candidate(pool_k, pool_v, allocator, table, seq_len, k, v)
    except NotImplementedError:
        raise
    except IndexError as exc:
        need = blocks_needed(seq_len + n, BS)
        if len(table) < need:
            raise Incorrect(f"{case}: raised IndexError: {exc}. The table had {_blocks(len(table))} for "
                            f"{seq_len + n} tokens: a partly filled last block needs a block too, so the "
                            f"table needs ceil((seq_len + n) / block_size) = {need} blocks, not floor") from None
        raise Incorrect(f"{case}: raised IndexError: {exc}. The table has the {_blocks(need)} it needs, so "
                        "the index out of range is a block index: position pos lives in block "
                        "table[pos // block_size], slot pos % block_size") from None
    except Exception as exc:  # noqa: BLE001 - a learner's error is a hint
        raise Incorrect(f"{case}: raised {type(exc).__name__}: {exc}") from None
    if new_len != seq_len + n:
        raise Incorrect(f"{case}: returned {new_len!r}; return the new length, seq_len + n = {seq_len + n}")
    need = blocks_needed(seq_len + n, BS)
    taken = free_before - allocator.num_free
    if table[:len(blocks_before)] != blocks_before:
        raise Incorrect(f"{case}: the table's existing blocks changed to {table[:len(blocks_before)]}: "
                        "append new blocks after them")
    if len(table) == len(blocks_before) and taken == need - len(blocks_before) > 0:
        raise Incorrect(f"{case}: {_blocks(taken)} taken from the allocator, but block_table is still "
                        f"{table}: append the new blocks to the list you were given (in place), the "
                        "sequence keeps using it")
    if len(table) != need or taken != need - len(blocks_before):
        why = (f"the last block had room for {len(blocks_before) * BS - seq_len} more tokens"
               if len(blocks_before) * BS > seq_len else "")
        raise Incorrect(f"{case}: the table has {_blocks(len(table))}, {taken} taken by this call; "
                        f"{seq_len + n} tokens need {_blocks(need)} (ceil({seq_len + n} / {BS})), so "
                        f"{need - len(blocks_before)} new" + (f": {why}" if why else ""))
    for p in range(seq_len + n):
        want_k, want_v = _token_kv(p)
        block, slot = table[p // BS], p % BS
        if torch.equal(pool_k[block, slot], want_k) and torch.equal(pool_v[block, slot], want_v):
            continue
        if torch.equal(pool_k[block, slot], want_k) and torch.equal(pool_v[block, slot], -want_v):
            raise Incorrect(f"{case}: position {p}: pool_v holds its key, not its value")
        found = _locate(pool_k, want_k)
        said = (f"{case}: position {p} belongs in block table[{p // BS}] = {block}, slot {p} % {BS} "
                f"= {slot}; its key is " + (f"in block {found[0]}, slot {found[1]}" if found else "nowhere"))
        if found and p % BS < len(table) and found == (table[p % BS], p // BS):
            raise Incorrect(f"{said}: block and slot are swapped (block = table[pos // block_size], "
                            "slot = pos % block_size)")
        if p < seq_len:
            raise Incorrect(f"{said}: an earlier token was overwritten; new tokens start at position seq_len")
        if found and (p - seq_len) // BS < len(table) and found == (table[(p - seq_len) // BS], (p - seq_len) % BS):
            raise Incorrect(f"{said}: new token i goes to position seq_len + i, not i")
        raise Incorrect(said)


@exercise("10.append_kv", "stretch: fix a paged KV append that misplaces tokens and leaks blocks")
def check_append_kv(candidate):
    refuse_reference(candidate, PagedSequenceCache, _PagedLayerView, KVBlockPool, PrefixCache)
    pool_k = torch.zeros(POOL_BLOCKS, BS, HEADS, HEAD_DIM)
    pool_v = torch.zeros_like(pool_k)
    allocator = BlockAllocator(POOL_BLOCKS, BS)
    order = [allocator.allocate() for _ in range(POOL_BLOCKS)]
    for block in (5, 2, 7, 0, 3, 6, 1, 4):        # a scattered free list, as after some traffic
        allocator.free(order[block])
    table: list[int] = []
    _append_case(candidate, pool_k, pool_v, allocator, table, 0, 6, "prefill of 6 tokens")
    _append_case(candidate, pool_k, pool_v, allocator, table, 6, 1, "decode into the partly filled block")
    _append_case(candidate, pool_k, pool_v, allocator, table, 7, 3, "3 tokens across a block boundary")
    _append_case(candidate, pool_k, pool_v, allocator, table, 10, 0, "an empty append")
    hogs = [allocator.allocate() for _ in range(allocator.num_free - 1)]   # leave one free block
    free_before, table_before = allocator.num_free, list(table)
    case = (f"a pool with {_blocks(free_before)} free (table {table_before}, seq_len 10: 9 new tokens "
            f"need {_blocks(blocks_needed(19, BS) - len(table_before))} more)")
    k = torch.stack([_token_kv(p)[0] for p in range(10, 19)])
    v = torch.stack([_token_kv(p)[1] for p in range(10, 19)])
    try:
        candidate(pool_k, pool_v, allocator, table, 10, k, v)
    except NotImplementedError:
        raise
    except RuntimeError:
        if allocator.num_free != free_before or table != table_before:
            raise Incorrect(f"{case}: raised, but left {_blocks(free_before - allocator.num_free)} taken "
                            f"and the table at {table}: those blocks are lost (a leak) for every later "
                            "request. Check that enough blocks are free before taking any") from None
    except Exception as exc:  # noqa: BLE001 - a learner's error is a hint
        raise Incorrect(f"{case}: raised {type(exc).__name__}: {exc}; raise RuntimeError "
                        "(the allocator's own error is one) and take nothing") from None
    else:
        raise Incorrect(f"{case}: returned without raising; raise RuntimeError when the pool cannot "
                        "hold the new tokens")
    for block in hogs:
        allocator.free(block)
    return ("positions land in table[pos // block_size], slot pos % block_size; blocks taken only "
            "as needed (ceil), and a refused append takes nothing")
