"""The shape of the tiny LM, checked before any tensor is made.

A Llama-style decoder is fully described by a handful of integers. Checking them
up front turns "shape '[2, 7, 5, 32]' is invalid for input of size ..." deep in a
reshape into an error that names the parameter and what would be right.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from ..validate import bad, check_int, check_real


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only, Llama-style transformer.

    Attributes:
        vocab_size: rows of the embedding and of the LM head.
        dim: width of the residual stream (the hidden size).
        n_layers: number of decoder blocks.
        n_heads: query heads per attention layer.
        n_kv_heads: key/value heads; fewer than ``n_heads`` is grouped-query
            attention (GQA): each KV head serves ``n_heads // n_kv_heads`` query heads,
            which shrinks the KV cache by the same factor.
        ffn_dim: hidden width of the SwiGLU MLP.
        max_seq_len: the largest position (plus one) the model accepts.
        rope_theta: base of the rotary position embedding frequencies.
        norm_eps: epsilon inside RMSNorm, keeps the division finite.
    """

    vocab_size: int = 264
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 384
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            check_int(name, getattr(self, name), low=1)
        for name in ("rope_theta", "norm_eps"):
            check_real(name, getattr(self, name), low=0, low_open=True)
        if self.dim % self.n_heads:
            raise bad("n_heads", self.n_heads, f"a divisor of dim={self.dim}, one of {_divisors(self.dim)}",
                      f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise bad("n_kv_heads", self.n_kv_heads,
                      f"a divisor of n_heads={self.n_heads}, one of {_divisors(self.n_heads)}",
                      f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise bad("n_heads", self.n_heads, f"a divisor of dim={self.dim} that leaves an even head_dim",
                      f"head_dim = dim // n_heads = {self.head_dim}, and rotary embeddings "
                      "rotate pairs of features")

    @property
    def head_dim(self) -> int:
        """Features per attention head (``dim // n_heads``)."""
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build a config from a dict, naming any key that is not a field."""
        if not isinstance(d, dict):
            raise bad("d", d, "a dict of config fields")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys are {sorted(known)}")
        return cls(**d)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
