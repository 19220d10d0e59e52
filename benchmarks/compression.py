"""Compression of the tiny LM: bytes, batch-1 decode speed and held-out perplexity, against fp32.

    python benchmarks/compression.py

Perplexity is on the whole held-out split of the corpus. "Linear bytes" counts
every Linear layer's stored weights (float32 weights; int8 codes + bfloat16 row
scales; packed int4 codes + bfloat16 scale/zero pairs); "all bytes" adds the
float32 embedding and norms. Decode rate: greedy, batch 1, best of 15 interleaved rounds, one thread.

A second table repeats the int8-vs-fp32 decode comparison with both models compiled by
torch.compile, which removes most of the per-operation overhead that dominates an eager
decode step of a model this small. A third repeats it on wider models of the same
architecture, to show where weight-only int8 starts to pay on this CPU in eager mode.
"""

from __future__ import annotations

import io
import logging
import warnings

import torch

from lessons_lib.compression import (Measurement, decode_rates, heldout_ids, linear_weight_bytes, load_student,
                                     model_bytes, prune_2_4, prune_mlp_channels, prune_unstructured,
                                     quantize_model)
from lessons_lib.model import generate, load_tiny_lm, perplexity
from lessons_lib.tokenizer import ByteTokenizer

# A step takes about a millisecond, so a round is short and one stall of the machine spoils it:
# many rounds of many tokens let the best round of each model be an undisturbed one.
NEW_TOKENS, ROUNDS = 128, 15


def serialized_bytes(model) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def print_table(title: str, header: str, lines: list[str]) -> None:
    print(title)
    print(header)
    print("-" * len(header))
    print("\n".join(lines))


