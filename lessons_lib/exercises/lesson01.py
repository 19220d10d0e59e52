"""Checkers for notebook 01 (why distribute): KV-cache bytes, memory per device, a decode loop."""

from __future__ import annotations

import math
import numbers

import torch

from ..sizing import (LLAMA2_7B, LLAMA2_13B, LLAMA2_70B, activation_bytes, fits, kv_cache_bytes,
                      memory_per_device, weight_bytes)
from ..model import KVCache, ModelConfig, TinyLM, generate, kv_cache_bytes_per_token, load_tiny_lm
from .check import Incorrect, exercise, labelled_cases, refuse_reference, with_hidden


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


# -- 01.predict_kv_bytes ---------------------------------------------------------------------
KV_CONFIG = ModelConfig(vocab_size=264, dim=96, n_layers=4, n_heads=6, n_kv_heads=2, ffn_dim=192,
                        max_seq_len=64)
KV_BATCH, KV_PROMPT, KV_STEPS = 5, 7, 4


def measure_kv_bytes(config: ModelConfig = KV_CONFIG, batch: int = KV_BATCH,
                     prompt: int = KV_PROMPT, steps: int = KV_STEPS) -> tuple[int, int]:
    """Bytes of the real KV cache of a bfloat16 model after a prefill of ``batch`` prompts of
    ``prompt`` tokens and ``steps`` decode steps; and the positions it holds."""
    with torch.random.fork_rng():   # the weights' values do not matter, only their shapes
        torch.manual_seed(0)
        model = TinyLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 256, (batch, prompt), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache()
    with torch.no_grad():
        logits = model(ids, cache=cache)                     # prefill
        for _ in range(steps):                               # decode: one new token per row
            logits = model(logits[:, -1:].argmax(dim=-1), cache=cache)
    return cache.nbytes(), cache.seq_len


@exercise("01.predict_kv_bytes", "predict the bytes of a real KV cache")
def check_predict_kv_bytes(candidate):
    refuse_reference(candidate, kv_cache_bytes, kv_cache_bytes_per_token, KVCache, TinyLM,
                     measure_kv_bytes)
    got = candidate()
    if not _is_number(got):
        raise Incorrect(f"predicted_kv_bytes() returned {got!r}: return a number of bytes")
    measured, positions = measure_kv_bytes()
    c, b = KV_CONFIG, KV_BATCH
    case = (f"batch {b}, prompt {KV_PROMPT} tokens, {KV_STEPS} decode steps, bfloat16: measured "
            f"{measured} bytes in the cache, you predicted {got:g}")
    if math.isclose(got, measured, abs_tol=0.5):
        return f"{case}: exactly right"
    per_position = measured / positions
    mistakes = [
        (c.n_heads / c.n_kv_heads, f"you counted all {c.n_heads} query heads (or the full hidden "
                                   f"size dim={c.dim}); only the {c.n_kv_heads} KV heads of "
                                   f"head_dim={c.head_dim} are cached (grouped-query attention)"),
        (2, "a bfloat16 element is 2 bytes, not 4"),
        (2 * c.n_heads / c.n_kv_heads, "two slips: 4-byte elements (bfloat16 has 2) and the query "
                                       "heads (only the KV heads are cached)"),
        (8, "that is bits, not bytes"),
        (1 / 2, "the cache holds a key *and* a value per head and position: a factor 2"),
        (1 / c.n_layers, f"every one of the {c.n_layers} layers keeps its own keys and values"),
        (1 / b, f"each of the {b} sequences in the batch has its own cache"),
        (KV_PROMPT / positions, f"decoding adds to the cache too: each of the {KV_STEPS} steps "
                                "runs one new token through the model and caches its key and value"),
        (KV_STEPS / positions, "the prefill caches the prompt's keys and values too"),
        ((positions + 1) / positions, "one position too many: the token chosen by the last step "
                                      "has not been run through the model yet, so it is not cached"),
        (1 / (b * positions), "that is one position of one sequence: multiply by the positions "
                              "cached and by the batch"),
    ]
    for factor, cause in mistakes:
        if math.isclose(got, measured * factor, rel_tol=1e-9, abs_tol=0.5):
            raise Incorrect(f"{case}: {cause}")
    raise Incorrect(f"{case}. Per sequence and cached position the model stores {per_position:g} "
                    "bytes? Work it out: 2 (K and V) x layers x KV heads x head_dim x bytes per "
                    "element, times the positions cached, times the batch")


