"""Lesson 17: prefill/decode disaggregation. KV packed to the exact byte, installed in another pool,
decoded token for token as colocated serving does; sealed, versioned, layout-checked, timed out."""

import copy
import random
import time

import pytest
import torch

from lessons_lib.caching.paged_kv import KVBlockPool
from lessons_lib.disaggregation import (CostModel, DecodeWorker, KVLayoutMismatch, ModelVersionMismatch,
                                        PrefillWorker, ScheduleOnlyLM, TransferTimeout, kv_transfer_bytes,
                                        long_prompt_trace, open_transfer, pack_kv, resume_transfer,
                                        run_colocated, run_disaggregated, seal_transfer, unpack_kv)
from lessons_lib.disaggregation.ranks import recv_bytes, serve_on_ranks
from lessons_lib.launch import DistributedError, run_distributed
from lessons_lib.model import ModelConfig, TinyLM, generate, load_tiny_lm
from lessons_lib.serving.security import SecurityError, TensorOpener, TensorSealer, new_key

pytestmark = pytest.mark.lesson17


@pytest.fixture(scope="module")
def model():
    return load_tiny_lm()[0]


def prompts(seed, lengths):
    rng = random.Random(seed)
    return [[rng.randrange(1, 256) for _ in range(n)] for n in lengths]


def alone(model, prompt, n):
    return generate(model, torch.tensor([prompt]), n)[0, len(prompt):].tolist()


def decode_all(worker, finals):
    while worker.has_unfinished_requests():
        finals.update({o.request_id: o.output_token_ids for o in worker.step() if o.finished})


