"""One forward pass over a step's batch: sequences of different lengths packed into one row.

A step mixes a decode token of one request with a prefill chunk of another. Padding them to a
rectangle would waste compute on pad tokens, so the engine *packs* them, as vLLM does: the
step's new tokens of every request go one after another into a single row of T tokens, and
attention is told, through a mask, which keys each token may see (its own request's tokens
up to itself).

Keys and values live in the paged pool (``caching.paged_kv.KVBlockPool``). For each layer the
batch (:class:`PagedBatch`) writes the new tokens' keys and values into their slots (the
*slot mapping*: block x block_size + offset, read from each request's block table), then gathers
every request's keys and values through its block table, so attention reads exactly what a
contiguous cache would hold. The model itself is unchanged: it calls ``cache[layer].update(k, v)``
as it does with any cache, and asks the cache for the positions and mask of a packed row.
"""

from __future__ import annotations

import torch

from ..caching.paged_kv import KVBlockPool


class PagedBatch:
    """Attention metadata of one step, with the cache interface the tiny LM calls.

    ``seqs`` holds, per request in batch order, ``(block_table, num_computed, num_new)``: the
    request's blocks, the tokens already in them, and the tokens this step computes.
    """

    def __init__(self, pool: KVBlockPool, seqs: list[tuple[list[int], int, int]]) -> None:
        self.pool = pool
        bs = pool.block_size
        positions, slots, key_slots, key_seq, key_pos, query_seq, last = [], [], [], [], [], [], []
        end = 0                                                  # new tokens packed so far
        for s, (table, num_computed, num_new) in enumerate(seqs):
            table_t = torch.tensor(table, dtype=torch.long)
            total = num_computed + num_new
            pos = torch.arange(total)
            seq_slots = table_t[pos // bs] * bs + pos % bs       # the slot of every token of the request
            positions.append(pos[num_computed:])
            slots.append(seq_slots[num_computed:])
            key_slots.append(seq_slots)
            key_seq.append(torch.full((total,), s))
            key_pos.append(pos)
            query_seq.append(torch.full((num_new,), s))
            end += num_new
            last.append(end - 1)
        self.positions = torch.cat(positions)                 # (T,) position of each new token
        self.slot_mapping = torch.cat(slots)                  # (T,) where each new token's K/V go
        self.key_slots = torch.cat(key_slots)                 # (K,) every key this step reads
        q_seq, q_pos = torch.cat(query_seq), self.positions
        k_seq, k_pos = torch.cat(key_seq), torch.cat(key_pos)
        # A token attends the keys of its own request at positions up to its own.
        self.attn_mask = ((q_seq[:, None] == k_seq[None, :]) & (k_pos[None, :] <= q_pos[:, None]))[None, None]
        self.last_token_index = torch.tensor(last, dtype=torch.long)   # each request's last new token
        self.num_layers = len(pool.k)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())

    def packed_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positions (1, T), attention mask (1, 1, T, K))`` for the model's layers."""
        return self.positions[None], self.attn_mask

    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, layer: int) -> "_PagedBatchLayer":
        return _PagedBatchLayer(self, layer)

    def write_and_gather(self, layer: int, k: torch.Tensor, v: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys and values (1, n_kv, T, d); return every key and value read (1, n_kv, K, d)."""
        pool_k = self.pool.k[layer].view(-1, *self.pool.k[layer].shape[2:])   # (slots, n_kv, d)
        pool_v = self.pool.v[layer].view(-1, *self.pool.v[layer].shape[2:])
        pool_k[self.slot_mapping] = k[0].transpose(0, 1).to(pool_k.dtype)
        pool_v[self.slot_mapping] = v[0].transpose(0, 1).to(pool_v.dtype)
        keys = pool_k[self.key_slots].transpose(0, 1)[None]
        values = pool_v[self.key_slots].transpose(0, 1)[None]
        return keys.to(k.dtype), values.to(v.dtype)


class _PagedBatchLayer:
    def __init__(self, batch: PagedBatch, layer: int) -> None:
        self.batch, self.layer = batch, layer

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch.write_and_gather(self.layer, k, v)


@torch.no_grad()
def execute_model(model, pool: KVBlockPool, input_ids: list[int],
                  seqs: list[tuple[list[int], int, int]]) -> torch.Tensor:
    """Run one packed step; return the logits (num requests, vocab) at each request's last new token."""
    batch = PagedBatch(pool, seqs)
    logits = model(torch.tensor([input_ids], dtype=torch.long), cache=batch)
    return logits[0, batch.last_token_index]