# -- 01.device_memory (build) ----------------------------------------------------------------
_DTYPES = {4: "fp32", 2: "bf16", 1: "int8"}
MEMORY_CASES = [  # shape, batch, context, devices, strategy, bytes per value
    (LLAMA2_7B, 1, 1, 1, "single", 2),
    (LLAMA2_70B, 8, 4096, 1, "single", 2),
    (LLAMA2_13B, 2, 1000, 1, "single", 4),
    (LLAMA2_70B, 5, 4096, 2, "data", 2),
    (LLAMA2_70B, 8, 4096, 4, "tensor", 2),
    (LLAMA2_7B, 8, 4096, 3, "pipeline", 2),
    (LLAMA2_70B, 8, 4096, 16, "tensor", 2),
    (LLAMA2_13B, 7, 2048, 4, "data", 1),
    (LLAMA2_13B, 4, 512, 8, "tensor", 2),
    (LLAMA2_70B, 1, 4096, 80, "pipeline", 2),
    (LLAMA2_7B, 4, 256, 1, "tensor", 2),
]
MEMORY_HIDDEN = [  # grading only: fp32 on 5 stages (32 layers), 5 sequences on 3 devices, 32-way TP
    (LLAMA2_7B, 3, 100, 5, "pipeline", 4),
    (LLAMA2_13B, 5, 300, 3, "data", 2),
    (LLAMA2_70B, 3, 128, 32, "tensor", 2),
]