def test_pack_reads_table_order_and_partial_block_exactly():
    pool = KVBlockPool(8, 4, n_layers=3, n_kv_heads=2, head_dim=5)
    for layer in range(3):
        pool.k[layer].copy_(torch.randn_like(pool.k[layer]))
        pool.v[layer].copy_(torch.randn_like(pool.v[layer]))
    table, tokens = [6, 1, 3], 10                      # scattered blocks, the last one half full
    payload = pack_kv(pool, table, tokens)
    assert payload.shape == (2, 3, tokens, 2, 5)
    assert payload.numel() * payload.element_size() == 2 * 3 * 2 * 5 * 4 * tokens
    for t in range(tokens):
        block, offset = table[t // 4], t % 4
        assert torch.equal(payload[0, 2, t], pool.k[2][block, offset])
        assert torch.equal(payload[1, 0, t], pool.v[0][block, offset])
    other = KVBlockPool(8, 4, n_layers=3, n_kv_heads=2, head_dim=5)
    unpack_kv(payload, other, [0, 7, 2])
    assert torch.equal(pack_kv(other, [0, 7, 2], tokens), payload)
    assert other.k[0][2, 2:].abs().sum() == 0          # the slots past the tokens stay untouched


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_disaggregated_equals_colocated_token_for_token(model, block_size):
    ps = prompts(block_size, [1, 5, 16, 17, 40, 129])
    prefill = PrefillWorker(model, block_size=block_size)
    decode = DecodeWorker(model, block_size=block_size, max_num_seqs=4)
    finals = {}
    for i, p in enumerate(ps):
        transfer = prefill.prefill(f"r{i}", p, 9)
        assert transfer.nbytes == kv_transfer_bytes(model.config, len(p)) == 2048 * len(p)
        decode.accept(transfer)
        finals.update({o.request_id: o.output_token_ids for o in decode.step() if o.finished})
    decode_all(decode, finals)
    assert [finals[f"r{i}"] for i in range(len(ps))] == [alone(model, p, 9) for p in ps]
    assert decode.engine.block_manager.num_free_blocks == decode.engine.num_blocks
    assert prefill.pool.allocator.num_free == prefill.pool.allocator.num_blocks


def test_layout_and_version_mismatches_are_named_and_take_nothing(model):
    transfer = PrefillWorker(model, block_size=16).prefill("r", prompts(0, [20])[0], 4)
    cfg = model.config.to_dict()
    for field, value, name in (("n_layers", 2, "n_layers"), ("n_kv_heads", 1, "n_kv_heads")):
        other = TinyLM(ModelConfig.from_dict({**cfg, field: value}))
        worker = DecodeWorker(other, block_size=16)
        worker.fingerprint = transfer.fingerprint         # the layout check, not the version, must catch it
        with pytest.raises(KVLayoutMismatch, match=f"{name}: sent {getattr(model.config, field)}"):
            worker.accept(transfer)
        assert not worker.has_unfinished_requests()
        assert worker.engine.block_manager.num_free_blocks == worker.engine.num_blocks
    with pytest.raises(KVLayoutMismatch, match="block_size: sent 16, this pool has 8"):
        DecodeWorker(model, block_size=8).accept(transfer)
    nudged = copy.deepcopy(model)
    with torch.no_grad():
        nudged.embed.weight[3, 3] += 1e-4
    with pytest.raises(ModelVersionMismatch, match="route the request to a worker of the same version"):
        DecodeWorker(nudged, block_size=16).accept(transfer)


def test_sealed_transfer_round_trip_and_tamper(model):
    key = new_key()
    transfer = PrefillWorker(model).prefill("r", prompts(1, [33])[0], 5)
    sealer, opener = TensorSealer(key, "prefill"), TensorOpener(key)
    messages = seal_transfer(transfer, sealer)
    back = open_transfer(messages, opener)
    assert back.meta() == transfer.meta() and torch.equal(back.payload, transfer.payload)
    with pytest.raises(SecurityError, match="replayed"):
        open_transfer(messages, opener)
    fresh = seal_transfer(transfer, sealer)
    fresh[1] = fresh[1][:-1] + bytes([fresh[1][-1] ^ 1])
    with pytest.raises(SecurityError, match="tampered"):
        open_transfer(fresh, TensorOpener(key))
    with pytest.raises(SecurityError, match="tampered"):
        open_transfer(seal_transfer(transfer, sealer), TensorOpener(new_key()))


def test_on_real_ranks_tokens_bytes_and_refusals(model):
    ps, mt = prompts(5, [3, 16, 31, 250]), [4, 12, 2, 9]
    key = new_key()
    sent, got = serve_on_ranks(ps, mt, key, timeout=20)
    assert got["refused"] == {} and got["all_blocks_free"]
    assert [got["outputs"][f"r{i}"] for i in range(len(ps))] == [alone(model, p, m) for p, m in zip(ps, mt)]
    assert [s["kv_bytes"] for s in sent["sent"]] == [kv_transfer_bytes(model.config, len(p)) for p in ps]
    assert [r["kv_bytes"] for r in got["received"]] == [s["kv_bytes"] for s in sent["sent"]]
    _, got = serve_on_ranks(ps[:3], mt[:3], key, tamper=[1], timeout=20)
    assert list(got["refused"]) == [1] and "tampered" in got["refused"][1]
    assert sorted(got["outputs"]) == ["r0", "r2"]
    _, got = serve_on_ranks(ps[:2], mt[:2], key, decode_block_size=8, timeout=20)
    assert all("KVLayoutMismatch" in why and "block_size" in why for why in got["refused"].values())
    _, got = serve_on_ranks(ps[:2], mt[:2], key, perturb_decode_model=True, timeout=20)
    assert len(got["refused"]) == 2 and all("ModelVersionMismatch" in w for w in got["refused"].values())


def _silent_prefill():
    import torch.distributed as dist
    if dist.get_rank() == 1:
        recv_bytes(0, timeout=1.0)      # rank 0 never sends


def test_a_missing_transfer_times_out_by_name():
    start = time.perf_counter()
    with pytest.raises(DistributedError) as err:
        run_distributed(_silent_prefill, 2, timeout=30)
    assert err.value.remote_type == "TransferTimeout"
    assert "within 1 s" in str(err.value)
    assert time.perf_counter() - start < 25
    assert issubclass(TransferTimeout, TimeoutError)


def test_decode_worker_killed_mid_generation_recovers_by_reprefill(model):
    prompt, max_tokens = prompts(9, [60])[0], 20
    prefill = PrefillWorker(model)
    worker = DecodeWorker(model)
    transfer = prefill.prefill("r", prompt, max_tokens)
    worker.accept(transfer)
    delivered = [transfer.first_token]
    for _ in range(7):
        delivered += [t for o in worker.step() for t in o.new_token_ids]
    del worker                                          # the process died: its pool is gone
    before = prefill.num_prefill_tokens
    again = resume_transfer(prefill, "r", prompt, delivered, max_tokens)
    assert prefill.num_prefill_tokens - before == len(prompt) + len(delivered) == again.num_tokens
    fresh, finals = DecodeWorker(model), {}
    fresh.accept(again)
    decode_all(fresh, finals)
    assert delivered + finals["r"] == alone(model, prompt, max_tokens)
    assert resume_transfer(prefill, "r", prompt, alone(model, prompt, 3), 3) is None


def test_timelines_real_model_and_stand_in_agree(model):
    trace = long_prompt_trace(5, seed=2, prompt_len=(60, 200), max_tokens=(3, 8), mean_gap=300)
    cost = CostModel(step_fixed=64, transfer_per_token=0.5)
    colo = run_colocated(model, trace, cost, n_devices=2, max_num_batched_tokens=128)
    disagg = run_disaggregated(model, trace, cost)
    stand = run_disaggregated(ScheduleOnlyLM(model.config), trace, cost)
    for a in trace:
        assert colo.served[a.request_id].tokens == disagg.served[a.request_id].tokens == \
            alone(model, list(a.prompt), a.max_tokens)
        assert stand.served[a.request_id].token_times == disagg.served[a.request_id].token_times
    assert {kind for dev, *_, kind, _ in disagg.busy if dev.startswith("decode")} == {"decode"}
    assert disagg.transfer_tokens == sum(len(a.prompt) for a in trace)
    s = disagg.summary(ttft_slo=1e9, tpot_slo=1e9)
    assert s["slo_met"] == 1 and s["itl_p99"] >= s["itl_p50"] >= cost.step_fixed
    with pytest.raises(ValueError, match="ttft_slo"):
        disagg.summary(ttft_slo=0, tpot_slo=1)
    with pytest.raises(ValueError, match="arrivals"):
        run_disaggregated(model, [], cost)


def test_bad_arguments_are_named(model):
    with pytest.raises(ValueError, match="max_tokens"):
        serve_on_ranks([[1, 2]], [1], new_key())
    with pytest.raises(ValueError, match="max_tokens >= 2"):
        DecodeWorker(model).accept(PrefillWorker(model).prefill("r", [1, 2, 3], 1))
    with pytest.raises(ValueError, match="block_table"):
        pack_kv(PrefillWorker(model, block_size=4).pool, [0], 9)
