"""Checkers for notebook 12 (tensor parallelism).

- ``12.predict_rank_bytes`` (predict): the bytes of parameters one rank of a tp=4 tiny LM holds,
  measured by parallelizing it on 4 real ranks (norms and KV heads are replicated, not split);
- ``12.vocab_argmax`` (build): greedy decoding's argmax over vocabulary-parallel logits without
  gathering them, on 2, 3 and 4 ranks, ties and a rank with no vocabulary included;
- ``12.fused_qkv_shard`` (stretch): one rank's rows of a fused QKV weight under grouped-query
  attention, the pitfall of cutting the fused matrix into contiguous pieces.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from ..launch import run_distributed
from ..parallel.plan import parallelize, tiny_lm_tp_plan
from ..parallel.tensor import ParallelLMHead, VocabParallelEmbedding, shard_indices
from .check import (COLLECTIVES, Incorrect, exercise, judge_prediction, labelled_cases, predicted_number,
                    raise_if_stub, recording_collectives, refuse_reference, run_ranks, with_hidden)
from ..model import ModelConfig, TinyLM

# -- 12.predict_rank_bytes (predict) ----------------------------------------------------------
RANK_TP = 4
RANK_CONFIG = dict(vocab_size=264, dim=64, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=160,
                   max_seq_len=64)


def _model():
    torch.manual_seed(0)
    return TinyLM(ModelConfig(**RANK_CONFIG)).eval()


def _rank_bytes() -> int:
    model = _model()
    parallelize(model, tiny_lm_tp_plan(model.config))
    return sum(p.numel() * p.element_size() for p in model.parameters())


@functools.lru_cache(maxsize=1)
def measured_rank_bytes() -> int:
    return run_distributed(_rank_bytes, RANK_TP, timeout=60)[0]


@exercise("12.predict_rank_bytes", "predict the parameter bytes one tensor-parallel rank holds")
def check_predict_rank_bytes(candidate):
    refuse_reference(candidate, run_distributed, run_ranks, parallelize, measured_rank_bytes)
    guess = predicted_number(candidate, "predicted_rank_bytes")
    measured = measured_rank_bytes()
    model = _model()
    total = sum(p.numel() * 4 for p in model.parameters())
    norms = sum(p.numel() * 4 for n, p in model.named_parameters() if "norm" in n)
    kv = sum(p.numel() * 4 for n, p in model.named_parameters() if "k_proj" in n or "v_proj" in n)
    mistakes = [
        (total / RANK_TP, "not everything is split: the norms are replicated on every rank, and with "
                          "tp=4 > n_kv_heads=1 the KV head is replicated too (a head is never cut)"),
        ((total - norms) / RANK_TP + norms, "the norms are right; but with tp=4 > n_kv_heads=1 each rank "
                                            "holds the whole KV head (k_proj and v_proj are replicated, "
                                            "not cut into quarter heads)"),
        ((total - kv) / RANK_TP + kv, "the KV head is right; the RMSNorm weights are replicated on "
                                      "every rank, not split"),
        (measured / 4, "that is elements: float32 parameters are 4 bytes each"),
        (measured / 2, "the model is float32 here (4 bytes per parameter), not bfloat16"),
        (total, "that is the whole model: a rank holds its shard"),
    ]
    judge_prediction(guess, measured, mistakes, "bytes",
                     "Go layer by layer: q_proj and o_proj by query heads, k_proj and v_proj by KV heads "
                     "(replicated when there are fewer KV heads than ranks), the MLP by ffn_dim, "
                     "embedding and LM head by vocabulary, norms whole.", tolerance=0.0)
    return f"{measured} bytes of the {total}-byte model on each of {RANK_TP} ranks"


# -- 12.vocab_argmax (build) ------------------------------------------------------------------
def vocab_slices(vocab: int, p: int) -> list[tuple[int, int]]:
    base, extra = divmod(vocab, p)
    starts = [r * base + min(r, extra) for r in range(p + 1)]
    return [(starts[r], starts[r + 1]) for r in range(p)]


def argmax_logits(batch: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(-4, 5, (batch, vocab), generator=g).float()   # small ints: ties happen
    logits[0, 0] = logits[0, vocab - 1] = 9.0      # a tie across ranks in row 0
    logits[1] = -logits[1].abs() - 1               # row 1 all negative: an empty slice must not win
    return logits


ARGMAX_CASES = [(2, 10, 3), (3, 10, 2), (4, 6, 3), (4, 3, 2)]   # (ranks, vocab, batch): 3 on 4 leaves one empty
ARGMAX_HIDDEN = [(5, 13, 4), (5, 4, 2)]   # grading only: slices 3, 3, 3, 2, 2; then 4 on 5 leaves one empty


def _argmax_on_rank(candidate, vocab, batch, seed):
    rank, p = dist.get_rank(), dist.get_world_size()
    start, stop = vocab_slices(vocab, p)[rank]
    local = argmax_logits(batch, vocab, seed)[:, start:stop].clone()
    sent = []
    out, _ = recording_collectives(lambda: candidate(local, start), COLLECTIVES + ("all_gather_object",),
                                   moved=sent)
    return out, max(sent, default=0)


@exercise("12.vocab_argmax", "greedy argmax over vocabulary-parallel logits, without gathering them")
def check_vocab_argmax(candidate, hidden=False):
    refuse_reference(candidate, ParallelLMHead, VocabParallelEmbedding, run_distributed, run_ranks)
    raise_if_stub(candidate)
    for label, (p, vocab, batch) in labelled_cases(ARGMAX_CASES, ARGMAX_HIDDEN, hidden):
        seed = 10 * p + vocab
        case = f"{label}p={p} ranks, vocab {vocab} split {[b - a for a, b in vocab_slices(vocab, p)]}, batch {batch}"
        full = argmax_logits(batch, vocab, seed)
        want = full.argmax(dim=-1)
        results = run_ranks(_argmax_on_rank, p, candidate, vocab, batch, seed, what=case)
        for rank, (got, biggest) in enumerate(results):
            if biggest >= batch * vocab:
                raise Incorrect(f"{case}: rank {rank} moved {biggest} elements in one collective: "
                                f"that is gathering the logits ({batch} x {vocab}), what this exercise avoids. "
                                f"Each rank can send its best value and its index: 2 numbers per row")
            if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                raise Incorrect(f"{case}: rank {rank} returned {got!r}; return a (batch,) tensor of token ids")
            if torch.equal(got.long(), want):
                continue
            starts = [a for a, _ in vocab_slices(vocab, p)]
            if torch.equal(got.long() + starts[rank], want) or (rank == 0 and p > 1 and all(
                    int(g) < vocab_slices(vocab, p)[0][1] for g in got)):
                raise Incorrect(f"{case}: rank {rank} returned {got.tolist()}, expected {want.tolist()}: "
                                f"those are indices inside a rank's slice; add the slice's first token id "
                                f"(vocab_start) to make them global")
            row = int((got.long() != want).nonzero()[0])
            best, idx = full[row].max(), int(got[row])
            empty = any(a == b for a, b in vocab_slices(vocab, p))
            if empty and (not 0 <= idx < vocab or full[row, idx] < best):
                raise Incorrect(f"{case}, row {row}: you returned {idx}, expected {int(want[row])}. "
                                f"A rank holds no vocabulary here (its slice is empty): its best value "
                                f"must lose to every other rank's (minus infinity), not be 0")
            if not 0 <= idx < vocab:
                raise Incorrect(f"{case}, row {row}: you returned {idx}, not a token id of a vocabulary "
                                f"of {vocab}")
            if full[row, idx] == best:
                raise Incorrect(f"{case}, row {row}: two token ids tie for the best logit {best:g} "
                                f"({(full[row] == best).nonzero().flatten().tolist()}); you returned "
                                f"{int(got[row])}, torch.argmax returns the first, {int(want[row])}: "
                                f"break ties towards the smallest id, so TP decodes as one process does")
            raise Incorrect(f"{case}, row {row}: you returned {int(got[row])}, expected {int(want[row])}: "
                            f"compare the ranks' best values first, then take the index of the winner")
    return with_hidden("the global argmax on every rank, ties to the smallest id, from 2 numbers per row "
                       "per rank", ARGMAX_HIDDEN, hidden)


# -- 12.fused_qkv_shard (stretch) -------------------------------------------------------------
QKV_CASES = [(4, 2, 3, 2), (4, 2, 3, 4), (8, 4, 2, 2), (6, 3, 2, 3), (4, 1, 2, 4)]   # heads, kv heads, head_dim, tp


def fused_qkv(n_heads: int, n_kv: int, head_dim: int) -> torch.Tensor:
    rows = (n_heads + 2 * n_kv) * head_dim
    return torch.arange(rows, dtype=torch.float32)[:, None] * 10 + torch.arange(3)


def _reference_shard(weight, n_heads, n_kv, head_dim, tp, rank):
    q, k, v = weight.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim])
    def pick(part, blocks, replicate):
        return part[shard_indices(blocks * head_dim, tp, rank, unit=head_dim, replicate=replicate)]

    return torch.cat([pick(q, n_heads, False), pick(k, n_kv, True), pick(v, n_kv, True)])


def _row_names(rows: torch.Tensor, n_heads, n_kv, head_dim) -> list[str]:
    names = []
    for value in rows[:, 0].tolist():
        r = int(value) // 10
        if r < n_heads * head_dim:
            names.append(f"q{r // head_dim}")
        elif r < (n_heads + n_kv) * head_dim:
            names.append(f"k{(r - n_heads * head_dim) // head_dim}")
        else:
            names.append(f"v{(r - (n_heads + n_kv) * head_dim) // head_dim}")
    return [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]


@exercise("12.fused_qkv_shard", "one rank's rows of a fused QKV weight under grouped-query attention")
def check_fused_qkv_shard(candidate):
    refuse_reference(candidate, shard_indices, parallelize, tiny_lm_tp_plan)
    for n_heads, n_kv, head_dim, tp in QKV_CASES:
        weight = fused_qkv(n_heads, n_kv, head_dim)
        for rank in range(tp):
            case = (f"n_heads={n_heads}, n_kv_heads={n_kv}, head_dim={head_dim}, tp={tp}, rank {rank}")
            got = candidate(weight.clone(), n_heads, n_kv, head_dim, tp, rank)
            want = _reference_shard(weight, n_heads, n_kv, head_dim, tp, rank)
            if isinstance(got, torch.Tensor) and got.shape == want.shape and torch.equal(got, want):
                continue
            expected = _row_names(want, n_heads, n_kv, head_dim)
            if not isinstance(got, torch.Tensor) or got.dim() != 2 or got.shape[1] != weight.shape[1]:
                raise Incorrect(f"{case}: return this rank's rows of the weight, a 2-D tensor; got {got!r}")
            mine = _row_names(got, n_heads, n_kv, head_dim)
            contiguous = weight.chunk(tp)[rank] if weight.shape[0] % tp == 0 else None
            if contiguous is not None and got.shape == contiguous.shape and torch.equal(got, contiguous):
                raise Incorrect(f"{case}: you took a contiguous 1/tp of the fused rows, which holds "
                                f"{mine}; the rank needs {expected}. The fused matrix is [all q heads; all k "
                                f"heads; all v heads]: split each part by heads, then concatenate")
            mine_kv = [n for n in mine if n[0] in "kv"]
            if tp > n_kv and mine_kv != [n for n in expected if n[0] in "kv"] and \
                    sorted(mine_kv) != sorted(n for n in expected if n[0] in "kv"):
                held = ", ".join(mine_kv) or "no KV head"
                raise Incorrect(f"{case}: your rows hold {mine} ({held}); with tp={tp} > n_kv_heads={n_kv} "
                                f"each KV head is replicated on tp // n_kv_heads ranks: rank r holds KV head "
                                f"r // (tp // n_kv_heads)")
            raise Incorrect(f"{case}: your rows hold {mine}; expected {expected} (its query heads, then the "
                            f"KV head(s) its query heads use, as k then v)")
    return "the right rows for every rank, KV heads split or replicated"