def main() -> None:
    torch.set_num_threads(1)
    model, _ = load_tiny_lm()
    valid = heldout_ids()
    variants = {
        "fp32": model,
        "pruned 50% (global)": prune_unstructured(model, 0.5),
        "pruned 2:4": prune_2_4(model),
        "pruned MLP channels 50%": prune_mlp_channels(model, 0.5),
        "int8 weight-only": quantize_model(model, "int8"),
        "int4 weight-only g32": quantize_model(model, "int4", group_size=32),
        "student (distilled)": load_student(),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # torch.ao.quantization is deprecated in this torch
        dynamic = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    rates = decode_rates({**variants, "dynamic": dynamic}, new_tokens=NEW_TOKENS, rounds=ROUNDS)
    rows: list[Measurement] = [Measurement(name, linear_weight_bytes(m), model_bytes(m),
                                           perplexity(m, valid), rates[name])
                               for name, m in variants.items()]
    dyn_ppl, dyn_rate = perplexity(dynamic, valid), rates["dynamic"]

    base = rows[0]
    print_table(
        f"tiny LM compression, held-out split ({valid.numel()} bytes), batch-1 greedy decode of {NEW_TOKENS} "
        f"tokens (best of {ROUNDS} interleaved rounds), {torch.get_num_threads()} thread, torch {torch.__version__}",
        f"{'variant':<28} | {'Linear bytes':>12} | {'smaller':>7} | {'all bytes':>9} | "
        f"{'smaller':>7} | {'perplexity':>10} | {'ppl change':>10} | {'tok/s':>6} | {'speed':>6}",
        [f"{r.name:<28} | {r.linear_bytes:>12,} | {base.linear_bytes / r.linear_bytes:>6.2f}x | "
         f"{r.total_bytes:>9,} | {base.total_bytes / r.total_bytes:>6.2f}x | {r.perplexity:>10.4f} | "
         f"{100 * (r.perplexity / base.perplexity - 1):>+9.2f}% | {r.tokens_per_s:>6.0f} | "
         f"{r.tokens_per_s / base.tokens_per_s:>5.2f}x" for r in rows])
    ratio = serialized_bytes(model) / serialized_bytes(dynamic)
    print(f"{'quantize_dynamic (torch.ao)':<28} | {'n/a':>12} | {'':>7} | {'n/a':>9} | {ratio:>6.2f}x | "
          f"{dyn_ppl:>10.4f} | {100 * (dyn_ppl / base.perplexity - 1):>+9.2f}% | {dyn_rate:>6.0f} | "
          f"{dyn_rate / base.tokens_per_s:>5.2f}x")
    print("(quantize_dynamic's size ratio is of torch.save'd state dicts: its packed weights are not "
          "parameters or buffers)")
    int8 = next(r for r in rows if r.name == "int8 weight-only")
    smaller = base.linear_bytes / int8.linear_bytes
    ppl_change = 100 * (int8.perplexity / base.perplexity - 1)
    print(f"goal: int8 at least 3.9x smaller: {smaller:.2f}x ({'met' if smaller >= 3.9 else 'NOT met'}); "
          f"perplexity within +2%: {ppl_change:+.2f}% ({'met' if ppl_change <= 2 else 'NOT met'})")
    compiled_comparison(model, variants["int8 weight-only"])
    width_sweep()


def compiled_comparison(fp32, int8) -> None:
    """int8 vs fp32 decode, eager and compiled, measured side by side.

    An eager decode step of the tiny LM is a few hundred small operations, each paying
    Python and dispatch overhead, and each int8 layer adds two casts (to bfloat16 for the
    kernel and back). torch.compile (Inductor) fuses the casts into the neighbouring
    element-wise kernels (the norm before, the residual add after) and calls the int8
    kernel directly, so what is left to compare is closer to the matmuls themselves.
    """
    torch._logging.set_logs(dynamo=logging.ERROR)   # graph breaks at .item()-style checks are expected
    ids = torch.tensor([ByteTokenizer().encode("The KV cache")])
    eager = {"fp32": fp32, "int8": int8}
    compiled = {name: torch.compile(m, dynamic=True) for name, m in eager.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same = {name: torch.equal(generate(compiled[name], ids, NEW_TOKENS), generate(m, ids, NEW_TOKENS))
                for name, m in eager.items()}       # also compiles each model, outside the timing
        rates = decode_rates({**{f"{n} eager": m for n, m in eager.items()},
                              **{f"{n} compiled": m for n, m in compiled.items()}},
                             new_tokens=NEW_TOKENS, rounds=ROUNDS)
    base = rates["fp32 eager"]
    print_table(
        f"\nint8 vs fp32 decode, eager and torch.compile(dynamic=True) (batch 1, {NEW_TOKENS} tokens, "
        f"best of {ROUNDS} interleaved rounds; compiling is not timed)",
        f"{'mode':<9} | {'fp32 tok/s':>10} | {'int8 tok/s':>10} | {'int8 speed':>10} | "
        f"{'fp32 vs eager fp32':>18} | {'int8 vs eager fp32':>18}",
        [f"{mode:<9} | {rates[f'fp32 {mode}']:>10.0f} | {rates[f'int8 {mode}']:>10.0f} | "
         f"{rates[f'int8 {mode}'] / rates[f'fp32 {mode}']:>9.2f}x | {rates[f'fp32 {mode}'] / base:>17.2f}x | "
         f"{rates[f'int8 {mode}'] / base:>17.2f}x" for mode in ("eager", "compiled")])
    print("greedy tokens, compiled vs eager: " + ", ".join(
        f"{name} {'identical' if ok else 'DIFFERENT'}" for name, ok in same.items()))
    for mode in ("eager", "compiled"):
        speed = rates[f"int8 {mode}"] / rates[f"fp32 {mode}"]
        print(f"goal: int8 decode at batch 1 at least as fast as fp32, both {mode}: {speed:.2f}x "
              f"({'met' if speed >= 1 else 'NOT met'})")


SWEEP_DIMS = (128, 512, 1024)


def width_sweep() -> None:
    """int8 vs fp32 decode speed as the same architecture widens (random weights: speed does not
    depend on their values). Batch-1 decode reads every weight once per token; once the weights
    outgrow the CPU caches that reading is the cost, and int8's 4x fewer bytes show."""
    from lessons_lib.model import ModelConfig, TinyLM

    lines = []
    for dim in SWEEP_DIMS:
        torch.manual_seed(0)
        config = ModelConfig(dim=dim, ffn_dim=3 * dim, n_heads=dim // 32, n_kv_heads=dim // 64)
        fp32 = TinyLM(config).eval()
        rates = decode_rates({"fp32": fp32, "int8": quantize_model(fp32, "int8")}, new_tokens=NEW_TOKENS,
                             rounds=ROUNDS)
        lines.append(f"{dim:>5} | {3 * dim:>5} | {linear_weight_bytes(fp32) / 2 ** 20:>14.1f} | "
                     f"{rates['fp32']:>10.0f} | {rates['int8']:>10.0f} | {rates['int8'] / rates['fp32']:>9.2f}x")
    print_table(
        f"\nint8 vs fp32 decode as the model widens (tiny LM architecture, 4 layers, random weights, "
        f"batch 1, best of {ROUNDS} interleaved rounds)",
        f"{'dim':>5} | {'ffn':>5} | {'fp32 Linear MB':>14} | {'fp32 tok/s':>10} | {'int8 tok/s':>10} | "
        f"{'int8 speed':>10}",
        lines)


if __name__ == "__main__":
    main()
