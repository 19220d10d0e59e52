"""Lesson 16's exercises: the solution passes, a stub is not attempted, the library is refused, and
each plausible wrong answer earns the hint about its own mistake."""

import functools

import pytest
import torch

from exercise_catalogue import (assert_correct, assert_hint, assert_not_attempted, assert_refused,
                                solution_function)

pytestmark = pytest.mark.lesson16


def stub(*args):
    raise NotImplementedError()


@functools.lru_cache(maxsize=1)
def solution(name):
    # One run of the solution notebook's cells; every answer is in the same namespace.
    return solution_function("16_speculative_decoding", "verify_step").__globals__[name]


# -- 16.tokens_per_forward (predict) ---------------------------------------------------------------
def predicted_with_library():
    from lessons_lib.speculative import expected_tokens_per_forward
    return expected_tokens_per_forward(0.8, 3)


@pytest.mark.parametrize("guess, fragments", [
    ((1 - 0.6 ** 4) / 0.4, ["alpha = 0.6 at every position", "later ones with 0.9"]),
    ((1 - 0.9 ** 4) / 0.1, ["alpha = 0.9 at every position", "every later one needs it accepted"]),
    ((1 - 0.8 ** 4) / 0.2, ["mean acceptance 0.8", "a1 a2 ... ai"]),
    (3.4, ["as if each proposal were kept on its own", "multiply"]),
    (1.626, ["accepted proposals only", "add 1"]),
    (4, ["k + 1 = 4"]),
    (2.14, ["one term short", "bonus"]),
    (1 + 0.9 + 0.81 + 0.486, ["wrong order", "accepted with 0.6"]),
    (1, ["plain decoding"]),
    (2.8, ["too high", "the measurement is 2.626 tokens", "a product of their rates"]),
])
def test_tokens_per_forward_wrong_predictions(guess, fragments):
    assert_hint("16.tokens_per_forward", lambda: guess, "you predicted", *fragments)


def test_tokens_per_forward_verdicts():
    assert_correct("16.tokens_per_forward", solution("predicted_tokens_per_forward"))
    assert_correct("16.tokens_per_forward", lambda: 2.63)
    assert_hint("16.tokens_per_forward", lambda: "2.6", "return one number")
    assert_not_attempted("16.tokens_per_forward", stub)
    assert_refused("16.tokens_per_forward", predicted_with_library, "expected_tokens_per_forward")


# -- 16.greedy_verify (build) ------------------------------------------------------------------------
def verify_right(proposal, target_logits):
    choices = target_logits.argmax(-1).tolist()
    m = 0
    while m < len(proposal) and proposal[m] == choices[m]:
        m += 1
    return m, choices[m]


def verify_off_by_one(proposal, target_logits):
    choices = target_logits.argmax(-1).tolist()
    m = 0
    while m < len(proposal) and proposal[m] == choices[m + 1]:
        m += 1
    return m, choices[min(m + 1, len(proposal))]


def verify_no_stop(proposal, target_logits):
    choices = target_logits.argmax(-1).tolist()
    m = sum(p == c for p, c in zip(proposal, choices))
    return m, choices[m]


def verify_keeps_draft_token(proposal, target_logits):
    m, token = verify_right(proposal, target_logits)
    return (m, proposal[m]) if m < len(proposal) else (m, token)


def verify_bonus_from_wrong_row(proposal, target_logits):
    m, token = verify_right(proposal, target_logits)
    if m == len(proposal) and m > 0:
        token = int(target_logits[m - 1].argmax())
    return m, token


def verify_counts_the_token(proposal, target_logits):
    m, token = verify_right(proposal, target_logits)
    return m + 1, token


def verify_first_row(proposal, target_logits):
    m, _ = verify_right(proposal, target_logits)
    return m, int(target_logits[0].argmax())


def verify_returns_tokens(proposal, target_logits):
    m, token = verify_right(proposal, target_logits)
    return proposal[:m] + [token]


def verify_returns_tensor_floats(proposal, target_logits):
    m, token = verify_right(proposal, target_logits)
    return m, target_logits[m].max()


def verify_with_library(proposal, target_logits):
    from lessons_lib.speculative import greedy_verify
    return greedy_verify(proposal, target_logits)


@pytest.mark.parametrize("answer, fragments", [
    (verify_off_by_one, ["a rejection in the middle", "expected (2, 9)", "row i + 1"]),
    (verify_no_stop, ["the first proposal rejected", "expected (0, 3), got (2, 9)",
                      "stop at the first disagreement"]),
    (verify_keeps_draft_token, ["a rejection in the middle", "got (2, 5)", "not the draft's rejected proposal"]),
    (verify_bonus_from_wrong_row, ["every proposal accepted", "expected (3, 2), got (3, 9)", "row k"]),
    (verify_counts_the_token, ["expected (2, 9), got (3, 9)", "not counted in it"]),
    (verify_first_row, ["expected (2, 9), got (2, 3)", "not of row 0"]),
    (verify_returns_tokens, ["a rejection in the middle", "return a pair (num_accepted, next_token)"]),
    (verify_returns_tensor_floats, ["next_token is tensor(3.)", "python int"]),
])
def test_greedy_verify_wrong_answers(answer, fragments):
    assert_hint("16.greedy_verify", answer, *fragments)


