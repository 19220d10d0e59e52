"""Checkers for notebook 17 (prefill/decode disaggregation): the KV bytes a prefill worker sends, the
packing and unpacking of a request's KV blocks run on two real ranks, and a block transfer that sends
blocks in the wrong order and forgets the partial last block."""

from __future__ import annotations

import functools

import torch

from ..caching.paged_kv import KVBlockPool, blocks_needed
from ..disaggregation import DecodeWorker, PrefillWorker, pack_kv, unpack_kv
from ..disaggregation.ranks import recv_bytes, send_bytes, serve_on_ranks
from ..engine import execute_model
from ..model import generate, load_tiny_lm
from ..model.generate import sample_next_token
from ..model.kv_cache import kv_cache_bytes_per_token
from .check import (HIDDEN_ONLY, Incorrect, exercise, judge_prediction, labelled_cases, raise_if_stub,
                    refuse_reference, run_ranks, with_hidden)
from ..parallel.pipeline.p2p import recv_tensor, send_tensor, wait_all

LIBRARY = (pack_kv, unpack_kv, PrefillWorker, DecodeWorker, serve_on_ranks, send_bytes, recv_bytes)


@functools.lru_cache(maxsize=1)
def _model():
    return load_tiny_lm()[0]


# -- predict: the KV bytes of one transfer ---------------------------------------------------------
PROMPT_TOKENS, ANSWER_TOKENS, BLOCK_SIZE = 150, 50, 16


@functools.lru_cache(maxsize=1)
def measured_transfer_bytes() -> int:
    """Prefill a 150-token prompt on a real prefill worker; the bytes of KV its transfer carries."""
    prompt = [(13 * i + 5) % 250 + 1 for i in range(PROMPT_TOKENS)]
    return PrefillWorker(_model(), block_size=BLOCK_SIZE).prefill("r", prompt, ANSWER_TOKENS).nbytes


def _bytes_mistakes() -> list[tuple[float, str]]:
    c = _model().config
    per_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim * 4
    blocks = blocks_needed(PROMPT_TOKENS, BLOCK_SIZE) * BLOCK_SIZE
    return [
        (per_token * PROMPT_TOKENS / 2,
         "That is half: either only the keys (the values travel too: the factor 2) or 2 bytes per element "
         "(the tiny LM keeps its KV in float32, 4 bytes)"),
        (per_token * PROMPT_TOKENS * c.n_heads / c.n_kv_heads,
         f"That counts {c.n_heads} heads: the KV cache has one key and one value per *KV* head "
         f"(n_kv_heads={c.n_kv_heads}, grouped-query attention), not per query head, and dim = "
         "n_heads x head_dim counts query heads too"),
        (per_token * blocks,
         f"That sends whole blocks ({blocks} slots for {PROMPT_TOKENS} tokens): only the filled slots of the "
         "last, partial block travel"),
        (per_token * (PROMPT_TOKENS + 1),
         "That counts the first generated token: the prefill computes KV for the prompt tokens only; the "
         "first token's KV is computed by the decode worker when it feeds it back in"),
        (per_token * (PROMPT_TOKENS + ANSWER_TOKENS),
         "That counts the answer's tokens: their KV is computed on the decode worker and never crosses "
         "the link; only the prompt's does"),
        (per_token * PROMPT_TOKENS / 4,
         f"That is a quarter: either the number of elements (multiply by 4 bytes per float32) or one "
         f"layer (all {c.n_layers} layers' keys and values travel)"),
        (per_token * PROMPT_TOKENS * 8,
         "That is in bits: the question asks for bytes"),
        (per_token * PROMPT_TOKENS / c.n_layers / 2 / 4 * 2,
         "Every layer has its own keys and values: multiply by the layer count"),
    ]


@exercise("17.kv_bytes", "predict: the KV bytes a prefill worker sends for one prompt")
def check_kv_bytes(candidate):
    refuse_reference(candidate, measured_transfer_bytes, kv_cache_bytes_per_token, PrefillWorker, pack_kv)
    guess = candidate()
    judge_prediction(guess, measured_transfer_bytes(), _bytes_mistakes(), "bytes",
                     "Count 2 (keys and values) x layers x KV heads x head_dim x 4 bytes for each prompt token.",
                     tolerance=0)
    return "exactly the bytes of KV a real prefill worker sent for the 150-token prompt"


