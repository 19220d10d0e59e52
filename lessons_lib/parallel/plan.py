"""A tensor-parallel plan: which submodule becomes which parallel layer, applied from outside.

In the spirit of ``torch.distributed.tensor.parallel.parallelize_module``: a plan is a dict from
submodule name (``*`` matches any one name component, e.g. any layer index) to a style::

    plan = {"embed": "vocab",
            "layers.*.attn.q_proj": "colwise", ..., "layers.*.attn.o_proj": "rowwise",
            "lm_head": "vocab_head"}
    parallelize(model, plan, group)     # swaps those submodules in place, keeps the trained weights

A style is a string (``"colwise"``, ``"rowwise"``, ``"vocab"``, ``"vocab_head"``,
``"sequence_parallel"``, ``"local_count"``) or a :class:`Colwise` / :class:`Rowwise` object that
says how features are grouped (whole attention heads) and what they are called in errors
(``tp=3 does not divide n_heads=4: choose ...``). Any model whose ``nn.Linear``/``nn.Embedding``
submodules play these roles can be parallelised; :func:`tiny_lm_tp_plan` is the plan for the
course's tiny LM and :func:`tiny_lm_sp_plan` the same with sequence parallelism (:mod:`.sequence`).

A model that keeps its head counts as attributes (``self.n_heads``, as nanoGPT, gpt-fast and most
model libraries do) needs them changed on every rank too: an entry naming an int attribute with
style :class:`LocalCount` sets it to this rank's share, as gpt-fast's ``tp.py`` sets ``n_head`` and
``n_local_heads`` by hand. The tiny LM reads its head counts off tensor shapes and needs none.

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
from .sequence import SequenceParallelEmbedding, SequenceParallelNorm, SequenceParallelRowLinear
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
    """Split an ``nn.Linear`` by input features, in blocks of ``unit``; all-reduce the output.

    ``sequence_parallel=True``: reduce-scatter the output along the sequence instead (SP).
    """
    unit: int = 1
    name: str | None = None
    input_is_parallel: bool = True
    sequence_parallel: bool = False


@dataclass(frozen=True)
class Vocab:
    """Split an ``nn.Embedding`` by vocabulary rows (``sequence_parallel``: reduce-scatter by tokens)."""
    name: str = "vocab_size"
    sequence_parallel: bool = False


@dataclass(frozen=True)
class VocabHead:
    """Split an LM head (``nn.Linear`` to the vocabulary) by vocabulary; all-gather the logits."""
    name: str = "vocab_size"


@dataclass(frozen=True)
class SequenceParallel:
    """Run a token-wise module (a norm) on this rank's tokens and all-gather its output (SP)."""


@dataclass(frozen=True)
class LocalCount:
    """An int attribute counting what the split divides (heads): set to this rank's share.

    The entry names the attribute (``"layers.*.attn.n_heads"``). ``replicate=True``: as for KV heads,
    ``tp`` may be a multiple of the count and each rank then holds one.
    """
    replicate: bool = False


STYLES = {"colwise": Colwise(), "rowwise": Rowwise(), "vocab": Vocab(), "vocab_head": VocabHead(),
          "sequence_parallel": SequenceParallel(), "local_count": LocalCount()}
_KIND = {Colwise: nn.Linear, Rowwise: nn.Linear, Vocab: nn.Embedding, VocabHead: nn.Linear,
         SequenceParallel: nn.Module}


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


def tiny_lm_sp_plan(config=None) -> dict:
    """:func:`tiny_lm_tp_plan` with sequence parallelism: the residual stream and the norms split by tokens.

    Every norm runs on this rank's tokens and all-gathers (before the column-parallel layers);
    o_proj, down_proj and the embedding reduce-scatter along the sequence instead of all-reducing.
    The sequence length must be a multiple of tp (see :mod:`.sequence`).
    """
    plan = tiny_lm_tp_plan(config)
    for name in ("layers.*.attn.o_proj", "layers.*.mlp.down_proj"):
        plan[name] = Rowwise(unit=plan[name].unit, name=plan[name].name, sequence_parallel=True)
    plan["embed"] = Vocab(sequence_parallel=True)
    for name in ("layers.*.attn_norm", "layers.*.mlp_norm", "norm"):
        plan[name] = SequenceParallel()
    return plan


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
    if type(style) not in _KIND and not isinstance(style, LocalCount):
        raise TypeError(f"plan entry {entry!r}: style must be a string or a Colwise/Rowwise/Vocab/"
                        f"VocabHead/SequenceParallel/LocalCount object, got {type(style).__name__}")
    return style


