"""Lesson 01: the tiny LM, its tokenizer, KV cache, generation and checkpoints."""

import copy
import json
import math
import time

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from lessons_lib.model import (TINY_LM_PATH, CheckpointError, CheckpointNotFoundError, KVCache,
                               ModelConfig, TinyLM, corpus_splits, generate,
                               kv_cache_bytes_per_token, load_checkpoint, load_tiny_lm, perplexity,
                               read_training_record, save_checkpoint)
from lessons_lib.tokenizer import ByteTokenizer

pytestmark = pytest.mark.lesson01

SMALL = ModelConfig(vocab_size=264, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                    max_seq_len=128)
TEXTS = ["Rank 0 sends the activations to rank 1.", "KV缓存保存了键和值。", "GPU"]


@pytest.fixture(scope="module")
def tiny():
    return load_tiny_lm()


def prompt_ids(tok, text):
    return torch.tensor([tok.encode(text)])


# --- tokenizer -------------------------------------------------------------

@pytest.mark.parametrize("text", ["The router sends request 42 to worker 3.", "张量并行把每个权重矩阵切成两份。",
                                  "mixed 混合 text, emoji 🚀", ""])
def test_tokenizer_round_trips_english_and_chinese(text):
    tok = ByteTokenizer()
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text


def test_tokenizer_vocab_splits_evenly_and_handles_broken_bytes():
    tok = ByteTokenizer()
    assert all(tok.vocab_size % tp == 0 for tp in (2, 4, 8))
    assert max(tok.bos_id, tok.eos_id, tok.pad_id) < tok.vocab_size
    broken = tok.encode("张", bos=False)[:2]          # a character cut in half
    assert tok.decode(broken) == "\ufffd"
    with pytest.raises(ValueError, match="padding_side='middle'"):
        tok.encode_batch(["a"], padding_side="middle")


@pytest.mark.parametrize("side", ["left", "right"])
def test_encode_batch_pads_on_the_requested_side(side):
    tok = ByteTokenizer()
    ids, mask = tok.encode_batch(["ab", "abcd"], padding_side=side)
    assert ids.shape == mask.shape == (2, 5)
    expected = [0, 0, 1, 1, 1] if side == "left" else [1, 1, 1, 0, 0]
    assert mask[0].tolist() == expected
    assert tok.decode(ids[0]) == "ab" and (ids[0][mask[0] == 0] == tok.pad_id).all()


# --- config ----------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"n_heads": 6, "n_kv_heads": 4, "dim": 192}, "n_heads=6 is not a multiple of n_kv_heads=4"),
    ({"dim": 130}, "dim=130 is not divisible by n_heads=4"),
    ({"n_layers": 0}, "n_layers=0"),
    ({"vocab_size": -1}, "vocab_size=-1"),
    ({"norm_eps": 0.0}, "norm_eps=0.0"),
])
def test_bad_config_raises_value_error_naming_the_parameter(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**overrides)


# --- the trained checkpoint ------------------------------------------------

def test_trained_checkpoint_loads_and_matches_its_record():
    # Load time is measured in benchmarks/model.py, not here.
    state = torch.random.get_rng_state()
    model, tok = load_tiny_lm()
    assert torch.equal(state, torch.random.get_rng_state())
    assert not model.training and TINY_LM_PATH.stat().st_size <= 8 * 1024 * 1024
    record = read_training_record()
    assert ModelConfig.from_dict(record["config"]) == model.config
    _, valid = corpus_splits()
    measured = perplexity(model, valid[:8000], window=record["training"]["seq_len"])
    # The short slice is noisier than the whole split, but a model that had not
    # learned the corpus would score near 256.
    assert measured < 2 * record["eval"]["valid_perplexity_per_byte"] < 8


