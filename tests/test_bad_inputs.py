"""Bad input to the model, tokenizer, calculators, caching, placement and parallel plans.

Every case is refused before any work, with a ``BadArgument`` (both a ``ValueError`` and a
``TypeError``) whose message names the parameter: never an ``IndexError`` from deep inside torch,
a ``ZeroDivisionError``, or a number computed from an impossible size.
"""

import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from lessons_lib.caching import (BlockAllocator, KVBlockPool, ModelCache, PagedSequenceCache, PrefixCache,
                                 blocks_needed, prefill)
from lessons_lib.cluster.multinode import torchrun_command
from lessons_lib.cluster.placement import check_plan, cross_node_bytes_per_token, place_ranks
from lessons_lib.comm.cost_model import (bus_bandwidth, crossover_bytes, fit_alpha_beta, predict_all_reduce,
                                         predict_ring_all_reduce, ring_all_reduce_terms, time_all_reduce)
from lessons_lib.model import (KVCache, LayerKVCache, ModelConfig, TinyLM, generate, kv_cache_bytes_per_token,
                               mean_nll, random_windows, sample_next_token)
from lessons_lib.model.perplexity import corpus_splits
from lessons_lib.parallel.mesh import groups_along, mesh_grid, mesh_sizes
from lessons_lib.parallel.plan import parallelize, validate_tp
from lessons_lib.parallel.tensor import shard_indices
from lessons_lib.sizing import LLAMA2_70B, LLMShape, batch_sweep, fits, kv_cache_bytes, memory_per_device
from lessons_lib.tokenizer import ByteTokenizer
from lessons_lib.validate import BadArgument
from lessons_lib.viz.kv_blocks import block_timeline
from lessons_lib.viz.memory import memory_report
from lessons_lib.viz.pipeline import gantt_data
from lessons_lib.viz.queues import queue_series
from lessons_lib.viz.ring import ring_frame
from lessons_lib.viz.sharding import sharding_layout

pytestmark = [pytest.mark.lesson01, pytest.mark.lesson02, pytest.mark.lesson03, pytest.mark.lesson04,
              pytest.mark.lesson10, pytest.mark.lesson12]

CONFIG = ModelConfig(vocab_size=264, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                     max_seq_len=64)
torch.manual_seed(0)
MODEL = TinyLM(CONFIG).eval()
TOK = ByteTokenizer()
IDS = torch.tensor([[256, 72, 105]])
POOL_SHAPE = dict(n_layers=1, n_kv_heads=1, head_dim=16)


def _update_mismatched():
    LayerKVCache().update(torch.zeros(1, 1, 2, 16), torch.zeros(1, 1, 3, 16))


def _take_99():
    BlockAllocator(4, 2).take(99)


def _free_a_free_block():
    BlockAllocator(4, 2).free(0)


def _release_twice():
    alloc = BlockAllocator(4, 2)
    block = alloc.allocate()
    PrefixCache(alloc).release([block, block])


def _prefill_with_another_pools_cache():
    pool = KVBlockPool.for_model(CONFIG, 4, 4)
    prefill(MODEL, [256, 1], pool, PrefixCache(BlockAllocator(4, 4)))


def _model_cache(**kwargs):
    return ModelCache(lambda name: nn.Linear(2, 1), **{"budget_bytes": 100, **kwargs})


def _no_result():
    return SimpleNamespace(timeline=[(0.0, "w0", 1), (1.0, "w0", 0)])


