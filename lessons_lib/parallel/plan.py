"""A tensor-parallel plan: which submodule becomes which parallel layer, applied from outside.

In the spirit of ``torch.distributed.tensor.parallel.parallelize_module``: a plan is a dict from
submodule name (``*`` matches any one name component, e.g. any layer index) to a style::

    plan = {"embed": "vocab",
            "layers.*.attn.q_proj": "colwise", ..., "layers.*.attn.o_proj": "rowwise",
            "lm_head": "vocab_head"}
    parallelize(model, plan, group)     # swaps those submodules in place, keeps the trained weights

A style is a string (``"colwise"``, ``"rowwise"``, ``"vocab"``, ``"vocab_head"``) or a
:class:`Colwise` / :class:`Rowwise` object that says how features are grouped (whole attention
heads) and what they are called in errors (``tp=3 does not divide n_heads=4: choose ...``).
Any model whose ``nn.Linear``/``nn.Embedding`` submodules play these roles can be parallelised;
:func:`tiny_lm_tp_plan` is the plan for the course's tiny LM.

Every entry is checked (does it match a submodule of the right type, does tp divide its size)
before the first module is swapped, so a bad plan leaves the model untouched.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch.nn as nn

from ..model import ModelConfig
from ..validate import bad, check_int
from .tensor import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear,
                     VocabParallelEmbedding, group_size, shard_indices)


@dataclass(frozen=True)
class Colwise:
    """Split an ``nn.Linear`` by output features, in blocks of ``unit`` (e.g. ``head_dim``).

    ``replicate=True`` allows ``tp`` to be a multiple of the block count (KV heads under GQA).
    """
    unit: int = 1
    name: str | None = None
    replicate: bool = False
    gather_output: bool = False


@dataclass(frozen=True)
class Rowwise:
    """Split an ``nn.Linear`` by input features, in blocks of ``unit``; all-reduce the output."""
    unit: int = 1
    name: str | None = None
    input_is_parallel: bool = True


@dataclass(frozen=True)
class Vocab:
    """Split an ``nn.Embedding`` by vocabulary rows."""
    name: str = "vocab_size"


@dataclass(frozen=True)
class VocabHead:
    """Split an LM head (``nn.Linear`` to the vocabulary) by vocabulary; all-gather the logits."""
    name: str = "vocab_size"


STYLES = {"colwise": Colwise(), "rowwise": Rowwise(), "vocab": Vocab(), "vocab_head": VocabHead()}
_KIND = {Colwise: nn.Linear, Rowwise: nn.Linear, Vocab: nn.Embedding, VocabHead: nn.Linear}


def tiny_lm_tp_plan(config=None) -> dict:
    """The tensor-parallel plan of :class:`lessons_lib.model.TinyLM` (``config``: its ModelConfig).

    Attention is split by heads: q_proj by query heads, k/v_proj by KV heads (replicated when tp
    exceeds ``n_kv_heads``), o_proj by the same query heads on its input side. The MLP is split
    by ``ffn_dim``; embedding and LM head by vocabulary. Norms are tiny and stay replicated.
    """
    if config is None:
        config = ModelConfig()
    config = getattr(config, "config", config)       # a TinyLM works too
    hd = config.head_dim
    return {
        "embed": Vocab(),
        "layers.*.attn.q_proj": Colwise(unit=hd, name="n_heads"),
        "layers.*.attn.k_proj": Colwise(unit=hd, name="n_kv_heads", replicate=True),
        "layers.*.attn.v_proj": Colwise(unit=hd, name="n_kv_heads", replicate=True),
        "layers.*.attn.o_proj": Rowwise(unit=hd, name="n_heads"),
        "layers.*.mlp.gate_proj": Colwise(name="ffn_dim"),
        "layers.*.mlp.up_proj": Colwise(name="ffn_dim"),
        "layers.*.mlp.down_proj": Rowwise(name="ffn_dim"),
        "lm_head": VocabHead(),
    }


def torch_tp_plan(model: nn.Module) -> dict:
    """The same split written for PyTorch's ``parallelize_module``, to compare against ours.

    Its ``ColwiseParallel`` cuts k/v_proj into equal slices and cannot replicate KV heads, so this
    plan works only while tp divides ``n_kv_heads``.
    """
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {"embed": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Replicate())}
    for i in range(len(model.layers)):
        for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"layers.{i}.{name}"] = ColwiseParallel()
        for name in ("attn.o_proj", "mlp.down_proj"):
            plan[f"layers.{i}.{name}"] = RowwiseParallel()
    return plan


def validate_tp(config, tp: int) -> None:
    """Raise ``ValueError`` naming the parameter if ``tp`` cannot shard a tiny LM of ``config``."""
    check_int("tp", tp, low=1)
    config = getattr(config, "config", config)       # a TinyLM works too
    if not all(hasattr(config, f) for f in ("n_heads", "dim", "n_kv_heads", "ffn_dim", "vocab_size")):
        raise bad("config", config, "a ModelConfig (or a TinyLM)")
    checks = [("n_heads", config.n_heads, False), ("dim", config.dim, False),
              ("n_kv_heads", config.n_kv_heads, True), ("ffn_dim", config.ffn_dim, False),
              ("vocab_size", config.vocab_size, False)]
    for name, size, replicate in checks:
        shard_indices(size, tp, 0, name=name, replicate=replicate)


def _generic(name: str) -> str:
    """``layers.3.attn.q_proj`` -> ``layers.*.attn.q_proj``: how plan entries name repeated layers."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def _matches(pattern: str, name: str) -> bool:
    p, n = pattern.split("."), name.split(".")
    return len(p) == len(n) and all(fnmatchcase(b, a) for a, b in zip(p, n))