def test_cached_greedy_generation_equals_uncached(tiny):
    model, tok = tiny
    ids, mask = tok.encode_batch(["In tensor parallelism,", "路由器把请求"], padding_side="left")
    cached = generate(model, ids, 64, attention_mask=mask, use_cache=True)
    uncached = generate(model, ids, 64, attention_mask=mask, use_cache=False)
    assert cached.shape == (2, ids.shape[1] + 64)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_logits_equal_each_sequence_alone(tiny, side):
    model, tok = tiny
    ids, mask = tok.encode_batch(TEXTS, padding_side=side)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for row, text in enumerate(TEXTS):
            alone = model(prompt_ids(tok, text))[0]
            real = batched[row][mask[row].bool()]
            assert real.shape == alone.shape
            torch.testing.assert_close(real, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_generation_equals_each_prompt_alone(tiny, side):
    model, tok = tiny
    ids, mask = tok.encode_batch(TEXTS, padding_side=side)
    out = generate(model, ids, 16, attention_mask=mask)
    for row, text in enumerate(TEXTS):
        alone = generate(model, prompt_ids(tok, text), 16)
        assert out[row, -16:].tolist() == alone[0, -16:].tolist()


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny):
    model, tok = tiny
    ids = prompt_ids(tok, "The router")
    state = torch.random.get_rng_state()
    runs = {seed: generate(model, ids, 48, greedy=False, temperature=1.5, top_k=50, seed=seed)
            for seed in (0, 1, 2)}
    again = generate(model, ids, 48, greedy=False, temperature=1.5, top_k=50, seed=0)
    assert torch.equal(runs[0], again)
    assert not torch.equal(runs[0], runs[1]) or not torch.equal(runs[0], runs[2])
    assert torch.equal(state, torch.random.get_rng_state())   # a private generator was used


def test_eos_stops_a_row_and_fills_it():
    torch.manual_seed(0)
    model = TinyLM(SMALL).eval()
    ids = torch.tensor([[256, 65, 66]])
    first = generate(model, ids, 1)[0, -1].item()
    out = generate(model, ids, 10, eos_id=first)
    assert out.shape == (1, 4) and out[0, -1].item() == first


# --- KV cache --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_bytes_per_token_matches_real_cache_tensors(tiny, dtype):
    model, tok = tiny
    model = copy.deepcopy(model).to(dtype)
    c = model.config
    ids, mask = tok.encode_batch(TEXTS, padding_side="left")
    cache = model.new_cache()
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
        model(ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1), cache=cache)
    tokens = ids.shape[0] * (ids.shape[1] + 1)
    element = 4 if dtype == torch.float32 else 2
    assert cache.nbytes() / tokens == 2 * c.n_layers * c.n_kv_heads * c.head_dim * element
    assert kv_cache_bytes_per_token(c, dtype) == 2 * c.n_layers * c.n_kv_heads * c.head_dim * element
    assert cache[0].k.shape == (ids.shape[0], c.n_kv_heads, ids.shape[1] + 1, c.head_dim)


# --- built for parallelism applied from outside ---------------------------

def _shard(linear: nn.Linear, rank: int, world: int, dim: int) -> nn.Linear:
    """A copy of ``linear`` holding slice ``rank`` of ``world`` along weight dim ``dim``."""
    w = linear.weight.detach().chunk(world, dim=dim)[rank].clone()
    shard = nn.Linear(w.shape[1], w.shape[0], bias=False)
    shard.weight.data.copy_(w)
    return shard


def test_attention_and_mlp_accept_tensor_parallel_shards_unchanged():
    torch.manual_seed(0)
    model = TinyLM(SMALL).eval()
    layer = model.layers[0]
    x = torch.randn(2, 5, SMALL.dim)
    positions, attn_mask = model.prepare_inputs(torch.zeros(2, 5, dtype=torch.long))
    full = layer.attn(x, positions, attn_mask) + layer.mlp(x)
    hd = SMALL.head_dim
    total = torch.zeros_like(full)
    for rank in range(2):
        shard = copy.deepcopy(layer)
        # Column shards must cut whole heads: the same rows of q and of k/v.
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(shard.attn, name, _shard(getattr(layer.attn, name), rank, 2, 0))
        shard.attn.o_proj = _shard(layer.attn.o_proj, rank, 2, 1)
        shard.mlp.gate_proj = _shard(layer.mlp.gate_proj, rank, 2, 0)
        shard.mlp.up_proj = _shard(layer.mlp.up_proj, rank, 2, 0)
        shard.mlp.down_proj = _shard(layer.mlp.down_proj, rank, 2, 1)
        assert shard.attn.q_proj.out_features == SMALL.n_heads // 2 * hd
        total += shard.attn(x, positions, attn_mask) + shard.mlp(x)   # the all-reduce
    torch.testing.assert_close(total, full, atol=1e-5, rtol=1e-5)


