"""Lesson 16: speculative decoding is the target's own decoding, faster or not.

Greedy: token-identical to ``generate(target)``. Sampling: the kept tokens follow the target's
distribution, by a chi-square test at significance 0.001 (fixed seeds, so the test is
deterministic; a rule that is wrong fails it by a wide margin, which the negative controls show).
"""

import math
import random

import pytest
import torch

from lessons_lib.compression import load_student
from lessons_lib.model import KVCache, ModelConfig, TinyLM, generate, load_tiny_lm
from lessons_lib.speculative import (SpeculativeStats, check_draft_compatible, chi_square,
                                     expected_speedup, expected_tokens_per_forward, greedy_verify,
                                     rejection_verify, speculative_generate)
from lessons_lib.viz.speculative import draw_round, round_cells, round_summary, round_widget
from lessons_lib.tokenizer import ByteTokenizer
from lessons_lib.validate import BadArgument

pytestmark = pytest.mark.lesson16

SIGNIFICANCE = 0.001
SMALL = ModelConfig(vocab_size=264, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=40)


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    target, tok = load_tiny_lm()
    return target, load_student(), tok


def _small(seed):
    torch.manual_seed(seed)
    return TinyLM(SMALL).eval()


# -- the KV cache rolls back ---------------------------------------------------------------------
def test_truncate_then_continue_equals_a_cache_that_never_saw_the_dropped_tokens():
    model = _small(0)
    ids = torch.randint(0, 264, (1, 12), generator=torch.Generator().manual_seed(1))
    rolled, fresh = model.new_cache(), model.new_cache()
    with torch.no_grad():
        model(ids[:, :10], cache=rolled)
        rolled.truncate(6)
        assert rolled.seq_len == 6 and all(layer.seq_len == 6 for layer in rolled.layers)
        a = model(ids[:, 10:12], cache=rolled)
        model(ids[:, :6], cache=fresh)
        b = model(ids[:, 10:12], cache=fresh)
    torch.testing.assert_close(a, b)


def test_truncate_edges():
    model = _small(0)
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
    cache.truncate(3)                      # nothing dropped
    assert cache.seq_len == 3
    cache.truncate(0)
    assert cache.seq_len == 0 and cache.nbytes() == 0
    KVCache().truncate(0)                  # an empty cache may be truncated to nothing
    for n in (-1, 1, 2.0, True):
        with pytest.raises(BadArgument, match="n="):
            cache.truncate(n)


def test_truncate_refuses_a_half_updated_cache():
    cache = KVCache(2)
    cache[0].update(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))
    cache[1].update(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))
    with pytest.raises(ValueError, match="different numbers of positions"):
        cache.truncate(1)


# -- greedy: the target's own output -------------------------------------------------------------
PROMPTS = ["The KV cache", "Each rank holds", "A router sends the request", "x"]


def test_greedy_is_token_identical_to_generate_for_k_1_to_8(models):
    target, draft, tok = models
    rng = random.Random(0)
    for text in PROMPTS:
        prompt = tok.encode(text) + [rng.randrange(1, 256) for _ in range(rng.randrange(0, 4))]
        expected = generate(target, torch.tensor([prompt]), 20)
        for k in range(1, 9):
            ids, stats = speculative_generate(target, draft, prompt, 20, num_speculative_tokens=k)
            assert torch.equal(ids, expected), (text, k)
            assert stats.generated == 20
            assert stats.draft_forwards == sum(p for p, _ in stats.rounds)
            assert sum(a + 1 for _, a in stats.rounds) >= 20


def test_greedy_with_random_models_and_a_weak_draft():
    target, draft = _small(1), _small(2)        # unrelated weights: almost every proposal rejected
    for k in (1, 3, 8):
        ids, stats = speculative_generate(target, draft, [5, 6, 7], 20, num_speculative_tokens=k)
        assert torch.equal(ids, generate(target, torch.tensor([[5, 6, 7]]), 20))
        assert stats.target_forwards <= 20


def test_the_context_limit_is_reached_exactly_and_never_passed():
    target, draft = _small(3), _small(4)
    prompt = list(range(1, 11))
    ids, _ = speculative_generate(target, draft, prompt, SMALL.max_seq_len - 10, num_speculative_tokens=8)
    assert ids.shape[1] == SMALL.max_seq_len
    assert torch.equal(ids, generate(target, torch.tensor([prompt]), SMALL.max_seq_len - 10))
    ids, stats = speculative_generate(target, target, prompt, SMALL.max_seq_len - 10, num_speculative_tokens=8)
    assert stats.rounds[-1][0] < 8       # the last round proposed only what was still wanted


def test_eos_stops_like_generate(models):
    target, draft, tok = models
    prompt = tok.encode("The KV cache")
    plain = generate(target, torch.tensor([prompt]), 30)[0, len(prompt):].tolist()
    eos = plain[9]                           # a token the target emits mid-answer
    expected = generate(target, torch.tensor([prompt]), 30, eos_id=eos)
    for k in (1, 4, 7):
        ids, stats = speculative_generate(target, draft, prompt, 30, num_speculative_tokens=k, eos_id=eos)
        assert torch.equal(ids, expected), k
        assert ids[0, -1].item() == eos and stats.generated == ids.shape[1] - len(prompt)


