"""Lesson 17's exercises: the solution passes, a stub is not attempted, the library is refused, and
each plausible wrong answer earns the hint about its own mistake."""

import pytest
import torch
import torch.distributed as dist

from exercise_catalogue import (assert_correct, assert_hidden_hint, assert_hint, assert_not_attempted,
                                assert_refused, solution_function)

pytestmark = pytest.mark.lesson17


def stub(*args):
    raise NotImplementedError()


# -- 17.kv_bytes (predict) ----------------------------------------------------------------------
def predicted_with_library():
    from lessons_lib.model.kv_cache import kv_cache_bytes_per_token
    from lessons_lib.model import load_tiny_lm
    return kv_cache_bytes_per_token(load_tiny_lm()[0].config) * 150


@pytest.mark.parametrize("guess, fragments", [
    (153_600, ["that is half", "the factor 2", "4 bytes"]),
    (614_400, ["counts 4 heads", "n_kv_heads=2"]),
    (327_680, ["whole blocks (160 slots for 150 tokens)", "partial"]),
    (309_248, ["first generated token", "prompt tokens only"]),
    (409_600, ["answer's tokens", "never crosses"]),
    (76_800, ["a quarter", "all 4 layers"]),
    (2_457_600, ["in bits"]),
    (250_000, ["too low", "the measurement is 307,200 bytes", "2 (keys and values)"]),
])
def test_kv_bytes_wrong_predictions(guess, fragments):
    assert_hint("17.kv_bytes", lambda: guess, f"you predicted {guess:,} bytes", *fragments)


def test_kv_bytes_verdicts():
    assert_correct("17.kv_bytes", solution_function("17_disaggregation", "predicted_transfer_bytes"))
    assert_hint("17.kv_bytes", lambda: "307200", "as a number")
    assert_not_attempted("17.kv_bytes", stub)
    assert_refused("17.kv_bytes", predicted_with_library, "kv_cache_bytes_per_token")