def test_pipeline_stages_built_from_the_public_pieces_match_forward():
    torch.manual_seed(0)
    model = TinyLM(SMALL).eval()
    ids, mask = ByteTokenizer().encode_batch(TEXTS, padding_side="left")
    cache = KVCache(SMALL.n_layers)
    with torch.no_grad():
        positions, attn_mask = model.prepare_inputs(ids, attention_mask=mask)
        h = model.embed(ids)                                  # stage 0
        for i in (0,):
            h = model.layers[i](h, positions=positions, attn_mask=attn_mask, cache=cache[i])
        for i in (1,):                                        # stage 1
            h = model.layers[i](h, positions=positions, attn_mask=attn_mask, cache=cache[i])
        staged = model.lm_head(model.norm(h))
        whole = model(ids, attention_mask=mask)
    torch.testing.assert_close(staged, whole, atol=0, rtol=0)
    assert cache.seq_len == ids.shape[1]


# --- checkpoints -----------------------------------------------------------

def test_checkpoint_round_trip_is_exact(tmp_path):
    torch.manual_seed(1)
    model = TinyLM(SMALL)
    path = save_checkpoint(model, tmp_path / "m.safetensors", {"note": {"steps": 3}})
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads(path.with_suffix(".json").read_text())["note"] == {"steps": 3}


def _no_raw_traceback(err: BaseException) -> None:
    assert err.__cause__ is None and err.__suppress_context__


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="nowhere.safetensors: checkpoint file not found"):
        load_checkpoint(tmp_path / "nowhere.safetensors")
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    data = TINY_LM_PATH.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors: not a readable safetensors file") as info:
        load_checkpoint(bad)
    _no_raw_traceback(info.value)


def test_wrong_shape_and_missing_key_name_the_mismatch(tmp_path):
    model = TinyLM(SMALL)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {"config": SMALL.to_json()}
    tensors["layers.0.attn.q_proj.weight"] = torch.zeros(32, 64)
    save_file(tensors, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"shape.safetensors: layers.0.attn.q_proj.weight has "
                                              r"shape \(32, 64\), config expects \(64, 64\)"):
        load_checkpoint(tmp_path / "shape.safetensors")
    del tensors["norm.weight"]
    tensors["layers.0.attn.q_proj.weight"] = torch.zeros(64, 64)
    save_file(tensors, str(tmp_path / "keys.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"keys.safetensors: missing tensors \['norm.weight'\]"):
        load_checkpoint(tmp_path / "keys.safetensors")


def test_positions_beyond_max_seq_len_are_refused():
    model = TinyLM(SMALL)
    with pytest.raises(ValueError, match="max_seq_len=128"):
        model(torch.zeros(1, SMALL.max_seq_len + 1, dtype=torch.long))
    assert math.isclose(kv_cache_bytes_per_token(SMALL), 2 * 2 * 2 * 16 * 4)


def test_generation_beyond_max_seq_len_is_refused_before_any_work():
    model = TinyLM(SMALL)
    ids = torch.zeros(2, 100, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0                              # padding takes no position
    with pytest.raises(ValueError, match=r"max_new_tokens=29 after a prompt of 100 tokens needs 129 "
                                         r"positions, beyond max_seq_len=128: choose max_new_tokens <= 28"):
        generate(model, ids, 29, attention_mask=mask)
    assert generate(model, ids, 28, attention_mask=mask).shape == (2, 128)


def test_every_legitimate_form_of_the_inputs_still_runs():
    # The checks on the forward's entry must not refuse what callers pass: bool or long masks,
    # int32 or long ids, explicit positions, and a batch of no rows (a data-parallel rank's share).
    torch.manual_seed(0)
    model = TinyLM(SMALL).eval()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
        torch.testing.assert_close(model(ids, attention_mask=mask.bool()), ref)
        torch.testing.assert_close(model(ids.int(), attention_mask=mask), ref)
        torch.testing.assert_close(model(ids, positions=torch.tensor([[0, 0, 1, 2], [0, 1, 2, 3]]),
                                         attention_mask=mask), ref)
        assert model(ids[:0]).shape == (0, 4, SMALL.vocab_size)
    assert generate(model, ids, 2, attention_mask=mask.bool()).shape == (2, 6)
