"""Lesson 15: the serving engine, checked against generate() run on each prompt alone."""

import random

import pytest
import torch

from lessons_lib.caching import BlockAllocator, PrefixCache
from lessons_lib.engine import LLMEngine, SamplingParams
from lessons_lib.model import generate
from lessons_lib.validate import BadArgument
from models import tiny_lm

pytestmark = pytest.mark.lesson15


@pytest.fixture(scope="module")
def model():
    return tiny_lm()


def _trace(seed: int, n: int, shared_prefix: int = 0):
    """``n`` seeded requests: (prompt, max_tokens, step at which it arrives)."""
    rng = random.Random(seed)
    system = [rng.randrange(1, 260) for _ in range(shared_prefix)]
    out = []
    for i in range(n):
        prompt = system + [rng.randrange(1, 260) for _ in range(rng.randrange(2, 40))]
        out.append((prompt, rng.randrange(1, 12), rng.randrange(0, 30)))
    return out


@pytest.fixture(scope="module")
def trace(model):
    """60 requests (a third share a 20-token system prompt) and each one's greedy output alone."""
    requests = _trace(1, 40) + _trace(2, 20, shared_prefix=20)
    reference = [generate(model, torch.tensor([p]), m)[0, len(p):].tolist() for p, m, _ in requests]
    return requests, reference


def _serve(engine, requests):
    """Add each request at its arrival step, step until all finish; {index: tokens}, checking each output."""
    pending = sorted(range(len(requests)), key=lambda i: requests[i][2])
    got, step = {}, 0
    while pending or engine.has_unfinished_requests():
        while pending and requests[pending[0]][2] <= step:
            i = pending.pop(0)
            engine.add_request(f"r{i}", requests[i][0], SamplingParams(max_tokens=requests[i][1]))
        for out in engine.step():
            i = int(out.request_id[1:])
            assert out.new_token_ids == out.output_token_ids[-1:]
            if out.finished:
                got[i] = out.output_token_ids
        step += 1
        assert step < 5000, "the engine stopped making progress"
    return got


def _all_free(engine):
    bm = engine.block_manager
    assert bm.num_free_blocks == engine.num_blocks, "blocks leaked"
    assert all(r == 0 for r in bm.allocator.ref_counts) and not bm.block_tables
    assert not engine.scheduler.running and not engine.scheduler.waiting


CONFIGS = {
    "defaults": dict(),
    "small blocks, small chunks, preempting": dict(block_size=4, num_blocks=36, max_num_seqs=8,
                                                   max_num_batched_tokens=12),
    "one-token blocks": dict(block_size=1, num_blocks=160, max_num_seqs=6, max_num_batched_tokens=20),
    "no prefix caching, no chunking": dict(block_size=8, num_blocks=40, enable_prefix_caching=False,
                                           enable_chunked_prefill=False, max_num_batched_tokens=64),
    "large blocks, one sequence": dict(block_size=32, num_blocks=4, max_num_seqs=1),
}


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
def test_greedy_outputs_equal_generate_alone(model, trace, config):
    requests, reference = trace
    engine = LLMEngine(model, **CONFIGS[config])
    got = _serve(engine, requests)
    wrong = [i for i in range(len(requests)) if got[i] != reference[i]]
    assert not wrong, f"{config}: requests {wrong} differ from generate() alone"
    _all_free(engine)
    stats = engine.stats()
    assert stats.num_generated_tokens == sum(len(r) for r in reference)
    if config == "small blocks, small chunks, preempting":
        assert stats.num_preemptions > 0            # the scenario does exercise preemption
    if CONFIGS[config].get("enable_prefix_caching", True) and config != "large blocks, one sequence":
        assert stats.prefix_hit_rate > 0            # the shared system prompt was found


def test_every_step_respects_the_budget_and_the_pool(model, trace):
    requests, _ = trace
    engine = LLMEngine(model, block_size=4, num_blocks=30, max_num_seqs=5, max_num_batched_tokens=10)
    for i, (prompt, m, _) in enumerate(requests[:20]):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=m))
    while engine.has_unfinished_requests():
        engine.step()
        plan = engine.last_schedule
        assert plan.num_batched_tokens <= 10 and len(engine.scheduler.running) <= 5
        held = sum(len(t) for t in engine.block_manager.block_tables.values())
        assert held <= 30
        for request in engine.scheduler.running:        # blocks cover exactly the computed tokens
            table = engine.block_manager.block_tables[request.request_id]
            assert len(table) == -(-request.num_computed_tokens // 4)
    _all_free(engine)


def test_prefix_caching_skips_the_shared_prompt_and_keeps_outputs(model):
    system = list(range(10, 74))                          # 64 tokens = 4 blocks of 16
    prompts = [system + [100 + i, 101 + i] for i in range(6)]
    reference = [generate(model, torch.tensor([p]), 4)[0, len(p):].tolist() for p in prompts]
    cached = LLMEngine(model, max_num_seqs=1)             # one at a time: each finds the last one's blocks
    outs = cached.generate(prompts, SamplingParams(max_tokens=4))
    assert [o.output_token_ids for o in outs] == reference
    assert [o.num_cached_tokens for o in outs] == [0] + [64] * 5
    plain = LLMEngine(model, max_num_seqs=1, enable_prefix_caching=False)
    plain.generate(prompts, SamplingParams(max_tokens=4))
    assert cached.num_computed_tokens == plain.num_computed_tokens - 5 * 64
    _all_free(cached)


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    prompt = [5, 6, 7, 8, 9]
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=1234)
    alone = LLMEngine(model).generate([prompt], params)[0].output_token_ids
    crowd = LLMEngine(model, block_size=4, max_num_batched_tokens=8)
    others = [[i, i + 1, i + 2] for i in range(20, 30)]
    outs = crowd.generate(others + [prompt], [SamplingParams(max_tokens=6, temperature=0.7, seed=i)
                                              for i in range(10)] + [params])
    assert outs[-1].output_token_ids == alone
    other_seed = LLMEngine(model).generate([prompt], SamplingParams(max_tokens=10, temperature=1.0, seed=99))
    assert other_seed[0].output_token_ids != alone


