"""The KV cache: keys and values of past tokens, kept so decoding is O(n) per step.

Without a cache, producing token n+1 re-runs attention over all n tokens, so a
sequence of n tokens costs O(n^2) layer passes. With it, each step runs the model
on one new token and appends that token's keys and values to what is stored.

The cache takes every shape from the tensors it receives, never from a config:
under tensor parallelism a rank holds only its own KV heads, and under pipeline
parallelism a stage fills only the layers it owns.
"""

from __future__ import annotations

import torch

from ..validate import bad, check_int


class LayerKVCache:
    """Keys and values of one attention layer, shape (batch, n_kv_heads, seq, head_dim)."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def seq_len(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys and values; return everything stored so far."""
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise bad(name, t, "a (batch, kv_heads, seq, head_dim) tensor")
        if k.shape != v.shape:
            raise bad("v", f"a tensor of shape {tuple(v.shape)}", f"the shape of k, {tuple(k.shape)}")
        if self.k is None:
            self.k, self.v = k, v
        else:
            if k.shape[:2] != self.k.shape[:2] or k.shape[3] != self.k.shape[3]:
                raise bad("k", f"a tensor of shape {tuple(k.shape)}",
                          f"the batch, kv_heads and head_dim of the cached keys {tuple(self.k.shape)}")
            # torch.cat copies the whole cache each step; production engines
            # preallocate (or page) the buffer instead. Clarity wins here.
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` positions and drop the rest (roll back tokens that were rejected).

        Speculative decoding feeds tokens that may be thrown away: after a verification the
        cache must forget every position past the tokens kept, or the next step attends to them.
        """
        check_int("n", n, low=0, high=self.seq_len,
                  why=f"a layer holding {self.seq_len} positions can keep 0 to {self.seq_len} of them")
        if n == 0:
            self.k = self.v = None
        elif n < self.seq_len:
            # A view: the next update's torch.cat copies what is kept into a new tensor.
            self.k, self.v = self.k[:, :, :n], self.v[:, :, :n]

    def nbytes(self) -> int:
        if self.k is None:
            return 0
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class KVCache:
    """One :class:`LayerKVCache` per layer, indexed by absolute layer index.

    A pipeline stage that owns layers 2 and 3 uses only ``cache[2]`` and
    ``cache[3]``; the others stay empty and cost nothing. With ``n_layers=None``
    the cache grows a slot the first time a layer index is asked for, so code
    that does not know the depth of the model (like :func:`generate` driving a
    parallel wrapper) can still make one.
    """

    def __init__(self, n_layers: int | None = None) -> None:
        if n_layers is not None:
            check_int("n_layers", n_layers, low=1, why="or None for a cache that grows")
        self.fixed = n_layers is not None
        self.layers = [LayerKVCache() for _ in range(n_layers or 0)]

    def __getitem__(self, i: int) -> LayerKVCache:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise IndexError(f"layer index {i!r} must be a non-negative integer")
        if i >= len(self.layers):
            if self.fixed:
                raise IndexError(f"layer index {i} is out of range for a cache of "
                                 f"{len(self.layers)} layers")
            self.layers.extend(LayerKVCache() for _ in range(i + 1 - len(self.layers)))
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def seq_len(self) -> int:
        """Tokens cached so far (read from the first layer that holds any)."""
        for layer in self.layers:
            if layer.k is not None:
                return layer.seq_len
        return 0

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` cached positions of every layer; drop the rest.

        ``n`` counts tokens, from 0 (empty) to :attr:`seq_len` (nothing dropped). Hugging Face's
        ``DynamicCache.crop(n)`` does the same; a paged cache instead frees the blocks past ``n``.
        Every layer that holds positions must hold the same number (a cache filled by one model
        forward does), so a half-updated cache is refused rather than cut unevenly.
        """
        lengths = {layer.seq_len for layer in self.layers if layer.k is not None}
        if len(lengths) > 1:
            raise ValueError(f"the layers hold different numbers of positions {sorted(lengths)}: "
                             "truncate a cache only between forward passes")
        held = lengths.pop() if lengths else 0
        check_int("n", n, low=0, high=held,
                  why=f"the cache holds {held} positions; keep 0 to {held} of them")
        for layer in self.layers:
            if layer.k is not None:
                layer.truncate(n)

    def nbytes(self) -> int:
        """Bytes held by every cached key and value tensor."""
        return sum(layer.nbytes() for layer in self.layers)

    def __repr__(self) -> str:
        return f"KVCache(n_layers={len(self)}, seq_len={self.seq_len}, nbytes={self.nbytes()})"


def kv_cache_bytes_per_token(config, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the KV cache grows by for each token of each sequence.

    2 (one key and one value) x layers x KV heads x head_dim x bytes per element.
    With GQA the cache scales with ``n_kv_heads``, not ``n_heads``.
    """
    if not isinstance(dtype, torch.dtype):
        raise bad("dtype", dtype, "a torch.dtype, e.g. torch.bfloat16")
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * element