def _weight_mistakes(shape, batch, devices, strategy, nbytes, full, expected):
    layers, d = shape.n_layers, devices
    out = []
    if strategy == "data" and d > 1:
        out.append((full / d, "data parallelism copies the whole model to every device: each "
                              "holds all the weights"))
    if strategy == "tensor" and d > 1:
        out.append((full, f"tensor parallelism splits every weight matrix {d} ways: each device "
                          "holds weights / devices"))
    if strategy == "pipeline" and d > 1:
        out += [(full, "pipeline stages split the layers: a stage holds only its layers' weights"),
                (full / d, f"layers are whole: {layers} layers on {d} stages put "
                           f"ceil({layers}/{d}) = {-(-layers // d)} on the busiest stage, so it "
                           f"holds {-(-layers // d)}/{layers} of the weights"),
                (full * (layers // d) / layers, f"that is the lightest stage (floor): the "
                                                f"busiest holds ceil({layers}/{d}) = "
                                                f"{-(-layers // d)} layers")]
    return out + [(expected * b / nbytes, f"bytes_per_value is {nbytes}: weights are parameters "
                                          f"x {nbytes} bytes") for b in (1, 2, 4, 8) if b != nbytes]


def _kv_mistakes(shape, batch, devices, strategy, full, expected):
    d, kv, layers = devices, shape.n_kv_heads, shape.n_layers
    out = []
    if strategy == "data" and d > 1:
        out += [(full, f"each data-parallel device caches only its own sequences: "
                       f"ceil({batch}/{d}) = {-(-batch // d)} on the busiest"),
                (full / d, f"sequences are whole: {batch} on {d} devices give the busiest "
                           f"ceil({batch}/{d}) = {-(-batch // d)}"),
                (full * (batch // d) / batch, f"floor gives the lightest device: the busiest "
                                              f"serves ceil({batch}/{d}) = {-(-batch // d)} "
                                              "sequences")]
    if strategy == "tensor" and d > 1:
        out.append((full, "tensor parallelism splits the KV heads too: each device caches only "
                          "its own heads"))
        if d > kv:
            out.append((full / d, f"{d} devices but only {kv} KV heads: a device cannot hold "
                                  "less than one head, so each holds one (a KV head is "
                                  f"replicated on {d // kv} devices) and caches 1/{kv} of the KV"))
    if strategy == "pipeline" and d > 1:
        out += [(full, "each stage caches only its own layers"),
                (full / d, f"layers are whole: the busiest stage caches ceil({layers}/{d}) = "
                           f"{-(-layers // d)} of {layers} layers"),
                (full * (layers // d) / layers, f"floor gives the lightest stage: the busiest "
                                                f"holds ceil({layers}/{d}) = {-(-layers // d)} "
                                                "layers")]
    return out + [(expected * shape.n_heads / kv, f"you used the {shape.n_heads} query heads; "
                                                  f"only the {kv} KV heads are cached "
                                                  "(grouped-query attention)"),
                  (expected / 2, "the cache holds a key *and* a value: a factor 2")]


def _same(a, b) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.5)


@exercise("01.device_memory", "weights and KV cache on the busiest device, per strategy")
def check_device_memory(candidate, hidden=False):
    refuse_reference(candidate, memory_per_device, kv_cache_bytes, weight_bytes, activation_bytes,
                     fits, kv_cache_bytes_per_token)
    for label, (shape, batch, context, devices, strategy, nbytes) in labelled_cases(
            MEMORY_CASES, MEMORY_HIDDEN, hidden):
        need = memory_per_device(shape, dtype=_DTYPES[nbytes], batch=batch, context=context,
                                 devices=devices, strategy=strategy)
        expected = (need["weights"], need["kv_cache"])
        call = (f"{label}device_memory({shape.name}, batch={batch}, context={context}, "
                f"devices={devices}, strategy={strategy!r}, bytes_per_value={nbytes})")
        got = candidate(shape, batch, context, devices, strategy, nbytes)
        if (not isinstance(got, (tuple, list)) or len(got) != 2
                or not all(_is_number(x) for x in got)):
            raise Incorrect(f"{call} returned {got!r}; return a pair of numbers "
                            "(weight bytes, KV-cache bytes)")
        full_weights = weight_bytes(shape, _DTYPES[nbytes])
        full_kv = kv_cache_bytes(shape, batch, context, _DTYPES[nbytes])
        for i, (what, mistakes) in enumerate((
                ("weights", _weight_mistakes(shape, batch, devices, strategy, nbytes, full_weights,
                                             expected[0])),
                ("KV cache", _kv_mistakes(shape, batch, devices, strategy, full_kv, expected[1])))):
            if _same(got[i], expected[i]):
                continue
            case = f"{call}: {what} {got[i]:.6g} bytes, expected {expected[i]:.6g}"
            for value, cause in mistakes:
                if _same(got[i], value):
                    raise Incorrect(f"{case}: {cause}")
            rule = ("parameters x bytes_per_value, split as the strategy splits them" if i == 0 else
                    "2 x layers x KV heads x head_dim x bytes_per_value per token, times the "
                    "sequences and the context, split as the strategy splits them")
            raise Incorrect(f"{case}. The {what}: {rule}")
    return with_hidden("right for one device and for data, tensor (KV heads replicated past 8 devices) "
                       "and pipeline parallelism, with uneven splits", MEMORY_HIDDEN, hidden)


# -- 01.fix_decode_loop (stretch) ------------------------------------------------------------
DECODE_PROMPTS = ("Each rank holds", "The router send")   # same length: no padding
DECODE_STEPS = (6, 1, 0)


def _tiny_lm():
    model, tokenizer = load_tiny_lm()
    ids = torch.tensor([tokenizer.encode(text) for text in DECODE_PROMPTS])
    return model, ids


def _reference(model, prompt, new_tokens):
    if new_tokens == 0:
        return prompt
    return generate(model, prompt, new_tokens, use_cache=False)


def _cache_positions(cache):
    seq_len = getattr(cache, "seq_len", None)
    return seq_len if isinstance(seq_len, int) else None


@exercise("01.fix_decode_loop", "a greedy decode loop whose KV cache grows one token per step")
def check_fix_decode_loop(candidate):
    refuse_reference(candidate, generate)
    model, prompt = _tiny_lm()
    batch, p = prompt.shape
    for n in DECODE_STEPS:
        call = f"{batch} prompts of {p} tokens, new_tokens={n}"
        with torch.no_grad():
            got = candidate(model, prompt.clone(), n)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise Incorrect(f"{call}: returned {got!r}; return (ids, cache)")
        ids, cache = got
        positions = _cache_positions(cache)
        if not isinstance(ids, torch.Tensor) or positions is None:
            raise Incorrect(f"{call}: returned ({type(ids).__name__}, {type(cache).__name__}); "
                            "return the ids tensor and the KV cache the model filled")
        if tuple(ids.shape) != (batch, p + n):
            raise Incorrect(f"{call}: ids have shape {tuple(ids.shape)}, expected "
                            f"{(batch, p + n)}: the prompt followed by {n} new tokens")
        if not torch.equal(ids[:, :p], prompt):
            raise Incorrect(f"{call}: the first {p} ids are not the prompt any more")
        expected_positions = p + n - 1 if n else 0
        if positions != expected_positions:
            case = (f"{call}: the cache holds {positions} position(s) per sequence, expected "
                    f"{expected_positions} (the prompt and every new token but the last, which "
                    "no step has run through the model yet)")
            if n > 1 and positions == sum(p + i for i in range(n)):
                raise Incorrect(f"{case}. That is {' + '.join(str(p + i) for i in range(n))}: "
                                "every step ran all the ids through the model again, and the "
                                "cache appended their keys and values again. Feed the whole prompt "
                                "once, then only the newest token")
            if n > 1 and positions == n:
                raise Incorrect(f"{case}. The prompt was never run through the model: the first "
                                "step must feed the whole prompt (the prefill), the next ones "
                                "only the newest token")
            if n > 1 and positions == 1:
                raise Incorrect(f"{case}. A new cache each step forgets every earlier token: make "
                                "one cache before the loop and keep it")
            if positions == 0:
                raise Incorrect(f"{case}. The cache you returned is empty: pass it to every "
                                "model call (cache=cache) and return that same cache")
            if positions == expected_positions + 1:
                raise Incorrect(f"{case}. One position too many: a token was run through the "
                                "model twice")
            raise Incorrect(f"{case}. The prefill caches the prompt; each later step feeds only "
                            "the newest token and caches one more position")
        expected = _reference(model, prompt, n)
        if not torch.equal(ids, expected):
            row, col = (ids != expected).nonzero()[0].tolist()
            step = col - p
            case = (f"{call}: new token {step} of row {row} is {int(ids[row, col])}, decoding "
                    f"without a cache gives {int(expected[row, col])}")
            if step == 0:
                raise Incorrect(f"{case}. The first new token comes from the prefill's logits at "
                                "the last prompt position: logits[:, -1], not logits[:, 0]")
            raise Incorrect(f"{case}. Each step must feed exactly the newest token, with the "
                            "cache holding all earlier ones")
    return "same tokens as decoding without a cache, and the cache grows by one position per step"