def _resolve(style, entry: str):
    if isinstance(style, str):
        if style not in STYLES:
            raise ValueError(f"plan entry {entry!r}: unknown style {style!r}; choose one of "
                             f"{sorted(STYLES)} or a Colwise/Rowwise/Vocab/VocabHead object")
        return STYLES[style]
    if type(style) not in _KIND:
        raise TypeError(f"plan entry {entry!r}: style must be a string or a Colwise/Rowwise/Vocab/"
                        f"VocabHead object, got {type(style).__name__}")
    return style


def _build(module: nn.Module, style, group):
    if isinstance(style, Colwise):
        return ColumnParallelLinear.from_linear(module, group, gather_output=style.gather_output,
                                                unit=style.unit, name=style.name,
                                                replicate=style.replicate)
    if isinstance(style, Rowwise):
        return RowParallelLinear.from_linear(module, group, input_is_parallel=style.input_is_parallel,
                                             unit=style.unit, name=style.name)
    if isinstance(style, Vocab):
        return VocabParallelEmbedding.from_embedding(module, group, name=style.name)
    return ParallelLMHead.from_linear(module, group, name=style.name)


def _check_divides(module: nn.Module, style, tp: int, qualified: str) -> None:
    """Run the shard arithmetic once, on rank 0's indices, only to raise a clear error early."""
    if isinstance(style, Colwise):
        size, unit, name, rep = module.out_features, style.unit, style.name, style.replicate
    elif isinstance(style, Rowwise):
        size, unit, name, rep = module.in_features, style.unit, style.name, False
    elif isinstance(style, Vocab):
        size, unit, name, rep = module.num_embeddings, 1, style.name, False
    else:
        size, unit, name, rep = module.out_features, 1, style.name, False
    try:
        shard_indices(size, tp, 0, unit=unit, name=name or "features", replicate=rep)
    except ValueError as e:
        raise type(e)(f"{qualified}: {e}") from None


def parallelize(model: nn.Module, plan: dict, group=None, *, strict: bool = True) -> nn.Module:
    """Swap the submodules named in ``plan`` for their tensor-parallel shards, in place.

    ``group`` is the TP process group (``None``: the whole world). Every rank of the group must
    call this with the same plan on the same weights; each keeps only its shard.

    ``strict=False`` skips entries that match no submodule: a pipeline stage holding only some of
    a model's layers (no ``embed`` on a middle stage) uses the whole model's plan that way. With
    ``strict=True`` such an entry is a ``ValueError`` listing the close and the valid names.
    Returns ``model``.
    """
    if not isinstance(plan, dict) or not plan:
        raise bad("plan", plan, "a non-empty dict {submodule name: style}")
    tp = group_size(group)
    modules = dict(model.named_modules())
    swaps = []
    for entry, style in plan.items():
        style = _resolve(style, entry)
        names = [n for n in modules if n and _matches(entry, n)]
        if not names:
            if not strict:
                continue
            valid = sorted({_generic(n) for n, m in modules.items()
                            if isinstance(m, (nn.Linear, nn.Embedding))})
            close = difflib.get_close_matches(entry, valid, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ValueError(f"plan entry {entry!r} matches no submodule of "
                             f"{type(model).__name__}; {hint}valid names: {', '.join(valid)}")
        for name in names:
            module, kind = modules[name], _KIND[type(style)]
            if type(module) is not kind:
                raise TypeError(f"plan entry {entry!r}: {name} is a {type(module).__name__}, "
                                f"but style {type(style).__name__} needs an nn.{kind.__name__}")
            _check_divides(module, style, tp, name)
            swaps.append((name, module, style))
    for name, module, style in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, _build(module, style, group))
    return model


def describe_shards(model: nn.Module) -> list[tuple[str, str, tuple, tuple]]:
    """(name, layer type, local weight shape, full weight shape) of every parallel layer."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)):
            rows.append((name, type(m).__name__, tuple(m.weight.shape), (m.out_features, m.in_features)))
        elif isinstance(m, VocabParallelEmbedding):
            rows.append((name, type(m).__name__, tuple(m.weight.shape),
                         (m.num_embeddings, m.embedding_dim)))
    return rows


__all__ = ["Colwise", "Rowwise", "Vocab", "VocabHead", "STYLES", "describe_shards", "parallelize",
           "tiny_lm_tp_plan", "validate_tp"]