def test_a_draft_that_is_the_target_emits_k_plus_1_tokens_per_forward(models):
    target, _, tok = models
    ids, stats = speculative_generate(target, target, tok.encode("Each rank"), 40, num_speculative_tokens=4)
    assert stats.acceptance_rate == 1.0
    assert stats.target_forwards == math.ceil(40 / 5)
    assert stats.tokens_per_target_forward == 40 / 8
    assert all(a == p for p, a in stats.rounds)


def test_stats_per_position():
    stats = SpeculativeStats(3, rounds=[(3, 3), (3, 0), (3, 1), (2, 2)], draft_forwards=11, generated=10)
    assert stats.proposed_per_position() == [4, 3, 1]     # position i is judged if 1..i-1 were accepted
    assert stats.accepted_per_position() == [3, 2, 1]
    assert stats.acceptance_rate == 6 / 8
    assert stats.full_rounds() == [(3, 3), (3, 0), (3, 1)]
    assert stats.tokens_per_target_forward == 10 / 4


def test_expected_formulas():
    assert expected_tokens_per_forward(0.0, 4) == 1.0
    assert expected_tokens_per_forward(1.0, 4) == 5.0
    assert math.isclose(expected_tokens_per_forward(0.8, 4), 1 + 0.8 + 0.64 + 0.512 + 0.4096)
    assert math.isclose(expected_speedup(0.8, 4, 0.0), expected_tokens_per_forward(0.8, 4))
    assert math.isclose(expected_speedup(0.8, 4, 0.25), 3.3616 / 2)
    for bad in (dict(alpha=1.5, k=2), dict(alpha=0.5, k=-1), dict(alpha=float("nan"), k=1)):
        with pytest.raises(BadArgument):
            expected_tokens_per_forward(**bad)


def test_greedy_verify():
    logits = torch.full((4, 10), -1.0)
    for row, token in enumerate([3, 4, 9, 2]):
        logits[row, token] = 1.0
    assert greedy_verify([3, 4, 5], logits) == (2, 9)
    assert greedy_verify([3, 4, 9], logits) == (3, 2)        # all accepted: the bonus from the last row
    assert greedy_verify([0, 4, 9], logits) == (0, 3)
    assert greedy_verify([], logits[:1]) == (0, 3)


