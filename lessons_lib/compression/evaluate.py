"""Measure what compression buys and costs: bytes, decode speed, held-out perplexity.

Sizes and perplexities are deterministic (same weights, same text, same
numbers). Decode speed is a timing: it depends on the machine and on what else
runs on it, so it is the best of a few runs and should be read as a ratio
against float32 measured in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..display import within
from ..model import corpus_splits, generate
from ..tokenizer import ByteTokenizer
from ..validate import bad, check_int, check_str, check_tensor


def heldout_ids(n_bytes: int | None = None) -> torch.Tensor:
    """The held-out split of the corpus (lessons_lib/data/CORPUS.md), or its first ``n_bytes``."""
    _, valid = corpus_splits()
    if n_bytes is None:
        return valid
    check_int("n_bytes", n_bytes, low=2, why=f"or None for all {valid.numel()} held-out bytes")
    return valid[:n_bytes]


@torch.no_grad()
def calibration_inputs(model: nn.Module, module: nn.Module, ids: torch.Tensor,
                       window: int = 256) -> torch.Tensor:
    """What ``module`` (a layer inside ``model``) receives when ``model`` reads ``ids``: (tokens, features).

    ``ids`` (1-D) is cut into rows of ``window`` tokens and run in one batch; a forward hook records
    the module's input. GPTQ's Hessian and SmoothQuant's channel maxima are computed from these.
    """
    if not isinstance(module, nn.Module) or not any(m is module for m in model.modules()):
        raise bad("module", type(module).__name__,
                  "a submodule of model, e.g. model.layers[0].mlp.down_proj")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        raise bad("ids", ids, "a 1-D tensor of token ids")
    check_int("window", window, low=1, high=ids.numel(),
              why=f"a row length of at most the {ids.numel()} ids given")
    rows = ids[:ids.numel() // window * window].reshape(-1, window)
    seen: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    try:
        model(rows)
    finally:
        hook.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).float()


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact|| / ||exact||`` (Frobenius norms): how far a compressed result is from the exact.

    One number for a whole tensor, so it does not hinge on a few elements near zero the way an
    elementwise relative error does.
    """
    for name, t in (("approx", approx), ("exact", exact)):
        check_tensor(name, t, min_dim=1)
    if approx.shape != exact.shape:
        raise bad("approx", f"a tensor of shape {tuple(approx.shape)}",
                  f"the shape of exact, {tuple(exact.shape)}")
    norm = exact.double().norm()
    if norm == 0:
        raise bad("exact", "an all-zero tensor", "a tensor with at least one non-zero element",
                  "the error relative to zero is undefined")
    return float((approx.double() - exact.double()).norm() / norm)


def decode_rates(models: dict[str, nn.Module], prompt: str = "The KV cache", new_tokens: int = 64,
                 rounds: int = 7) -> dict[str, float]:
    """Greedy decode rate at batch 1 of each model (tokens after the first, per second).

    Every round times each model once, in turn, and each model keeps its best round.
    Interleaving puts every model through the same moments of machine load, so the
    ratios between them are fairer than timing one model after another; the best
    round is the one least disturbed by other programs.
    """
    check_int("rounds", rounds, low=1)
    check_int("new_tokens", new_tokens, low=2,
              why="the first comes from the prefill; the rate is of the ones after it")
    check_str("prompt", prompt)
    if not isinstance(models, dict) or not models:
        raise bad("models", models, "a dict of name -> model with at least one entry")
    ids = torch.tensor([ByteTokenizer().encode(prompt)])
    for model in models.values():
        generate(model, ids, 4)              # warm-up: first calls allocate and dispatch
    best = {name: 0.0 for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            timings: dict = {}
            generate(model, ids, new_tokens, timings=timings)
            best[name] = max(best[name], (new_tokens - 1) / timings["decode_s"])
    return best


@dataclass
class Measurement:
    """One row of the compression table."""

    name: str
    linear_bytes: int       # weights (plus scales) of every Linear-like layer
    total_bytes: int        # every parameter and buffer
    perplexity: float       # on the held-out ids given
    tokens_per_s: float | None = None


# Perplexity is printed to 2 decimals and its change to 0.1 percentage point: the CPU's int8 and
# int4 kernels alone move a quantised model's perplexity by about 3e-5 (0.003%).
PPL_CHANGE_TOL = 0.1


def perplexity_change(perplexity: float, baseline: float) -> str:
    """``perplexity`` against ``baseline`` in percent, at a resolution CPU kernels cannot flip."""
    return within(100 * (perplexity / baseline - 1), PPL_CHANGE_TOL, signed=True, unit="%")


def ratio_rows(rows: list[Measurement], baseline: str = "fp32") -> list[list]:
    """Table rows: bytes and ratios against the ``baseline`` row (smaller / faster / ppl change)."""
    names = [r.name for r in rows]
    if baseline not in names:
        raise bad("baseline", baseline, "the name of one of the rows: " + ", ".join(map(repr, names)))
    base = next(r for r in rows if r.name == baseline)
    out = []
    for r in rows:
        row = [r.name, r.linear_bytes, f"{base.linear_bytes / r.linear_bytes:.2f}x",
               r.total_bytes, f"{base.total_bytes / r.total_bytes:.2f}x",
               f"{r.perplexity:.2f}", perplexity_change(r.perplexity, base.perplexity)]
        if r.tokens_per_s is not None and base.tokens_per_s:
            row += [f"{r.tokens_per_s:.0f}", f"{r.tokens_per_s / base.tokens_per_s:.2f}x"]
        out.append(row)
    return out


TABLE_HEADER = ["model", "Linear bytes", "smaller", "all bytes", "smaller", "perplexity", "vs fp32",
                "decode tok/s", "speed vs fp32"]
