"""What a prefill worker hands a decode worker: one request's KV blocks, packed, sealed, checked.

The prefill worker computes the prompt's keys and values into blocks of its own pool and samples
the first token. The decode worker has its *own* pool, with other block ids, so the blocks cannot
be referred to: their contents travel. :func:`pack_kv` reads the blocks a request actually uses,
in block-table order, and keeps only the filled slots of the last, partial block, so the payload
is exactly

    2 (keys and values) x layers x KV heads x head_dim x bytes per element x tokens

(:func:`kv_transfer_bytes`); :func:`unpack_kv` writes them into the receiver's blocks.

A receiver must refuse what it cannot use, by name, before it touches its pool:

* :class:`KVLayoutMismatch`: the sender's layer count, KV head count, head_dim, block size or dtype
  differ from the receiver's pool (keys of another shape would be written into the wrong slots);
* :class:`ModelVersionMismatch`: the KV was computed by other weights (lesson 05's fingerprint
  differs): decoding on top of it would silently produce tokens neither model would;
* lesson 08's :class:`~lessons_lib.serving.security.SecurityError`: the sealed bytes were
  tampered with, replayed, or sealed under another key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..caching.paged_kv import KVBlockPool, blocks_needed
from ..serving.security import SecurityError, TensorOpener, TensorSealer
from ..validate import bad, check_int

__all__ = ["KVLayout", "KVLayoutMismatch", "KVTransfer", "ModelVersionMismatch", "TransferTimeout",
           "check_layout", "check_version", "kv_transfer_bytes", "open_transfer", "pack_kv",
           "seal_transfer", "unpack_kv"]


class KVLayoutMismatch(ValueError):
    """A KV transfer whose layout (layers, KV heads, head_dim, block size, dtype) the receiver's pool does not share."""


class ModelVersionMismatch(ValueError):
    """A KV transfer computed by a model version other than the receiver's."""


class TransferTimeout(TimeoutError):
    """A message of the transfer did not arrive (or was not taken) within its timeout."""


@dataclass(frozen=True)
class KVLayout:
    """The shape of a pool's KV memory: what both ends of a transfer must share."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str

    @classmethod
    def of(cls, pool: KVBlockPool) -> "KVLayout":
        _, block_size, n_kv, head_dim = pool.k[0].shape
        return cls(len(pool.k), n_kv, head_dim, block_size, str(pool.k[0].dtype).removeprefix("torch."))

    @property
    def bytes_per_token(self) -> int:
        element = torch.tensor([], dtype=getattr(torch, self.dtype)).element_size()
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * element


def kv_transfer_bytes(config, num_tokens: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of KV a transfer of ``num_tokens`` tokens carries: 2 x layers x kv_heads x head_dim x bytes x tokens."""
    check_int("num_tokens", num_tokens, low=0)
    if not isinstance(dtype, torch.dtype):
        raise bad("dtype", dtype, "a torch.dtype, e.g. torch.float32")
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * element * num_tokens


def _check_table(pool: KVBlockPool, block_table, num_tokens: int) -> list[int]:
    table = [check_int("block_table", b, low=0, high=pool.allocator.num_blocks - 1,
                       why=f"block ids of this pool of {pool.allocator.num_blocks}") for b in block_table]
    need = blocks_needed(num_tokens, pool.block_size)
    if len(table) < need:
        raise bad("block_table", block_table, f"at least {need} blocks for {num_tokens} tokens",
                  f"blocks of {pool.block_size} tokens")
    return table[:need]


def pack_kv(pool: KVBlockPool, block_table, num_tokens: int) -> torch.Tensor:
    """One request's keys and values, (2, layers, num_tokens, kv_heads, head_dim), read in block-table order.

    Only the blocks the tokens use are read, and of the last one only its filled slots: the
    payload holds every token once and nothing else.
    """
    check_int("num_tokens", num_tokens, low=1, why="a prefilled request has at least one token")
    table = torch.tensor(_check_table(pool, block_table, num_tokens), dtype=torch.long)
    keys = torch.stack([k[table].flatten(0, 1)[:num_tokens] for k in pool.k])     # (L, T, kv, d)
    values = torch.stack([v[table].flatten(0, 1)[:num_tokens] for v in pool.v])
    return torch.stack([keys, values])