def test_stop_tokens_and_metrics(model):
    prompt = [1, 2, 3, 4]
    free_run = generate(model, torch.tensor([prompt]), 6)[0, 4:].tolist()
    stop = free_run[2]
    engine = LLMEngine(model)
    out = engine.generate([prompt], SamplingParams(max_tokens=6, stop_token_ids=(stop,)))[0]
    first = free_run.index(stop)
    assert out.output_token_ids == free_run[:first + 1] and out.finish_reason == "stop"
    m = out.metrics
    assert 0 <= m.queue_time <= m.ttft <= m.e2e
    assert len(m.token_times) == len(out.output_token_ids)
    assert len(m.inter_token_latencies) == len(out.output_token_ids) - 1


def test_abort_frees_the_blocks_and_the_rest_go_on(model, trace):
    requests, reference = trace
    engine = LLMEngine(model, block_size=4, num_blocks=60)
    for i in range(6):
        engine.add_request(f"r{i}", requests[i][0], SamplingParams(max_tokens=requests[i][1]))
    done = {out.request_id: out.output_token_ids for out in engine.step() if out.finished}
    engine.abort_request("r2")
    engine.abort_request("r5")
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.output_token_ids
    assert set(done) == {"r0", "r1", "r3", "r4"}
    assert all(done[f"r{i}"] == reference[i] for i in (0, 1, 3, 4))
    _all_free(engine)


BAD = {
    "prompt beyond the context": (lambda e: e.add_request("x", [1] * 1020, SamplingParams(max_tokens=8)),
                                  "max_seq_len=1024"),
    "prompt beyond the pool": (lambda e: e.add_request("x", [1] * 70, SamplingParams(max_tokens=8)),
                               "num_blocks x block_size = 64 tokens"),
    "duplicate id": (lambda e: (e.add_request("x", [1, 2]), e.add_request("x", [3])), "already queued"),
    "unknown id to abort": (lambda e: e.abort_request("nobody"), "the id of an unfinished request"),
    "max_tokens 0": (lambda e: e.add_request("x", [1], SamplingParams(max_tokens=0)), "max_tokens=0"),
    "negative temperature": (lambda e: SamplingParams(temperature=-1.0), "temperature=-1.0"),
    "text prompt": (lambda e: e.add_request("x", "hello"), "encode it with the tokenizer"),
    "token out of range": (lambda e: e.add_request("x", [1, 999]), "[0, 264)"),
    "params as a dict": (lambda e: e.add_request("x", [1], {"max_tokens": 3}), "SamplingParams"),
    "stop ids as an int": (lambda e: SamplingParams(stop_token_ids=3), "a tuple of token ids"),
    "empty prompt list": (lambda e: e.generate([]), "a non-empty list of prompts"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_refused_by_name_and_leaks_nothing(model, case):
    engine = LLMEngine(model, block_size=16, num_blocks=4, max_num_seqs=2)
    action, fragment = BAD[case]
    with pytest.raises(BadArgument, match=fragment.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        action(engine)
    for rid in list(engine.requests):
        engine.abort_request(rid)
    _all_free(engine)


def test_engine_arguments_are_checked(model):
    with pytest.raises(BadArgument, match="num_blocks=2 .*one block per running sequence"):
        LLMEngine(model, num_blocks=2, max_num_seqs=4)
    with pytest.raises(BadArgument, match="max_num_batched_tokens=0"):
        LLMEngine(model, max_num_batched_tokens=0)
    with pytest.raises(BadArgument, match="a prompt of 40 tokens.*max_num_batched_tokens=32"):
        LLMEngine(model, enable_chunked_prefill=False, max_num_batched_tokens=32).add_request("x", [1] * 40)
    with pytest.raises(BadArgument, match="model="):
        LLMEngine(torch.nn.Linear(2, 2))


def test_prefix_cache_evicts_a_prefix_from_its_tail():
    """Four cached blocks of one prompt, one eviction: the first three still match."""
    alloc = BlockAllocator(4, 2)
    cache = PrefixCache(alloc)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    table = [cache.allocate() for _ in range(4)]
    cache.register(tokens, table)
    cache.release(table)
    evicted = cache.allocate()
    assert evicted == table[-1]
    blocks, n = cache.match(tokens)
    assert blocks == table[:3] and n == 6


def test_a_prefilled_request_is_refused_by_name_and_takes_nothing(model):
    engine = LLMEngine(model, block_size=4, num_blocks=4, max_num_seqs=2)
    engine.add_request("big", list(range(1, 13)), SamplingParams(max_tokens=4))   # 3 of 4 blocks
    engine.step()
    with pytest.raises(BadArgument, match="max_tokens >= 2"):
        engine.add_prefilled_request("p", [1, 2], SamplingParams(max_tokens=1), 5, lambda pool, table: None)
    with pytest.raises(BadArgument, match="fits the free blocks"):
        engine.add_prefilled_request("p", list(range(1, 9)), SamplingParams(max_tokens=3), 5,
                                     lambda pool, table: None)
    assert set(engine.requests) == {"big"} and engine.block_manager.num_free_blocks == 1
    engine.abort_request("big")
    _all_free(engine)