def test_greedy_verify_verdicts():
    assert_correct("16.greedy_verify", solution("verify_step"))
    assert_not_attempted("16.greedy_verify", stub)
    assert_refused("16.greedy_verify", verify_with_library, "greedy_verify")


# -- 16.fix_rollback (stretch) -----------------------------------------------------------------------
def make_loop(target_keep=lambda seq, cache: len(seq) - 1,
              draft_keep=lambda seq, cache: min(cache.seq_len, len(seq) - 1),
              draft_feed="unseen", target_feed="unseen", cap=True, with_prompt=False):
    """A speculative loop; each argument switches one part between right and a typical mistake."""
    def speculative_greedy(target, draft, prompt_ids, max_new_tokens, k):
        t_cache, d_cache = target.new_cache(), draft.new_cache()
        seq = list(prompt_ids)
        first = True
        while len(seq) - len(prompt_ids) < max_new_tokens:
            left = max_new_tokens - (len(seq) - len(prompt_ids))
            k_now = min(k, left - 1) if cap else k
            feed = seq[d_cache.seq_len:] if draft_feed == "unseen" or first else seq[-1:]
            proposal = []
            for _ in range(k_now):
                logits = draft(torch.tensor([feed]), cache=d_cache)
                proposal.append(int(logits[0, -1].argmax()))
                feed = proposal[-1:]
            t_feed = seq[t_cache.seq_len:] if target_feed == "unseen" or first else seq[-1:]
            logits = target(torch.tensor([t_feed + proposal]), cache=t_cache)
            choices = logits[0, -(k_now + 1):].argmax(dim=-1).tolist()
            m = 0
            while m < k_now and proposal[m] == choices[m]:
                m += 1
            seq += proposal[:m] + [choices[m]]
            first = False
            if target_keep is not None:
                t_cache.truncate(target_keep(seq, t_cache))
            if draft_keep is not None:
                d_cache.truncate(draft_keep(seq, d_cache))
        return seq if with_prompt else seq[len(prompt_ids):]
    return speculative_greedy


as_given = make_loop(target_keep=None, draft_keep=None, draft_feed="newest", target_feed="newest")
target_fixed_only = make_loop(draft_keep=None, draft_feed="newest")
draft_misses_last = make_loop(draft_feed="newest")
draft_truncate_unguarded = make_loop(draft_keep=lambda seq, cache: len(seq) - 1)
target_keeps_one_too_many = make_loop(target_keep=lambda seq, cache: min(cache.seq_len, len(seq)))
target_cut_too_far = make_loop(target_keep=lambda seq, cache: len(seq) - 2, target_feed="newest")
no_cap = make_loop(cap=False)
returns_prompt_too = make_loop(with_prompt=True)
right = make_loop()


def uses_library(target, draft, prompt_ids, max_new_tokens, k):
    from lessons_lib.speculative import speculative_generate
    ids, _ = speculative_generate(target, draft, prompt_ids, max_new_tokens, num_speculative_tokens=k)
    return ids[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("answer, fragments", [
    (as_given, ["prompt 'The KV cache holds', k=4", "target call 2", "a proposal the target rejected",
                "roll the target's cache back"]),
    (target_fixed_only, ["draft call", "a proposal the target rejected", "roll the draft's cache back",
                         "output stays right"]),
    (draft_misses_last, ["the draft never saw a kept token", "only k - 1 of them"]),
    (draft_truncate_unguarded, ["keep more positions than a cache holds", "min(cache.seq_len, len(seq) - 1)"]),
    (target_keeps_one_too_many, ["target call", "a proposal the target rejected"]),
    (target_cut_too_far, ["the target never saw a kept token (or lost it to a truncate that cut too far)"]),
    (no_cap, ["returned 27 tokens, expected 24", "cap each round's proposals"]),
    (returns_prompt_too, ["the prompt included?"]),
])
def test_fix_rollback_wrong_answers(answer, fragments):
    assert_hint("16.fix_rollback", answer, *fragments)


def test_fix_rollback_verdicts():
    assert_correct("16.fix_rollback", solution("speculative_greedy"))
    assert_correct("16.fix_rollback", right)
    assert_not_attempted("16.fix_rollback", stub)
    assert_refused("16.fix_rollback", uses_library, "speculative_generate")