def unpack_kv(payload: torch.Tensor, pool: KVBlockPool, block_table) -> None:
    """Write a packed payload into ``pool`` through ``block_table`` (the receiver's own blocks)."""
    check_layout(KVLayout(payload.shape[1], payload.shape[3], payload.shape[4], pool.block_size,
                          str(payload.dtype).removeprefix("torch.")), pool)
    num_tokens = payload.shape[2]
    table = torch.tensor(_check_table(pool, block_table, num_tokens), dtype=torch.long)
    pos = torch.arange(num_tokens)
    blocks, offsets = table[pos // pool.block_size], pos % pool.block_size
    for layer in range(len(pool.k)):
        pool.k[layer][blocks, offsets] = payload[0, layer]
        pool.v[layer][blocks, offsets] = payload[1, layer]


def check_layout(sent: KVLayout, pool: KVBlockPool) -> None:
    """Raise :class:`KVLayoutMismatch` naming every field where ``sent`` differs from ``pool``'s layout."""
    mine = KVLayout.of(pool)
    differ = [f"{name}: sent {getattr(sent, name)}, this pool has {getattr(mine, name)}"
              for name in ("n_layers", "n_kv_heads", "head_dim", "block_size", "dtype")
              if getattr(sent, name) != getattr(mine, name)]
    if differ:
        raise KVLayoutMismatch("the KV transfer does not fit this decode worker's pool (" + "; ".join(differ)
                               + "): prefill and decode must serve the same model with the same KV layout")


def check_version(sent: str, mine: str) -> None:
    """Raise :class:`ModelVersionMismatch` unless the two model fingerprints (lesson 05) are equal."""
    if sent != mine:
        raise ModelVersionMismatch(f"the KV was computed by model version {sent[:12]}, this decode worker "
                                   f"serves {mine[:12]}: route the request to a worker of the same version")


@dataclass
class KVTransfer:
    """One prefilled request on its way from the prefill worker to a decode worker.

    ``prompt_token_ids`` are the tokens whose keys and values ``payload`` holds (for a request
    resumed after a failure, prompt and the tokens delivered before it), ``first_token`` the token
    the prefill sampled, ``max_tokens`` the tokens the decode side may still produce, counting
    ``first_token``.
    """

    request_id: str
    prompt_token_ids: list[int]
    first_token: int
    max_tokens: int
    layout: KVLayout
    fingerprint: str
    payload: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def nbytes(self) -> int:
        """The KV bytes this transfer carries (the payload alone)."""
        return self.payload.numel() * self.payload.element_size()

    def meta(self) -> dict:
        return {"request_id": self.request_id, "prompt_token_ids": self.prompt_token_ids,
                "first_token": self.first_token, "max_tokens": self.max_tokens,
                "layout": vars(self.layout), "fingerprint": self.fingerprint}


def seal_transfer(transfer: KVTransfer, sealer: TensorSealer) -> list[bytes]:
    """Two sealed messages: the metadata (as JSON bytes), then the KV payload (lesson 08's AES-GCM)."""
    meta = torch.frombuffer(bytearray(json.dumps(transfer.meta()).encode()), dtype=torch.uint8)
    return [sealer.seal(meta), sealer.seal(transfer.payload)]


def open_transfer(messages: list[bytes], opener: TensorOpener) -> KVTransfer:
    """Authenticate and rebuild a transfer (``SecurityError`` if tampered, replayed or keyed wrongly)."""
    if not isinstance(messages, (list, tuple)) or len(messages) != 2:
        raise SecurityError("malformed", "a KV transfer is two sealed messages: metadata, then payload")
    _, _, meta_t = opener.open(messages[0])
    _, _, payload = opener.open(messages[1])
    try:
        meta = json.loads(meta_t.numpy().tobytes())
        layout = KVLayout(**meta["layout"])
        transfer = KVTransfer(str(meta["request_id"]), [int(t) for t in meta["prompt_token_ids"]],
                              int(meta["first_token"]), int(meta["max_tokens"]), layout,
                              str(meta["fingerprint"]), payload)
    except (ValueError, KeyError, TypeError) as e:
        raise SecurityError("malformed", f"metadata: {type(e).__name__}") from None
    if payload.dim() != 5 or payload.shape[0] != 2 or payload.shape[2] != transfer.num_tokens:
        raise SecurityError("malformed", f"payload of shape {tuple(payload.shape)} for "
                                         f"{transfer.num_tokens} tokens")
    return transfer