# -- shared by the build and stretch checks: pools with contents that identify every slot ----------
def _pool(num_blocks=10, block_size=4, n_layers=2, n_kv=2, head_dim=3, fill=None) -> KVBlockPool:
    pool = KVBlockPool(num_blocks, block_size, n_layers, n_kv, head_dim)
    for layer in range(n_layers):
        if fill is None:
            # Slot (block b, offset o) of layer l holds keys 1000 l + 10 b + o/10 and values of the opposite
            # sign, so any value read back names where it came from.
            code = (1000 * layer + 10 * torch.arange(num_blocks)[:, None] + torch.arange(block_size)[None] / 10)
            pool.k[layer].copy_(code[:, :, None, None].expand_as(pool.k[layer]))
            pool.v[layer].copy_(-code[:, :, None, None].expand_as(pool.v[layer]))
        else:
            pool.k[layer].fill_(fill)
            pool.v[layer].fill_(fill)
    return pool


def _name_slot(value: float) -> str:
    if value != value:
        return "nothing (never written)"
    sign = "value" if value < 0 else "key"
    layer, rest = divmod(round(abs(value) * 10), 10000)
    block, offset = divmod(rest, 100)
    return f"the {sign} of layer {layer}, block {block}, slot {offset}"


# -- build: pack and unpack a request's blocks ----------------------------------------------------
PACK_CASES = [   # (what, block table, tokens)
    ("a scattered table and a partial last block", [7, 2, 5], 10),
    ("two full blocks", [3, 8], 8),
    ("one token", [6], 1),
]
PACK_HIDDEN = [  # grading only
    ("a table longer than the tokens need", [4, 1, 8], 5),
    ("blocks in descending order, three slots of the last filled", [8, 5, 1], 11),
]


def _reference_payload(pool, table, num_tokens):
    return pack_kv(pool, table, num_tokens)