# -- 17.pack_unpack (build) -----------------------------------------------------------------------
class Codec:
    """The right answer, with hooks a wrong answer overrides."""

    def blocks(self, block_table, num_tokens, block_size):
        return block_table[:-(-num_tokens // block_size)]

    def tokens(self, num_tokens, block_size):
        return num_tokens

    def pack(self, k_pool, v_pool, block_table, num_tokens):
        bs = k_pool[0].shape[1]
        blocks = torch.tensor(self.blocks(block_table, num_tokens, bs))
        n = self.tokens(num_tokens, bs)
        keys = torch.stack([k[blocks].flatten(0, 1)[:n] for k in k_pool])
        values = torch.stack([v[blocks].flatten(0, 1)[:n] for v in v_pool])
        return self.arrange(keys, values)

    def arrange(self, keys, values):
        return torch.stack([keys, values])

    def unpack(self, payload, k_pool, v_pool, block_table):
        bs, n = k_pool[0].shape[1], payload.shape[2]
        pos = torch.arange(n)
        table = self.unpack_table(block_table, n, bs)
        blocks, slots = torch.tensor(table)[pos // bs], pos % bs
        keep = self.keep(n, bs)
        for layer in range(len(k_pool)):
            k_pool[layer][blocks[:keep], slots[:keep]] = payload[0, layer, :keep]
            v_pool[layer][blocks[:keep], slots[:keep]] = payload[1, layer, :keep]

    def unpack_table(self, block_table, n, bs):
        return block_table

    def keep(self, n, bs):
        return n


class PacksTheWholeTable(Codec):
    """Takes the table's last block to hold the remainder: true when the table has exactly the blocks
    the tokens need, as in every public case, not when it holds more."""

    def pack(self, k_pool, v_pool, block_table, num_tokens):
        last = num_tokens - (len(block_table) - 1) * k_pool[0].shape[1]

        def gather(pool):
            return torch.stack([torch.cat([layer[b] for b in block_table[:-1]] + [layer[block_table[-1]][:last]])
                                for layer in pool])
        return torch.stack([gather(k_pool), gather(v_pool)])


def test_pack_unpack_hidden_case_gives_a_table_longer_than_needed():
    assert_hidden_hint("17.pack_unpack", PacksTheWholeTable, "a table longer than the tokens need",
                       "block_table=[4, 1, 8], num_tokens=5", "expected (2, 2, 5, 2, 3)")


class PacksSorted(Codec):
    def blocks(self, block_table, num_tokens, block_size):
        return sorted(super().blocks(block_table, num_tokens, block_size))


class PacksFullBlocksOnly(Codec):
    def blocks(self, block_table, num_tokens, block_size):
        return block_table[:num_tokens // block_size] or block_table[:1]

    def tokens(self, num_tokens, block_size):
        return num_tokens // block_size * block_size


class PacksWholeLastBlock(Codec):
    def tokens(self, num_tokens, block_size):
        return -(-num_tokens // block_size) * block_size


class PacksValuesFirst(Codec):
    def arrange(self, keys, values):
        return torch.stack([values, keys])


class PacksLayersFirst(Codec):
    def arrange(self, keys, values):
        return torch.stack([keys, values], dim=1)


class PacksHeadsBeforeTokens(Codec):
    def arrange(self, keys, values):
        return torch.stack([keys, values]).transpose(2, 3)


class UnpacksSorted(Codec):
    def unpack_table(self, block_table, n, bs):
        return sorted(block_table[:-(-n // bs)])


class UnpacksFullBlocksOnly(Codec):
    def keep(self, n, bs):
        return n // bs * bs


class PacksAList(Codec):
    def pack(self, k_pool, v_pool, block_table, num_tokens):
        return super().pack(k_pool, v_pool, block_table, num_tokens).tolist()


class NoUnpack:
    def pack(self, k_pool, v_pool, block_table, num_tokens):
        return Codec().pack(k_pool, v_pool, block_table, num_tokens)


class PacksWithLibrary(Codec):
    def pack(self, k_pool, v_pool, block_table, num_tokens):
        from lessons_lib.disaggregation import pack_kv
        return pack_kv


@pytest.mark.parametrize("answer, fragments", [
    (PacksSorted, ["block_table=[7, 2, 5], num_tokens=10", "order of their ids", "free list"]),
    (PacksFullBlocksOnly, ["a scattered table and a partial last block", "partial last block is missing"]),
    (PacksWholeLastBlock, ["padding included", "num_tokens tokens"]),
    (PacksValuesFirst, ["keys and values are swapped"]),
    (PacksLayersFirst, ["(layers, 2, ...)"]),
    (PacksHeadsBeforeTokens, ["tokens and kv heads are transposed"]),
    (UnpacksSorted, ["unpack of 10 tokens into block_table=[7, 2, 5]", "order of their ids"]),
    (UnpacksFullBlocksOnly, ["partial last block was not written"]),
    (PacksAList, ["returned list", "one tensor"]),
    (NoUnpack, ["no method unpack"]),
])
def test_pack_unpack_wrong_answers(answer, fragments):
    assert_hint("17.pack_unpack", answer, *fragments)


def test_pack_unpack_verdicts():
    assert_correct("17.pack_unpack", solution_function("17_disaggregation", "KVCodec"))
    assert_not_attempted("17.pack_unpack", solution_stub("KVCodec"))
    assert_refused("17.pack_unpack", PacksWithLibrary, "pack_kv")


def solution_stub(name):
    """The class as the exercise notebook gives it: every method a stub."""
    return type(name, (), {"pack": stub, "unpack": stub, "send": stub, "recv": stub})


# -- 17.fix_transfer (stretch) --------------------------------------------------------------------
class Transfer:
    """The right answer, with hooks a wrong answer overrides."""

    def walk(self, block_table, num_tokens, block_size, side):
        return block_table[:-(-num_tokens // block_size)]

    def send(self, k_pool, v_pool, block_table, num_tokens, dst):
        for block in self.walk(block_table, num_tokens, k_pool[0].shape[1], "send"):
            for layer in range(len(k_pool)):
                dist.send(k_pool[layer][block].contiguous(), dst)
                dist.send(v_pool[layer][block].contiguous(), dst)

    def recv(self, k_pool, v_pool, block_table, num_tokens, src):
        for block in self.walk(block_table, num_tokens, k_pool[0].shape[1], "recv"):
            for layer in range(len(k_pool)):
                first, second = self.pair(k_pool, v_pool)
                k = torch.empty_like(first[layer][block])
                dist.recv(k, src)
                first[layer][block] = k
                v = torch.empty_like(second[layer][block])
                dist.recv(v, src)
                second[layer][block] = v

    def pair(self, k_pool, v_pool):
        return k_pool, v_pool


class AsGiven(Transfer):
    def walk(self, block_table, num_tokens, block_size, side):
        return sorted(block_table)[:num_tokens // block_size]


class OrderFixedOnly(Transfer):
    def walk(self, block_table, num_tokens, block_size, side):
        return block_table[:num_tokens // block_size]


class CountFixedOnly(Transfer):
    def walk(self, block_table, num_tokens, block_size, side):
        return sorted(block_table)[:-(-num_tokens // block_size)]


class CountFixedOnSenderOnly(Transfer):
    def walk(self, block_table, num_tokens, block_size, side):
        n = -(-num_tokens // block_size) if side == "send" else num_tokens // block_size
        return block_table[:n]


class SendsReversed(Transfer):
    def walk(self, block_table, num_tokens, block_size, side):
        blocks = block_table[:-(-num_tokens // block_size)]
        return list(reversed(blocks)) if side == "send" else blocks


class SwapsKeysAndValues(Transfer):
    def pair(self, k_pool, v_pool):
        return v_pool, k_pool


class ReceivesSorted(Transfer):
    def walk(self, block_table, num_tokens, block_size, side):
        blocks = block_table[:-(-num_tokens // block_size)]
        return sorted(blocks) if side == "recv" else blocks


class LayersOutsideOnReceive(Transfer):
    def recv(self, k_pool, v_pool, block_table, num_tokens, src):
        blocks = self.walk(block_table, num_tokens, k_pool[0].shape[1], "recv")
        for layer in range(len(k_pool)):
            for block in blocks:
                for pool in (k_pool, v_pool):
                    t = torch.empty_like(pool[layer][block])
                    dist.recv(t, src)
                    pool[layer][block] = t


class UsesLibrary(Transfer):
    def send(self, k_pool, v_pool, block_table, num_tokens, dst):
        from lessons_lib.disaggregation.ranks import send_bytes
        return send_bytes


def test_fix_transfer_verdicts():
    assert_correct("17.fix_transfer", solution_function("17_disaggregation", "BlockTransfer"))
    assert_correct("17.fix_transfer", Transfer)
    assert_not_attempted("17.fix_transfer", solution_stub("BlockTransfer"))
    assert_refused("17.fix_transfer", UsesLibrary, "send_bytes")


@pytest.mark.parametrize("answer, fragments", [
    (AsGiven, ["a scattered table and a partial last block", "block_table=[5, 1, 3]", "(sorted)",
               "partial last block never travels"]),
    (OrderFixedOnly, ["a scattered table", "partial last block never travels", "ceil("]),
    (CountFixedOnly, ["a scattered table", "(sorted)", "table order", "on both sides"]),
    (SendsReversed, ["walked back to front", "on one side (the sender or the receiver)"]),
    (ReceivesSorted, ["receiver block_table=[2, 7, 4]", "(sorted)", "on one side"]),
    (SwapsKeysAndValues, ["keys and values are swapped"]),
    (LayersOutsideOnReceive, ["another layer's keys", "same nesting"]),
    # Last: a deadlock stops the warm ranks, and the next check starts fresh ones.
    (CountFixedOnSenderOnly, ["deadlock", "rank 0 waits in send", "disagree on how many messages"]),
])
def test_fix_transfer_wrong_answers(answer, fragments):
    assert_hint("17.fix_transfer", answer, *fragments)