# (id, call, the parameter its message must name)
CASES = [
    # -- the model's forward ----------------------------------------------------------------
    ("model-id-beyond-vocab", lambda: MODEL(torch.tensor([[1, 264]])), "input_ids"),
    ("model-negative-id", lambda: MODEL(torch.tensor([[-1, 2]])), "input_ids"),
    ("model-float-ids", lambda: MODEL(IDS.float()), "input_ids"),
    ("model-bool-ids", lambda: MODEL(IDS > 100), "input_ids"),
    ("model-uint8-ids", lambda: MODEL(IDS.to(torch.uint8).clamp(max=200)), "input_ids"),
    ("model-empty-prefill", lambda: MODEL(torch.zeros(1, 0, dtype=torch.long)), "input_ids"),
    ("model-1d-ids", lambda: MODEL(IDS[0]), "input_ids"),
    ("model-list-ids", lambda: MODEL([[1, 2]]), "input_ids"),
    ("model-mask-of-2s", lambda: MODEL(IDS, attention_mask=torch.full((1, 3), 2)), "attention_mask"),
    ("model-mask-float", lambda: MODEL(IDS, attention_mask=torch.full((1, 3), 0.5)), "attention_mask"),
    ("model-mask-shape", lambda: MODEL(IDS, attention_mask=torch.ones(1, 4, dtype=torch.long)),
     "attention_mask"),
    ("model-negative-positions", lambda: MODEL(IDS, positions=torch.tensor([[-1, 0, 1]])), "positions"),
    ("model-positions-beyond-context", lambda: MODEL(IDS, positions=torch.tensor([[0, 1, 64]])),
     "positions"),
    ("model-too-long", lambda: MODEL(torch.zeros(1, 65, dtype=torch.long)), "input_ids"),
    # -- config and KV cache --------------------------------------------------------------------
    ("config-n_heads-0", lambda: ModelConfig(n_heads=0), "n_heads"),
    ("config-dim-not-divisible", lambda: ModelConfig(dim=130), "n_heads"),
    ("config-kv-heads-not-dividing", lambda: ModelConfig(n_kv_heads=3), "n_kv_heads"),
    ("config-norm_eps-nan", lambda: ModelConfig(norm_eps=float("nan")), "norm_eps"),
    ("config-bool-size", lambda: ModelConfig(max_seq_len=True), "max_seq_len"),
    ("kvcache-0-layers", lambda: KVCache(n_layers=0), "n_layers"),
    ("kvcache-k-v-mismatch", _update_mismatched, "v"),
    ("kvcache-bytes-dtype-string", lambda: kv_cache_bytes_per_token(CONFIG, "bf16"), "dtype"),
    # -- generate ---------------------------------------------------------------------------------
    ("generate-max_new_tokens-True", lambda: generate(MODEL, IDS, True), "max_new_tokens"),
    ("generate-max_new_tokens-negative", lambda: generate(MODEL, IDS, -1), "max_new_tokens"),
    ("generate-max_new_tokens-float", lambda: generate(MODEL, IDS, 2.0), "max_new_tokens"),
    ("generate-temperature-nan", lambda: generate(MODEL, IDS, 2, greedy=False, temperature=float("nan")),
     "temperature"),
    ("generate-top_k-0", lambda: generate(MODEL, IDS, 2, greedy=False, top_k=0), "top_k"),
    ("generate-id-beyond-vocab", lambda: generate(MODEL, torch.tensor([[1, 300]]), 2), "input_ids"),
    ("generate-bool-tokens", lambda: generate(MODEL, IDS > 0, 2), "input_ids"),
    ("generate-empty-prompt", lambda: generate(MODEL, torch.zeros(1, 0, dtype=torch.long), 2), "input_ids"),
    ("generate-mask-of-2s", lambda: generate(MODEL, IDS, 2, attention_mask=torch.full((1, 3), 2)),
     "attention_mask"),
    ("generate-mask-all-padding", lambda: generate(MODEL, IDS, 2, attention_mask=torch.zeros(1, 3, dtype=torch.long)),
     "attention_mask"),
    ("generate-eos-beyond-vocab", lambda: generate(MODEL, IDS, 2, eos_id=264), "eos_id"),
    ("sample-temperature-0", lambda: sample_next_token(torch.zeros(1, 8), greedy=False, temperature=0),
     "temperature"),
    # -- perplexity -------------------------------------------------------------------------------
    ("nll-window-1", lambda: mean_nll(MODEL, IDS[0], window=1), "window"),
    ("nll-window-beyond-context", lambda: mean_nll(MODEL, IDS[0], window=65), "window"),
    ("nll-id-beyond-vocab", lambda: mean_nll(MODEL, torch.tensor([1, 2, 999])), "ids"),
    ("nll-batch_size-0", lambda: mean_nll(MODEL, IDS[0], window=8, batch_size=0), "batch_size"),
    ("splits-valid_fraction-1", lambda: corpus_splits(valid_fraction=1.0), "valid_fraction"),
    ("windows-seq_len-too-long",
     lambda: random_windows(IDS[0], 2, 3, torch.Generator().manual_seed(0)), "seq_len"),
    # -- tokenizer --------------------------------------------------------------------------------
    ("decode-id-beyond-vocab", lambda: TOK.decode([72, 300]), "ids"),
    ("decode-negative-id", lambda: TOK.decode(torch.tensor([72, -1])), "ids"),
    ("decode-float-id", lambda: TOK.decode([72, 1.5]), "ids"),
    ("decode-bool-id", lambda: TOK.decode([True]), "ids"),
    ("decode-2d-tensor", lambda: TOK.decode(IDS), "ids"),
    ("encode-bytes", lambda: TOK.encode(b"hello"), "text"),
    ("encode-none", lambda: TOK.encode(None), "text"),
    ("encode_batch-bare-string", lambda: TOK.encode_batch("hello"), "texts"),
    ("encode_batch-non-str-item", lambda: TOK.encode_batch(["a", 3]), r"texts\[1\]"),
    # -- memory and throughput calculators ---------------------------------------------------------
    ("kv-bytes-negative-batch", lambda: kv_cache_bytes(LLAMA2_70B, -1, 4096), "batch"),
    ("memory-tensor-3-devices", lambda: memory_per_device(LLAMA2_70B, devices=3, strategy="tensor"),
     "devices"),
    ("memory-bool-devices", lambda: memory_per_device(LLAMA2_70B, devices=True, strategy="tensor"),
     "devices"),
    ("memory-negative-context", lambda: memory_per_device(LLAMA2_70B, context=-4096), "context"),
    ("shape-negative-layers", lambda: LLMShape("x", -2, 64, 4, 4, 128, 100), "n_layers"),
    ("shape-heads-not-dividing", lambda: LLMShape("x", 2, 64, 5, 5, 128, 100), "n_heads"),
    ("fits-headroom-1", lambda: fits(memory_per_device(LLAMA2_70B), 80, headroom=1.0), "headroom"),
    ("fits-headroom-nan", lambda: fits(memory_per_device(LLAMA2_70B), 80, headroom=float("nan")),
     "headroom"),
    ("fits-device_gib-0", lambda: fits(memory_per_device(LLAMA2_70B), 0, headroom=0.1), "device_gib"),
    ("memory-micro_batches-without-pipeline",
     lambda: memory_per_device(LLAMA2_70B, devices=2, strategy="tensor", micro_batches=2), "micro_batches"),
    ("memory-micro_batches-over-batch",
     lambda: memory_per_device(LLAMA2_70B, batch=2, devices=2, strategy="pipeline", micro_batches=3),
     "micro_batches"),
    ("report-device_gib-negative",
     lambda: memory_report("Llama-2-7B", "bf16", 1, 4096, 1, "single", -80), "device_gib"),
    ("sweep-new_tokens-0", lambda: batch_sweep(MODEL, (1,), new_tokens=0), "new_tokens"),
    ("sweep-negative-batch", lambda: batch_sweep(MODEL, (2, -1)), r"batch_sizes\[1\]"),
    # -- communication cost model -------------------------------------------------------------------
    ("ring-p-1", lambda: predict_ring_all_reduce(1024, 1, 1e-5, 1e-9), "p"),
    ("ring-negative-bytes", lambda: ring_all_reduce_terms(-5, 4), "n_bytes"),
    ("ring-alpha-nan", lambda: predict_ring_all_reduce(1024, 2, float("nan"), 1e-9), "alpha"),
    ("busbw-0-seconds", lambda: bus_bandwidth(1e9, 0, 4), "seconds"),
    ("fit-negative-time", lambda: fit_alpha_beta([(1024, 2, 1e-5), (2048, 2, -1e-5)]),
     r"samples\[1\] seconds"),
    ("time-all-reduce-impl", lambda: time_all_reduce([1024], impl="nccl"), "impl"),
    ("time-all-reduce-negative-warmup", lambda: time_all_reduce([1024], warmup=-1), "warmup"),
    ("all-reduce-algorithm", lambda: predict_all_reduce("tree", 1024, 4, 1e-5, 1e-9), "algorithm"),
    ("all-reduce-one-rank", lambda: predict_all_reduce("one_shot", 1024, 1, 1e-5, 1e-9), "p"),
    ("crossover-beta-0", lambda: crossover_bytes("one_shot", "ring", 4, 1e-5, 0.0), "beta"),
    # -- caching ------------------------------------------------------------------------------------
    ("allocator-take-99", _take_99, "block"),
    ("allocator-free-a-free-block", _free_a_free_block, "block"),
    ("allocator-0-blocks", lambda: BlockAllocator(0, 4), "num_blocks"),
    ("blocks_needed-block_size-0", lambda: blocks_needed(10, 0), "block_size"),
    ("blocks_needed-negative-tokens", lambda: blocks_needed(-1, 4), "num_tokens"),
    ("pool-head_dim-0", lambda: KVBlockPool(4, 4, 1, 1, 0), "head_dim"),
    ("pool-int-dtype", lambda: KVBlockPool(4, 4, **POOL_SHAPE, dtype=torch.int64), "dtype"),
    ("paged-num_cached-beyond-blocks",
     lambda: PagedSequenceCache(KVBlockPool(4, 4, **POOL_SHAPE), [0], num_cached=5), "num_cached"),
    ("prefill-id-beyond-vocab", lambda: prefill(MODEL, [256, 999], KVBlockPool.for_model(CONFIG, 4, 4)), "ids"),
    ("prefill-empty", lambda: prefill(MODEL, [], KVBlockPool.for_model(CONFIG, 4, 4)), "ids"),
    ("prefill-text", lambda: prefill(MODEL, "hello", KVBlockPool.for_model(CONFIG, 4, 4)), "ids"),
    ("prefill-other-pools-cache", _prefill_with_another_pools_cache, "prefix_cache"),
    ("prefix-release-twice", _release_twice, "blocks"),
    ("model-cache-bool-budget", lambda: _model_cache(budget_bytes=True), "budget_bytes"),
    ("model-cache-policy", lambda: _model_cache(policy="fifo"), "policy"),
    ("model-cache-name-not-str", lambda: _model_cache().get(3), "name"),
    ("model-cache-warm-up-bare-string", lambda: _model_cache().warm_up("ab"), "names"),
    ("model-cache-negative-size", lambda: _model_cache(size_of=lambda m: -1).get("a"), r"size_of\('a'\)"),
    # -- placement and torchrun -------------------------------------------------------------------
    ("place-tp-negative", lambda: place_ranks(2, 4, tp=-2, pp=-4, dp=1), "tp"),
    ("place-order-string", lambda: place_ranks(2, 4, 4, 2, order="dpt"), "order"),
    ("place-ranks-vs-devices", lambda: check_plan(2, 4, 4, 4, 1), "tp x pp x dp"),
    ("cross-node-hidden-0", lambda: cross_node_bytes_per_token(place_ranks(2, 4, 4, 2), 0, 8), "hidden"),
    ("cross-node-layers-not-divisible",
     lambda: cross_node_bytes_per_token(place_ranks(2, 4, 4, 2), 64, 3), "n_layers"),
    ("torchrun-port-0", lambda: torchrun_command(2, 0, 2, 0), "port"),
    # -- mesh, plan and shards ------------------------------------------------------------------------
    ("mesh-grid-bool-tp", lambda: mesh_grid(tp=True), "tp"),
    ("mesh-tp-pp-not-dividing-world", lambda: mesh_sizes(4, tp=3), "tp x pp"),
    ("mesh-sizes-not-the-world", lambda: mesh_sizes(4, 2, 1, 1), "tp x pp x dp"),
    ("mesh-negative-dp", lambda: mesh_sizes(4, 2, 2, -1), "dp"),
    ("mesh-axis", lambda: groups_along(mesh_grid(2), "cp"), "axis"),
    ("plan-tp-negative", lambda: validate_tp(CONFIG, -2), "tp"),
    ("plan-tp-not-dividing-heads", lambda: validate_tp(ModelConfig(), 3), "tp"),
    ("plan-not-a-config", lambda: validate_tp("tiny", 2), "config"),
    ("plan-empty", lambda: parallelize(MODEL, {}), "plan"),
    ("shard-tp-0", lambda: shard_indices(8, 0, 0), "tp"),
    ("shard-rank-beyond-tp", lambda: shard_indices(8, 2, 2), "rank"),
    ("shard-unit-0", lambda: shard_indices(8, 2, 0, unit=0), "unit"),
    # -- the visualisers' pure functions --------------------------------------------------------------
    ("ring-frame-negative-step", lambda: ring_frame(4, -1), "step"),
    ("gantt-0-stages", lambda: gantt_data(0, 4), "n_stages"),
    ("sharding-world-negative", lambda: sharding_layout("tp", -2), "world_size"),
    ("blocks-timeline-negative-tokens", lambda: block_timeline([("arrive", "A", -3)]),
     r"events\[0\] n_tokens"),
    ("blocks-timeline-short-event", lambda: block_timeline([("arrive", "A")]), r"events\[0\]"),
    ("queues-1-point", lambda: queue_series(_no_result(), n_points=1), "n_points"),
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("call, name", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_the_parameter(call, name):
    with pytest.raises(BadArgument, match=rf"(^|\W){name}=.* is not valid: expected ") as info:
        call()
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


def test_the_case_ids_are_unique_and_many():
    ids = [c[0] for c in CASES]
    assert len(set(ids)) == len(ids) >= 45
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in ids)