def _pack_variants(pool, table, num_tokens) -> dict:
    bs = pool.block_size
    need = blocks_needed(num_tokens, bs)

    def gather(blocks, n):
        k = torch.stack([pool.k[l][torch.tensor(blocks)].flatten(0, 1)[:n] for l in range(len(pool.k))])
        v = torch.stack([pool.v[l][torch.tensor(blocks)].flatten(0, 1)[:n] for l in range(len(pool.k))])
        return k, v

    k, v = gather(table[:need], num_tokens)
    variants = {
        "sorted": torch.stack(gather(sorted(table[:need]), num_tokens)),
        "full_only": torch.stack(gather(table[:num_tokens // bs], num_tokens // bs * bs)) if num_tokens // bs else None,
        "whole_last": torch.stack(gather(table[:need], need * bs)),
        "swapped": torch.stack([v, k]),
        "layer_first": torch.stack([k, v]).transpose(0, 1),
        "heads_tokens": torch.stack([k, v]).transpose(2, 3),
    }
    return {m: t for m, t in variants.items() if t is not None}


PACK_MISTAKES = {
    "sorted": "the blocks are read in the order of their ids, not the block table's: token i lives in block "
              "table[i // block_size], and a table is rarely sorted (blocks come from a free list)",
    "full_only": "the partial last block is missing: its filled slots (num_tokens % block_size of them) hold "
                 "the prompt's last tokens and must travel too",
    "whole_last": "the whole last block is sent, padding included: only its filled slots travel, so the payload "
                  "has num_tokens tokens and its bytes match 2 x layers x kv_heads x head_dim x bytes x tokens",
    "swapped": "keys and values are swapped: payload[0] holds the keys, payload[1] the values",
    "layer_first": "the layout is (layers, 2, ...): the payload is (2, layers, tokens, kv_heads, head_dim), keys "
                   "and values first",
    "heads_tokens": "tokens and KV heads are transposed: the payload is (2, layers, tokens, kv_heads, head_dim), "
                    "as a pool block stores them (slot, kv_head, head_dim)",
}


def _judge_pack(codec, what, table, num_tokens, label: str = "") -> torch.Tensor:
    pool = _pool()
    story = f"{label}pack with block_table={table}, num_tokens={num_tokens} ({what}), blocks of {pool.block_size}"
    got = codec.pack([k.clone() for k in pool.k], [v.clone() for v in pool.v], list(table), num_tokens)
    expected = _reference_payload(pool, table, num_tokens)
    if not isinstance(got, torch.Tensor):
        raise Incorrect(f"{story}: returned {type(got).__name__}; return one tensor "
                        "(2, layers, tokens, kv_heads, head_dim)")
    if tuple(got.shape) == tuple(expected.shape) and torch.equal(got, expected):
        return expected
    for mistake, variant in _pack_variants(pool, table, num_tokens).items():
        if tuple(got.shape) == tuple(variant.shape) and torch.equal(got, variant):
            raise Incorrect(f"{story}: {PACK_MISTAKES[mistake]}")
    if tuple(got.shape) != tuple(expected.shape):
        raise Incorrect(f"{story}: returned shape {tuple(got.shape)}, expected {tuple(expected.shape)} "
                        "= (2, layers, num_tokens, kv_heads, head_dim)")
    bad = (got != expected).nonzero()[0].tolist()
    raise Incorrect(f"{story}: payload{bad} is {_name_slot(float(got[tuple(bad)]))}, expected "
                    f"{_name_slot(float(expected[tuple(bad)]))}")


UNPACK_MISTAKES = {
    "sorted": "the tokens were written into the blocks in the order of their ids, not the block table's: "
              "token i goes to block table[i // block_size], slot i % block_size",
    "full_only": "the partial last block was not written: the last num_tokens % block_size tokens are lost",
    "swapped": "keys went into the value pool and values into the key pool",
}


def _same_pools(a: KVBlockPool, b: KVBlockPool) -> bool:
    """Equal contents, slots never written (NaN) included."""
    return all(torch.equal(x.nan_to_num(7.5), y.nan_to_num(7.5)) for x, y in zip(a.k + a.v, b.k + b.v))


def _judge_unpack(codec, what, table, num_tokens, label: str = "") -> None:
    sender = _pool()
    payload = _reference_payload(sender, [9, 0, 4][:blocks_needed(num_tokens, 4)], num_tokens)
    pool = _pool(fill=float("nan"))
    story = f"{label}unpack of {num_tokens} tokens into block_table={table} ({what}), blocks of {pool.block_size}"
    codec.unpack(payload.clone(), pool.k, pool.v, list(table))
    expected = _pool(fill=float("nan"))
    unpack_kv(payload, expected, table)
    if _same_pools(pool, expected):
        return
    for mistake in UNPACK_MISTAKES:
        variant = _pool(fill=float("nan"))
        need = blocks_needed(num_tokens, 4)
        if mistake == "sorted":
            unpack_kv(payload, variant, sorted(table[:need]))
        elif mistake == "full_only":
            full = num_tokens // 4 * 4
            if not full or full == num_tokens:
                continue
            unpack_kv(payload[:, :, :full], variant, table)
        else:
            unpack_kv(torch.stack([payload[1], payload[0]]), variant, table)
        if _same_pools(pool, variant):
            raise Incorrect(f"{story}: {UNPACK_MISTAKES[mistake]}")
    for layer in range(len(pool.k)):
        for name, got_t, exp_t in (("key", pool.k[layer], expected.k[layer]),
                                   ("value", pool.v[layer], expected.v[layer])):
            diff = (got_t.nan_to_num(7.5) != exp_t.nan_to_num(7.5)).nonzero()
            if len(diff):
                b, o = diff[0][:2].tolist()
                raise Incorrect(f"{story}: the {name} pool of layer {layer}, block {b}, slot {o} holds "
                                f"{_name_slot(float(got_t[b, o, 0, 0]))}, expected "
                                f"{_name_slot(float(exp_t[b, o, 0, 0]))} (blocks outside the table must stay "
                                "untouched)")


def _codec_on_ranks(codec, prompt_len: int, decode_steps: int):
    """Rank 0 prefills a prompt on the real model and packs it with the learner's codec; rank 1 unpacks it
    into its own scattered blocks and decodes. Returns rank 1's tokens."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    model = _model()
    cfg = model.config
    prompt = [(29 * i + 3) % 250 + 1 for i in range(prompt_len)]
    need = blocks_needed(prompt_len + decode_steps, 16)
    pool = KVBlockPool(need + 6, 16, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
    if dist.get_rank() == 0:
        table = list(range(need + 5, 5, -1))[:blocks_needed(prompt_len, 16)]     # scattered, descending
        logits = execute_model(model, pool, prompt, [(table, 0, prompt_len)])
        payload = codec.pack(pool.k, pool.v, table, prompt_len)
        pending = [send_tensor(payload, 1), send_tensor(sample_next_token(logits), 1)]
        wait_all(pending)
        return None
    table = ([b for b in range(need + 6) if b % 2] + [b for b in range(need + 6) if not b % 2])[:need]
    payload, first = recv_tensor(0), recv_tensor(0)
    codec.unpack(payload, pool.k, pool.v, table[:blocks_needed(prompt_len, 16)])
    tokens, length = [int(first[0])], prompt_len
    for _ in range(decode_steps):
        logits = execute_model(model, pool, [tokens[-1]], [(table, length, 1)])
        tokens.append(int(sample_next_token(logits)[0]))
        length += 1
    return tokens


@exercise("17.pack_unpack", "build: pack a request's KV blocks for the transfer and unpack them on the decode rank")
def check_pack_unpack(candidate, hidden=False):
    refuse_reference(candidate, *LIBRARY)
    codec = candidate() if isinstance(candidate, type) else candidate
    for name in ("pack", "unpack"):
        if not callable(getattr(codec, name, None)):
            raise Incorrect(f"{type(codec).__name__} has no method {name}(...): write both pack and unpack")
    for label, (what, table, n) in labelled_cases(PACK_CASES, PACK_HIDDEN, hidden):
        _judge_pack(codec, what, table, n, label)
    for label, (what, table, n) in labelled_cases(PACK_CASES, PACK_HIDDEN, hidden):
        _judge_unpack(codec, what, table, n, label)
    for prompt_len in (37, 48) if hidden != HIDDEN_ONLY else ():
        case = f"on two ranks: a {prompt_len}-token prompt prefilled on rank 0, decoded on rank 1"
        tokens = run_ranks(_codec_on_ranks, 2, codec, prompt_len, 5, what=case)[1]
        prompt = [(29 * i + 3) % 250 + 1 for i in range(prompt_len)]
        expected = generate(_model(), torch.tensor([prompt]), 6)[0, prompt_len:].tolist()
        if tokens != expected:
            raise Incorrect(f"{case}: rank 1 decoded {tokens}, generate() on one process gives {expected}")
    return with_hidden("the payload is exactly the prompt's KV in table order; the decode rank continued the "
                       "real model's generation token for token", PACK_HIDDEN, hidden)


# -- stretch: a block transfer that sends blocks in the wrong order and drops the partial block ----
TRANSFER_CASES = [   # (what, sender table, receiver table, tokens); blocks of 4
    ("a scattered table and a partial last block", [5, 1, 3], [2, 7, 4], 10),
    ("an ordered table and a partial last block", [0, 1, 2], [6, 8, 9], 9),
    ("whole blocks, the receiver's table one block longer", [6, 0], [1, 3, 5], 8),
    ("fewer tokens than one block", [4], [6], 3),
]


def _transfer_on_ranks(transfer, sender_table, receiver_table, num_tokens):
    import torch.distributed as dist

    torch.set_num_threads(1)
    if dist.get_rank() == 0:
        pool = _pool()
        transfer.send(pool.k, pool.v, list(sender_table), num_tokens, 1)
        return None
    pool = _pool(fill=float("nan"))
    transfer.recv(pool.k, pool.v, list(receiver_table), num_tokens, 0)
    return [t.clone() for t in pool.k + pool.v]


def _tokens_landed(tensors, receiver_table, num_tokens) -> list:
    """What each of the receiver's tokens holds in layer 0's key pool: (layer, block, slot) of the sender
    slot it came from (by the code every slot carries), or None if it was never written."""
    out = []
    for t in range(num_tokens):
        value = float(tensors[0][receiver_table[t // 4], t % 4, 0, 0])
        if value != value:
            out.append(None)
        else:
            layer, rest = divmod(round(abs(value) * 10), 10000)
            out.append((layer, rest // 100, rest % 100))
    return out


_ORDERS = {"table": lambda blocks: list(blocks), "sorted": sorted, "reversed": lambda blocks: list(reversed(blocks))}


def _landed_if(sender_table, receiver_table, num_tokens, sender_order: str, receiver_order: str,
               count: str) -> list:
    """The tokens' sources if the sides walk their tables in these orders and move ``count`` blocks."""
    need = blocks_needed(num_tokens, 4)
    n = need if count == "ceil" else num_tokens // 4
    sent = _ORDERS[sender_order](sender_table[:need])[:n]
    written = dict(zip(_ORDERS[receiver_order](receiver_table[:need])[:n], sent))
    out = []
    for t in range(num_tokens):
        source = written.get(receiver_table[t // 4])
        out.append(None if source is None else (0, source, t % 4))
    return out


TRANSFER_HINTS = {
    "sorted": "the blocks are walked in the order of their ids (sorted), not the block table's: token i lives "
              "in the sender's block block_table[i // block_size] and must land in the receiver's block "
              "block_table[i // block_size]; walk both tables in table order",
    "reversed": "the blocks are walked back to front: walk the block tables front to back, in token order",
    "floor": "the partial last block never travels: num_tokens // block_size counts only full blocks; the last "
             "num_tokens % block_size tokens (the prompt's end) must travel too: ceil(num_tokens / block_size) "
             "blocks",
    "swapped": "keys and values are swapped on the way: the first tensor of each pair is the keys",
    "layers": "the tokens arrived with another layer's keys: send and recv must walk blocks and layers in the "
              "same nesting, so that every receive gets the tensor its send meant for it",
}


def _diagnose(tensors, sender_table, receiver_table, num_tokens) -> str | None:
    landed = _tokens_landed(tensors, receiver_table, num_tokens)
    expected = _landed_if(sender_table, receiver_table, num_tokens, "table", "table", "ceil")
    key0 = float(tensors[0][receiver_table[0], 0, 0, 0])
    if key0 == key0 and key0 < 0:
        return TRANSFER_HINTS["swapped"]
    if any(x is not None and x[0] != 0 for x in landed):
        return TRANSFER_HINTS["layers"]
    if landed == expected:
        half = len(tensors) // 2
        for t in range(num_tokens):
            b, o = receiver_table[t // 4], t % 4
            for layer in range(half):
                if not float(tensors[half + layer][b, o, 0, 0]) == -float(tensors[layer][b, o, 0, 0]):
                    return (f"token {t}: the keys of layer {layer} arrived but not the matching values: send and "
                            "receive keys and values of every layer, in the same order")
        return None
    for sender in _ORDERS:
        for receiver in _ORDERS:
            for count in ("ceil", "floor"):
                if landed != _landed_if(sender_table, receiver_table, num_tokens, sender, receiver, count):
                    continue
                # One side out of table order looks the same whichever side it is.
                orders = [o for o in (sender, receiver) if o != "table"]
                where = "on both sides" if len(orders) == 2 else "on one side (the sender or the receiver)"
                hints = [f"{TRANSFER_HINTS[o]} ({where})" for o in dict.fromkeys(orders)]
                if count == "floor":
                    hints.append(TRANSFER_HINTS["floor"])
                if hints:
                    return "; and ".join(hints)
    first = next(t for t in range(num_tokens) if landed[t] != expected[t])
    got = "nothing" if landed[first] is None else f"the sender's block {landed[first][1]}, slot {landed[first][2]}"
    return (f"token {first} should hold the sender's block {expected[first][1]}, slot {expected[first][2]}, "
            f"but holds {got}")


@exercise("17.fix_transfer", "stretch: fix a KV block transfer that reorders blocks and drops the partial block")
def check_fix_transfer(candidate):
    refuse_reference(candidate, *LIBRARY)
    transfer = candidate() if isinstance(candidate, type) else candidate
    for name in ("send", "recv"):
        method = getattr(transfer, name, None)
        if not callable(method):
            raise Incorrect(f"{type(transfer).__name__} has no method {name}(...): keep send and recv")
        raise_if_stub(getattr(method, "__func__", method))
    for what, sender_table, receiver_table, n in TRANSFER_CASES:
        story = (f"{what}: sender block_table={sender_table}, receiver block_table={receiver_table}, "
                 f"num_tokens={n}, blocks of 4")
        try:
            # A few tiny messages: a rank still waiting after 4 s waits for a message that never comes.
            tensors = run_ranks(_transfer_on_ranks, 2, transfer, sender_table, receiver_table, n, what=story,
                                timeout=4)[1]
        except Incorrect as wrong:
            text = str(wrong)
            if "deadlock" in text or "did not finish" in text:
                text += (" Likely cause: sender and receiver disagree on how many messages travel (each send "
                         "needs its receive): count ceil(num_tokens / block_size) blocks on both sides")
            elif "IndexError" in text:
                text += (" Likely cause: a walk past the end of the block table: a request of num_tokens "
                         "tokens has ceil(num_tokens / block_size) blocks, no more")
            raise Incorrect(text) from None
        why = _diagnose(tensors, sender_table, receiver_table, n)
        if why:
            raise Incorrect(f"{story}: {why}")
        need = blocks_needed(n, 4)
        untouched = [b for b in range(10) if b not in receiver_table[:need]]
        if any(not torch.isnan(t[b]).all() for t in tensors for b in untouched):
            raise Incorrect(f"{story}: a block outside the receiver's table was written: write only into the "
                            "blocks of its block table")
    return ("every token's keys and values land in the receiver's block for its position, partial last block "
            "included, in table order, on two real ranks")
