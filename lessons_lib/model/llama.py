"""A tiny Llama-style decoder in plain PyTorch.

Pieces, in the order a token meets them: an embedding, ``n_layers`` decoder
blocks (RMSNorm -> grouped-query attention with rotary positions -> residual,
RMSNorm -> SwiGLU MLP -> residual), a final RMSNorm and an untied LM head.

The model knows nothing of parallelism; it is built so parallelism can be
applied from outside:

* Tensor parallel: attention reads its head counts off the projected tensors and
  the MLP never looks at its hidden width, so swapping ``q/k/v_proj``,
  ``gate/up_proj`` for column shards and ``o_proj``, ``down_proj`` for row shards
  needs no change here.
* Pipeline parallel: the forward is ``embed -> layers -> norm -> lm_head`` with
  ``positions`` and the attention mask built by :func:`layer_inputs`, so a stage can
  run any slice of ``model.layers`` exactly as :meth:`TinyLM.forward` would.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..validate import bad
from .config import ModelConfig
from .kv_cache import KVCache, LayerKVCache


def _int_range(name: str, t: torch.Tensor, low: int, high: int, what: str) -> None:
    """Refuse a tensor that is not integer (bool and float included) or holds a value outside [low, high).

    One min/max over the tensor: cheap enough for every forward, unlike a check per token.
    """
    expected = f"{what} in [{low}, {high})"
    if not isinstance(t, torch.Tensor):
        raise bad(name, t, f"a tensor of {expected}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise bad(name, t, expected, f"got a {t.dtype} tensor")
    if t.numel():
        lo, hi = (int(x) for x in torch.aminmax(t))
        if lo < low or hi >= high:
            raise bad(name, f"a tensor with values from {lo} to {hi}", expected)


def check_padding_mask(attention_mask, shape: tuple, name: str = "attention_mask") -> torch.Tensor:
    """``attention_mask`` if it is a (batch, total) tensor of 0s and 1s (or bools) of ``shape``."""
    if not isinstance(attention_mask, torch.Tensor):
        raise bad(name, attention_mask, "a tensor of 0s and 1s (1: a real token, 0: padding)")
    if tuple(attention_mask.shape) != tuple(shape):
        raise bad(name, f"a tensor of shape {tuple(attention_mask.shape)}", f"shape {tuple(shape)}",
                  "rows of the batch x cached + new tokens")
    if attention_mask.dtype != torch.bool:
        _int_range(name, attention_mask, 0, 2, "0s and 1s (1: a real token, 0: padding)")
    return attention_mask


def make_positions(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Position ids of the last ``q_len`` columns of a padding mask.

    ``attention_mask`` is (batch, total_len): 1 for a real token, 0 for padding,
    covering cached tokens too. A token's position is the number of real tokens
    before it, so padding never shifts positions and a left-padded row gets the
    same positions as the sequence run alone. Pad columns get a harmless
    position; their outputs are never used.
    """
    positions = attention_mask.long().cumsum(dim=1) - 1
    return positions.clamp(min=0)[:, -q_len:]