# -- sampling: lossless --------------------------------------------------------------------------
def _first_tokens(rule, p, q, draws, seed=0):
    """The first kept token of ``draws`` one-proposal rounds (proposal drawn from q[0])."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(p.shape[-1])
    accepted = 0
    for _ in range(draws):
        d = int(torch.multinomial(q[0], 1, generator=gen))
        m, token = rule([d], q, p, gen)
        counts[d if m == 1 else token] += 1
        accepted += m
    return counts, accepted / draws


def test_rejection_sampling_keeps_the_target_distribution_on_a_small_vocabulary():
    p = torch.tensor([[0.45, 0.25, 0.15, 0.10, 0.05, 0.0], [0.2] * 5 + [0.0]])
    q = torch.tensor([[0.10, 0.10, 0.30, 0.20, 0.20, 0.10]])
    counts, acceptance = _first_tokens(rejection_verify, p, q, 8000)
    _, _, p_value = chi_square(counts, p[0])
    assert p_value > SIGNIFICANCE
    assert abs(acceptance - float(torch.minimum(p[0], q[0]).sum())) < 0.02
    assert counts[5] == 0                    # a token the target never produces never appears


def test_the_chi_square_test_rejects_rules_that_are_not_lossless():
    p = torch.tensor([[0.45, 0.25, 0.15, 0.10, 0.05, 0.0], [0.2] * 5 + [0.0]])
    q = torch.tensor([[0.10, 0.10, 0.30, 0.20, 0.20, 0.10]])

    def always_accept(proposal, q, p, gen):
        return 1, 0

    def resample_from_target(proposal, q, p, gen):       # rejection right, residual wrong
        if torch.rand((), generator=gen) * q[0, proposal[0]] <= p[0, proposal[0]]:
            return 1, 0
        return 0, int(torch.multinomial(p[0], 1, generator=gen))

    for rule in (always_accept, resample_from_target):
        counts, _ = _first_tokens(rule, p, q, 4000)
        assert chi_square(counts, p[0])[2] < 1e-6, rule.__name__


def test_rejection_sampling_on_the_real_models_distributions(models):
    target, draft, tok = models
    prompt = torch.tensor([tok.encode("The cache")])
    with torch.no_grad():
        p = torch.softmax(target(prompt)[0, -1:].float(), -1).repeat(2, 1)
        q = torch.softmax(draft(prompt)[0, -1:].float() * 0.5, -1)     # a flattened draft: many rejections
    counts, acceptance = _first_tokens(rejection_verify, p, q, 8000, seed=3)
    assert chi_square(counts, p[0])[2] > SIGNIFICANCE
    assert abs(acceptance - float(torch.minimum(p[0], q[0]).sum())) < 0.02


def test_speculative_sampling_end_to_end_first_token(models):
    target, draft, tok = models
    prompt = tok.encode("Each ")
    with torch.no_grad():
        p = torch.softmax(target(torch.tensor([prompt]))[0, -1].float() / 1.5, -1)
    counts = torch.zeros(264)
    for seed in range(250):
        ids, _ = speculative_generate(target, draft, prompt, 2, num_speculative_tokens=3,
                                      temperature=1.5, seed=seed)
        counts[ids[0, len(prompt)]] += 1
    assert chi_square(counts, p)[2] > SIGNIFICANCE


def test_sampling_is_reproducible_with_a_seed(models):
    target, draft, tok = models
    runs = [speculative_generate(target, draft, tok.encode("A rank"), 16, temperature=1.0, seed=7)[0]
            for _ in range(2)]
    assert torch.equal(*runs)


def test_chi_square_by_hand():
    stat, dof, p_value = chi_square([30, 20, 50], [0.3, 0.2, 0.5])
    assert (stat, dof) == (0.0, 2) and p_value == pytest.approx(1.0)
    stat, dof, p_value = chi_square([40, 60], [0.5, 0.5])
    assert stat == pytest.approx(4.0) and dof == 1 and p_value == pytest.approx(0.0455, abs=1e-4)
    assert chi_square([0, 10, 0], [0.5, 0.5, 0.0])[2] < 0.01
    assert chi_square([5, 5, 1], [0.5, 0.5, 0.0]) == (math.inf, 0, 0.0)
    with pytest.raises(BadArgument):
        chi_square([1, 2], [0.5, 0.6])


# -- bad input -----------------------------------------------------------------------------------
def test_bad_input_is_refused_by_name(models):
    target, draft, tok = models
    torch.manual_seed(0)
    other_vocab = TinyLM(ModelConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32))
    prompt = tok.encode("The")
    cases = [
        (dict(draft=other_vocab), "draft=.*vocab_size=264"),
        (dict(num_speculative_tokens=0), "num_speculative_tokens=0"),
        (dict(num_speculative_tokens=2.5), "num_speculative_tokens=2.5"),
        (dict(num_speculative_tokens=True), "num_speculative_tokens=True"),
        (dict(max_new_tokens=1024), "max_new_tokens=1024.*context"),
        (dict(temperature=-1.0), "temperature"),
        (dict(prompt_ids=[]), "prompt_ids"),
        (dict(prompt_ids=torch.tensor([[1, 2], [3, 4]])), "batch size 1"),
        (dict(prompt_ids=[1, 999]), "prompt_ids"),
        (dict(temperature=1.0, verify=greedy_verify), "verify"),
        (dict(eos_id=264), "eos_id"),
    ]
    for change, match in cases:
        args = dict(target=target, draft=draft, prompt_ids=prompt, max_new_tokens=8)
        args.update(change)
        with pytest.raises(BadArgument, match=match):
            speculative_generate(args.pop("target"), args.pop("draft"), args.pop("prompt_ids"),
                                 args.pop("max_new_tokens"), **args)
    short = TinyLM(SMALL)
    with pytest.raises(BadArgument, match="draft's context"):
        speculative_generate(target, short, prompt, 60)


def test_tokenizers_must_match(models):
    target, draft, tok = models
    check_draft_compatible(target, draft, tok, ByteTokenizer())

    class Shifted(ByteTokenizer):
        def encode(self, text):
            return [t + 1 for t in super().encode(text)]

    with pytest.raises(BadArgument, match="draft_tokenizer"):
        check_draft_compatible(target, draft, tok, Shifted())
    with pytest.raises(BadArgument, match="both tokenizers or neither"):
        check_draft_compatible(target, draft, tok, None)


# -- the picture ---------------------------------------------------------------------------------
def test_round_picture_and_widget(models):
    import matplotlib
    matplotlib.use("Agg")
    target, draft, tok = models
    trace = []
    speculative_generate(target, draft, tok.encode("The KV cache holds"), 30, num_speculative_tokens=4,
                         trace=trace)
    rejected = next(r for r in trace if not r["bonus"])
    cells = round_cells(rejected)
    assert [s for s, _, _ in cells].count("rejected") == 1 and cells[-1][0] == "correction"
    assert cells[rejected["accepted"]][2] == rejected["token"]
    assert "rejected" in round_summary(rejected, tok.decode)
    full = next(r for r in trace if r["bonus"])
    assert round_cells(full)[-1][0] == "bonus" and "bonus" in round_summary(full)
    draw_round(rejected, decode=tok.decode)
    box = round_widget(trace, tok.decode)
    box.controls["round"].value = len(trace) - 1
    assert box.data is trace[-1] and box.text == round_summary(trace[-1], tok.decode)
    with pytest.raises(BadArgument):
        round_widget([])