def _build(module: nn.Module, style, group):
    if isinstance(style, Colwise):
        return ColumnParallelLinear.from_linear(module, group, gather_output=style.gather_output,
                                                unit=style.unit, name=style.name,
                                                replicate=style.replicate)
    if isinstance(style, Rowwise):
        cls = SequenceParallelRowLinear if style.sequence_parallel else RowParallelLinear
        return cls.from_linear(module, group, input_is_parallel=style.input_is_parallel,
                               unit=style.unit, name=style.name)
    if isinstance(style, Vocab):
        cls = SequenceParallelEmbedding if style.sequence_parallel else VocabParallelEmbedding
        return cls.from_embedding(module, group, name=style.name)
    if isinstance(style, SequenceParallel):
        return SequenceParallelNorm(module, group)
    return ParallelLMHead.from_linear(module, group, name=style.name)


def _check_divides(module: nn.Module, style, tp: int, qualified: str) -> None:
    """Run the shard arithmetic once, on rank 0's indices, only to raise a clear error early."""
    if isinstance(style, Colwise):
        size, unit, name, rep = module.out_features, style.unit, style.name, style.replicate
    elif isinstance(style, Rowwise):
        size, unit, name, rep = module.in_features, style.unit, style.name, False
    elif isinstance(style, Vocab):
        size, unit, name, rep = module.num_embeddings, 1, style.name, False
    elif isinstance(style, SequenceParallel):
        return                      # the sequence length is known only when the model runs
    else:
        size, unit, name, rep = module.out_features, 1, style.name, False
    try:
        shard_indices(size, tp, 0, unit=unit, name=name or "features", replicate=rep)
    except ValueError as e:
        raise type(e)(f"{qualified}: {e}") from None


def _count_targets(model: nn.Module, modules: dict, entry: str, style: LocalCount, tp: int) -> list:
    """(module, attribute, this rank's count) for a :class:`LocalCount` entry, checked."""
    parent, _, attr = entry.rpartition(".")
    owners = [model] if not parent else [m for n, m in modules.items() if n and _matches(parent, n)]
    owners = [m for m in owners if hasattr(m, attr)]
    targets = []
    for owner in owners:
        value = getattr(owner, attr)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"plan entry {entry!r}: {type(owner).__name__}.{attr} is "
                            f"{value!r}, but style LocalCount needs an int count")
        try:
            # Rank 0's share has the size of every rank's share (whole blocks, or one replica).
            local = shard_indices(value, tp, 0, name=attr, replicate=style.replicate)
        except ValueError as e:
            raise type(e)(f"{entry}: {e}") from None
        targets.append((owner, attr, len(local)))
    return targets


def parallelize(model: nn.Module, plan: dict, group=None, *, strict: bool = True) -> nn.Module:
    """Swap the submodules named in ``plan`` for their tensor-parallel shards, in place.

    ``group`` is the TP process group (``None``: the whole world). Every rank of the group must
    call this with the same plan on the same weights; each keeps only its shard. An entry with
    style :class:`LocalCount` names an int attribute (``"layers.*.attn.n_heads"``) and sets it to
    this rank's share of the count.

    ``strict=False`` skips entries that match no submodule: a pipeline stage holding only some of
    a model's layers (no ``embed`` on a middle stage) uses the whole model's plan that way. With
    ``strict=True`` such an entry is a ``ValueError`` listing the close and the valid names.
    Every entry is checked before the first module is swapped or attribute set. Returns ``model``.
    """
    if not isinstance(plan, dict) or not plan:
        raise bad("plan", plan, "a non-empty dict {submodule name: style}")
    tp = group_size(group)
    modules = dict(model.named_modules())
    swaps, counts = [], []
    for entry, style in plan.items():
        style = _resolve(style, entry)
        if isinstance(style, LocalCount):
            names = _count_targets(model, modules, entry, style, tp)
            counts += names
        else:
            names = [n for n in modules if n and _matches(entry, n)]
        if not names:
            if not strict:
                continue
            if isinstance(style, LocalCount):
                raise ValueError(f"plan entry {entry!r} names no attribute of {type(model).__name__}'s "
                                 "submodules; a LocalCount entry is a submodule path and an int "
                                 "attribute, e.g. 'layers.*.attn.n_heads'")
            valid = sorted({_generic(n) for n, m in modules.items()
                            if isinstance(m, (nn.Linear, nn.Embedding))})
            close = difflib.get_close_matches(entry, valid, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ValueError(f"plan entry {entry!r} matches no submodule of "
                             f"{type(model).__name__}; {hint}valid names: {', '.join(valid)}")
        if isinstance(style, LocalCount):
            continue
        for name in names:
            module, kind = modules[name], _KIND[type(style)]
            if type(module) is not kind and kind is not nn.Module:
                raise TypeError(f"plan entry {entry!r}: {name} is a {type(module).__name__}, "
                                f"but style {type(style).__name__} needs an nn.{kind.__name__}")
            _check_divides(module, style, tp, name)
            swaps.append((name, module, style))
    for name, module, style in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, _build(module, style, group))
    for owner, attr, local in counts:
        setattr(owner, attr, local)
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


__all__ = ["Colwise", "LocalCount", "Rowwise", "SequenceParallel", "Vocab", "VocabHead", "STYLES",
           "describe_shards", "parallelize", "tiny_lm_sp_plan", "tiny_lm_tp_plan", "validate_tp"]