def make_attention_mask(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor | None:
    """Boolean (batch, 1, q_len, total_len) mask: True where a query may attend a key.

    A query attends keys that are (a) not after it (causal) and (b) real tokens.
    Every query may also attend itself, so a pad query's row is never all-masked:
    an all-masked row gives a softmax of NaN, and a NaN key or value in the cache
    would poison real rows too (0 x NaN is NaN).

    Returns ``None`` for one query over a batch with no padding (every decode step of
    an unpadded batch): that query may attend every key, which is what attention does
    with no mask, and skipping the mask saves a dozen small ops per step.
    """
    batch, total = attention_mask.shape
    if q_len == 1 and bool(attention_mask.all()):
        return None
    past = total - q_len
    q_idx = torch.arange(past, total, device=attention_mask.device)[:, None]
    k_idx = torch.arange(total, device=attention_mask.device)[None, :]
    causal = k_idx <= q_idx                                        # (q_len, total)
    real_key = attention_mask.bool()[:, None, None, :]            # (batch, 1, 1, total)
    return (causal & real_key) | (k_idx == q_idx)


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain.

    Cheaper than LayerNorm (no mean subtraction, no bias) and what Llama uses.
    Computed in float32 so low-precision inputs do not lose the small variances.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight, fused into one call.
        out = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return out.to(x.dtype)


@functools.lru_cache(maxsize=16)
def rotary_table(head_dim: int, theta: float, length: int,
                 device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and signed sines of every position below ``length``, each (length, head_dim).

    Feature pair i rotates by angle ``position * theta ** (-2i / head_dim)``: fast
    for early pairs, slow for late ones. The angles depend only on the position, so
    they are computed once per shape and looked up by position afterwards, as
    production engines do: a decode step then costs one lookup per layer instead
    of recomputing powers, cosines and sines.

    The sine table carries the sign of the rotation: -sin on the first half of the
    features, +sin on the second (see :func:`apply_rotary`).
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)                    # (length, head_dim)
    sign = torch.ones(head_dim, device=device)
    sign[: head_dim // 2] = -1
    return angles.cos(), angles.sin() * sign


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                   max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and signed sines for ``positions`` (batch, seq), each (batch, 1, seq, head_dim).

    Read from :func:`rotary_table`, so padded and cached sequences need nothing
    special: a token's angles depend only on its position id.
    """
    cos, sin = rotary_table(head_dim, float(theta), max_seq_len, positions.device)
    return cos[positions][:, None].to(dtype), sin[positions][:, None].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs (x_i, x_{i+d/2}) of ``x`` (batch, heads, seq, head_dim).

    The pair becomes ``(x_i cos - x_{i+d/2} sin, x_{i+d/2} cos + x_i sin)``. Rolling
    the features by half swaps the halves, and the signed sine table supplies the
    minus, so the rotation is one roll, two products and a sum.

    Rotating q and k by their positions makes q.k depend only on the distance
    between the two tokens: relative position, for free, inside attention.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions and an optional KV cache."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.max_seq_len = config.max_seq_len
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor,
                cache: LayerKVCache | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # Head counts come from the tensors, not the config: under tensor
        # parallelism this rank's projections produce only its share of heads.
        n_heads = q.shape[-1] // self.head_dim
        n_kv = k.shape[-1] // self.head_dim
        if n_heads % n_kv:
            raise ValueError(f"local query heads ({n_heads}) must be a multiple of local "
                             f"KV heads ({n_kv}); check how q_proj and k_proj were sharded")
        q = q.view(batch, seq, n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, n_kv, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, n_kv, self.head_dim).transpose(1, 2)

        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta, q.dtype,
                                  self.max_seq_len)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)          # now (batch, n_kv, past + seq, head_dim)

        # softmax(q k^T / sqrt(head_dim), masked) v in one fused call, which
        # matters when decoding one token at a time is dominated by per-op
        # overhead. enable_gqa: each KV head serves n_heads // n_kv consecutive
        # query heads, as k.repeat_interleave(n_heads // n_kv, dim=1) would.
        if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            # torch 2.13's CPU attention kernel in 16-bit needs AVX-512 (it fails with "pack_vnni2"
            # on AVX2 or ARM laptops): attend in float32, which every CPU runs, and cast back.
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                                 enable_gqa=n_heads != n_kv).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                 enable_gqa=n_heads != n_kv)
        out = out.transpose(1, 2).reshape(batch, seq, n_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``.

    The gate decides, feature by feature, how much of ``up(x)`` passes. The hidden
    width is whatever ``gate_proj`` produces, so column shards work unchanged.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h + attn(norm(h))``, then ``h + mlp(norm(h))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, *, positions: torch.Tensor, attn_mask: torch.Tensor,
                cache: LayerKVCache | None = None) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), positions, attn_mask, cache)
        return h + self.mlp(self.mlp_norm(h))


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Refuse ids that are not a (batch, seq >= 1) integer tensor of values in [0, vocab_size)."""
    _int_range("input_ids", input_ids, 0, vocab_size, "token ids")
    if input_ids.dtype not in (torch.long, torch.int32):
        raise bad("input_ids", input_ids, "a torch.long (or torch.int32) tensor, as nn.Embedding needs",
                  f"got {input_ids.dtype}: convert with .long()")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise bad("input_ids", f"a tensor of shape {tuple(input_ids.shape)}",
                  "shape (batch, seq) with seq >= 1", "the model needs at least one token per row")


def layer_inputs(config: ModelConfig, batch: int, seq: int, positions: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(positions, attn_mask)`` every decoder layer gets, for ``seq`` new tokens in ``batch`` rows.

    Checked against the padding mask's shape, the cache and ``config.max_seq_len``. The whole
    model and every pipeline stage build them here, so they cannot disagree.
    """
    max_len = config.max_seq_len
    packed = getattr(cache, "packed_inputs", None)
    if packed is not None:
        # Several sequences packed into one row (the serving engine's step): the cache knows
        # each token's position and which keys it may attend.
        if positions is not None or attention_mask is not None:
            raise bad("cache", cache, "positions=None and attention_mask=None with a packed batch",
                      "a packed batch brings its own positions and mask")
        return packed()
    past = cache.seq_len if cache is not None else 0
    if attention_mask is None:
        device = positions.device if isinstance(positions, torch.Tensor) else None
        attention_mask = torch.ones(batch, past + seq, dtype=torch.long, device=device)
    else:
        check_padding_mask(attention_mask, (batch, past + seq))
    if positions is None:
        positions = make_positions(attention_mask, seq)
    else:
        if not isinstance(positions, torch.Tensor) or tuple(positions.shape) != (batch, seq):
            raise bad("positions", positions, f"a tensor of shape ({batch}, {seq}), like input_ids")
        _int_range("positions", positions, 0, max_len, f"positions (max_seq_len={max_len})")
    if seq + past > max_len and positions.numel() and int(positions.max()) >= max_len:
        raise bad("input_ids", f"{past} cached + {seq} new tokens", f"at most max_seq_len={max_len} "
                  "tokens per row", f"position {int(positions.max())} is beyond max_seq_len={max_len}")
    return positions, make_attention_mask(attention_mask, seq)


class TinyLM(nn.Module):
    """The course's decoder-only language model.

    ``forward(input_ids, positions=None, attention_mask=None, cache=None)`` returns
    logits (batch, seq, vocab). With a ``cache`` holding ``past`` tokens,
    ``input_ids`` are the new tokens only and ``attention_mask`` covers
    ``past + seq`` columns.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # Untied from the embedding so tensor parallelism can shard each on its own.
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # Scale the projections that write into the residual stream so its
        # variance does not grow with depth (GPT-2's recipe).
        for layer in self.layers:
            for proj in (layer.attn.o_proj, layer.mlp.down_proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def new_cache(self) -> KVCache:
        """An empty KV cache with one slot per layer."""
        return KVCache(len(self.layers))

    def prepare_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Check the inputs and return ``(positions, attn_mask)`` for every layer.

        A batch of no rows is allowed (a data-parallel rank may get none); a row of no tokens
        is not. A pipeline stage after the first, which receives hidden states rather than
        ids, calls :func:`layer_inputs` directly and gets the very same positions and mask.
        """
        check_input_ids(input_ids, self.config.vocab_size)
        return layer_inputs(self.config, *input_ids.shape, positions, attention_mask, cache)

    def forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                ) -> torch.Tensor:
        positions, attn_mask = self.prepare_inputs(input_ids, positions, attention_mask, cache)
        h = self.run_layers(self.embed(input_ids), range(len(self.layers)), positions, attn_mask, cache)
        return self.lm_head(self.norm(h))

    def run_layers(self, h: torch.Tensor, layer_ids, positions: torch.Tensor, attn_mask: torch.Tensor | None,
                   cache: KVCache | None = None) -> torch.Tensor:
        """Layers ``layer_ids`` (absolute indices: the cache is indexed by them) applied to ``h``."""
        for i in layer_ids:
            h = self.layers[i](h, positions=positions, attn_mask=attn_mask,
                               cache=cache[i] if cache is not None else None)
        return h


def count_parameters(model: nn.Module) -> int:
    """Number of scalar weights in ``model``."""
    return sum(p.numel() for p in model.parameters())
