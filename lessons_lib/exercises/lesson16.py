"""Checkers for notebook 16 (speculative decoding): the tokens one target forward yields, the greedy
verify-and-accept step run inside speculative decoding on the real models, and a speculative loop
that forgets to roll back its KV caches."""

from __future__ import annotations

import functools
import numbers
import random

import torch

from ..compression import load_student
from ..model import generate, load_tiny_lm
from ..speculative import (CoinFlipDraft, expected_speedup, expected_tokens_per_forward, greedy_verify,
                           speculative_generate)
from .check import (HIDDEN_ONLY, Incorrect, exercise, judge_prediction, labelled_cases, predicted_number,
                    refuse_reference, with_hidden)


@functools.lru_cache(maxsize=1)
def _models():
    torch.set_num_threads(1)
    return load_tiny_lm()[0], load_student()


# -- predict: tokens per target forward when the first proposal is the hardest ------------------
# Acceptance of proposal 1, 2, 3 of a round (given the ones before it were accepted): the lesson
# measured that the first proposal of a round is accepted least often.
ALPHAS = (0.6, 0.9, 0.9)
K = len(ALPHAS)


def _expected(alphas) -> float:
    """1 + a1 + a1 a2 + a1 a2 a3 + ...: proposal i is kept only if 1..i all are."""
    total, reach = 1.0, 1.0
    for a in alphas:
        reach *= a
        total += reach
    return total


def _tokens_mistakes() -> list[tuple[float, str]]:
    a1, a = ALPHAS[0], ALPHAS[1]
    mean = sum(ALPHAS) / K
    return [
        (expected_tokens_per_forward(a1, K), f"That is the formula with alpha = {a1} at every position; "
                                            f"only the first proposal is accepted with {a1}, the later ones "
                                            f"with {a}"),
        (expected_tokens_per_forward(a, K), f"That is the formula with alpha = {a} at every position; the "
                                           f"first proposal is accepted only with {a1}, and every later one "
                                           "needs it accepted too"),
        (expected_tokens_per_forward(mean, K), f"That is the formula at the mean acceptance {mean:.2g}; "
                                              "the formula assumes one alpha for every position, so with "
                                              "different ones go back to its derivation: proposal i is "
                                              "kept with probability a1 a2 ... ai"),
        (1 + sum(ALPHAS), "That adds the acceptance rates as if each proposal were kept on its own; "
                          "proposal i is kept only if proposals 1..i are all accepted: multiply"),
        (_expected(ALPHAS) - 1, "That counts the accepted proposals only; every round also emits one "
                                "token of the target's own: add 1"),
        (K + 1, f"That is k + 1 = {K + 1}: every proposal accepted"),
        (_expected(ALPHAS[:-1]), "That is one term short: with all k accepted the round still emits the "
                                 "target's bonus token, so the sum runs to a1 a2 ... ak"),
        (_expected(ALPHAS[::-1]), f"That takes the rates in the wrong order: the first proposal of a round "
                                  f"is the one accepted with {a1}"),
        (1.0, "One token per forward is plain decoding; speculation adds the accepted proposals"),
    ]


@exercise("16.tokens_per_forward", "predict: tokens per target forward when acceptance varies by position")
def check_tokens_per_forward(candidate):
    refuse_reference(candidate, expected_tokens_per_forward, expected_speedup, speculative_generate)
    guess = predicted_number(candidate, "predicted_tokens_per_forward")
    judge_prediction(guess, _expected(ALPHAS), _tokens_mistakes(), "tokens",
                     "Add up what a round emits: proposal i is kept only if proposals 1..i are all "
                     "accepted (a product of their rates), and the target always adds one token.")
    return (f"{_expected(ALPHAS):.4g} tokens per target forward for acceptance {list(ALPHAS)} by position; "
            "the next cell measures it")


def measure_tokens_per_forward(prompts, new_tokens: int = 200, seed: int = 0) -> tuple[float, int]:
    """Tokens per target forward over the full rounds of the tiny LM's real verification, with a
    draft that always proposes the target's token and a verdict that accepts proposal i with
    probability ALPHAS[i] (seeded). The output is unchanged: a correct proposal "rejected" is
    replaced by the target's identical pick, so only the count per forward moves."""
    target, _ = _models()
    rng = random.Random(seed)

    def verify(proposal, logits):
        choices = logits.argmax(dim=-1).tolist()
        m = 0
        while m < len(proposal) and proposal[m] == choices[m] and rng.random() < ALPHAS[m]:
            m += 1
        return m, choices[m]

    full = []
    for prompt in prompts:
        draft = CoinFlipDraft(target, prompt, new_tokens, 1.0)
        ids, stats = speculative_generate(target, draft, prompt, new_tokens, num_speculative_tokens=K,
                                          verify=verify)
        if not torch.equal(ids, draft.truth_ids()):
            raise RuntimeError("the measurement changed the output")
        full += stats.full_rounds()
    return sum(a + 1 for _, a in full) / len(full), len(full)


# -- build: greedy verify-and-accept ------------------------------------------------------------------
def _reference_verify(proposal, choices, mistake=None):
    """The rule on the target's arg-max per row; ``mistake`` switches on one typical error."""
    k = len(proposal)
    if mistake == "off_by_one":
        m = 0
        while m < k and m + 1 < len(choices) and proposal[m] == choices[m + 1]:
            m += 1
        return m, choices[min(m + 1, k)]
    if mistake == "no_stop":
        m = sum(p == c for p, c in zip(proposal, choices))
        return m, choices[m]
    m = 0
    while m < k and proposal[m] == choices[m]:
        m += 1
    if mistake == "draft_token":
        return m, proposal[m] if m < k else choices[k]
    if mistake == "no_bonus_row":
        return m, choices[m] if m < k else choices[k - 1]
    if mistake == "counts_the_token":
        return m + 1, choices[m]
    if mistake == "first_row":
        return m, choices[0]
    return m, choices[m]


VERIFY_MISTAKES = {
    "off_by_one": "row i of target_logits is the target's prediction FOR proposal i (it was computed "
                  "from the tokens before it): compare proposal[i] with argmax(row i), not row i + 1",
    "no_stop": "stop at the first disagreement: a proposal after a rejected one was drafted from a "
               "token the text does not contain, so it cannot be kept even if it matches",
    "draft_token": "at the first disagreement the next token is the target's pick (argmax of that "
                   "row), not the draft's rejected proposal",
    "no_bonus_row": "when all k proposals are accepted the extra token comes from the last row "
                    "(row k, the prediction after the whole proposal), not row k - 1",
    "counts_the_token": "num_accepted counts the proposals kept; the target's own next token is "
                        "returned separately, not counted in it",
    "first_row": "the next token is the target's pick at the position after the accepted ones, "
                 "argmax of row num_accepted, not of row 0",
}


def _logits_for(choices: list[int], vocab: int = 12) -> torch.Tensor:
    rows = torch.full((len(choices), vocab), -2.0)
    for i, c in enumerate(choices):
        rows[i, c] = 3.0
        rows[i, (c + 5) % vocab] = 1.0           # a runner-up, so the arg-max is not the only bump
    return rows


# (case, proposal, the target's arg-max of each of the k + 1 rows)
VERIFY_CASES = [
    ("a rejection in the middle", [3, 4, 5], [3, 4, 9, 2]),
    ("every proposal accepted", [3, 4, 9], [3, 4, 9, 2]),
    ("the first proposal rejected", [0, 4, 9], [3, 4, 9, 2]),
    ("a proposal matching after a rejection", [3, 7, 9, 1], [3, 4, 9, 1, 6]),
    ("one proposal, accepted", [8], [8, 1]),
    ("no proposal (the last token of a generation)", [], [6]),
    ("repeated tokens", [2, 2, 2], [2, 2, 5, 2]),
]
VERIFY_HIDDEN = [  # grading only
    ("eight proposals, all accepted", [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8, 11]),
    ("only the last proposal rejected", [5, 6, 7, 8, 9], [5, 6, 7, 8, 0, 3]),
    ("token 0 and the largest id", [0, 11], [0, 11, 0]),
]


def _as_pair(got, story: str) -> tuple[int, int]:
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise Incorrect(f"{story}: returned {got!r}; return a pair (num_accepted, next_token)")
    out = []
    for name, v in zip(("num_accepted", "next_token"), got):
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point():
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise Incorrect(f"{story}: {name} is {v!r}; return a Python int (use int(...) or .item())")
        out.append(int(v))
    return out[0], out[1]


def _judge_verify(candidate, case, proposal, choices) -> None:
    story = f"{case}: proposal={proposal}, the target's arg-max per row={choices}"
    got = _as_pair(candidate(list(proposal), _logits_for(choices)), story)
    expected = _reference_verify(proposal, choices)
    if got == expected:
        return
    alike = [VERIFY_MISTAKES[m] for m in VERIFY_MISTAKES if _reference_verify(proposal, choices, m) == got]
    why = (" Likely cause: " + "; or ".join(alike)) if alike else (
        " Keep proposals from the left while each equals the target's arg-max of its own row; the "
        "next token is the arg-max of the row after the last one kept.")
    raise Incorrect(f"{story}: expected {expected}, got {got}.{why}")


VERIFY_PROMPTS = ["The KV cache holds", "Each rank", "A router sends"]


@functools.lru_cache(maxsize=8)
def _plain(prompt: tuple, n: int) -> torch.Tensor:
    return generate(_models()[0], torch.tensor([list(prompt)]), n)


def _prompt(text: str) -> tuple:
    return tuple(text.encode("utf-8"))            # the byte tokenizer: a byte is its own id


@exercise("16.greedy_verify", "build: the greedy verify-and-accept step of speculative decoding")
def check_greedy_verify(candidate, hidden=False):
    refuse_reference(candidate, greedy_verify, speculative_generate)
    for label, (case, proposal, choices) in labelled_cases(VERIFY_CASES, VERIFY_HIDDEN, hidden):
        _judge_verify(candidate, f"{label}{case}", proposal, choices)
    target, draft = _models()
    for text in VERIFY_PROMPTS if hidden != HIDDEN_ONLY else ():
        for k in (1, 4, 7):
            prompt, story = _prompt(text), f"on the real models, prompt {text!r}, k={k}"

            def verify(proposal, logits, story=story):
                return _as_pair(candidate(proposal, logits), story)

            ids, _ = speculative_generate(target, draft, list(prompt), 24, num_speculative_tokens=k,
                                          verify=verify)
            expected = _plain(prompt, 24)
            if not torch.equal(ids, expected):
                at = int((ids[0, :expected.shape[1]] != expected[0]).nonzero()[0])
                raise Incorrect(f"{story}: token {at - len(prompt)} is {int(ids[0, at])}, the target's "
                                f"own greedy decoding gives {int(expected[0, at])}")
    return with_hidden("keeps the longest agreeing prefix and the target's next token; inside speculative "
                       "decoding the tiny LM's output is unchanged for k = 1, 4, 7", VERIFY_HIDDEN, hidden)


# -- stretch: a speculative loop that forgets to roll back ---------------------------------------------
class _Watched:
    """A model that records what each of its caches holds, to diagnose a loop without rolling back."""

    def __init__(self, model, name: str, story: str, truth: list[int]) -> None:
        self.model, self.name, self.story, self.truth = model, name, story, truth
        self.config = model.config
        self.shadow: dict[int, list[int]] = {}
        self.calls = 0
        self.round_start = True      # the target checks at every call, the draft when a round starts
        self.peer: _Watched | None = None
        self.problem: str | None = None   # the draft's first problem, reported after the target's

    def new_cache(self):
        return self.model.new_cache()

    def _is_truth(self, tokens: list[int]) -> bool:
        return tokens == self.truth[:len(tokens)]

    def _report(self, hint: str) -> None:
        """A target's problem is reported at once; a draft's only if the target has none (it does
        not change the output, and the target's would stay hidden behind it)."""
        if self.name == "target":
            raise Incorrect(hint)
        self.problem = self.problem or hint

    def __call__(self, ids, *args, cache=None, **kwargs):
        if cache is None:
            raise Incorrect(f"{self.story}: the {self.name} was called without cache=: pass each model "
                            "its own KV cache")
        tokens = ids[0].tolist()
        held = self.shadow.get(id(cache), [])[:cache.seq_len]
        if self.round_start:
            if not self._is_truth(held):
                bad = next(i for i, t in enumerate(held) if i >= len(self.truth) or t != self.truth[i])
                self._report(
                    f"{self.story}: at {self.name} call {self.calls + 1} its cache still held a token that "
                    f"is not in the text (position {bad}: a proposal the target rejected). Roll the "
                    f"{self.name}'s cache back after each verification: cache.truncate(n) keeping only "
                    f"tokens that were kept" + (" (the output stays right, since the target verifies, but "
                                                 "the draft proposes from the wrong text and fewer proposals "
                                                 "are accepted)" if self.name == "draft" else ""))
            if not self._is_truth(held + tokens[:1]):
                self._report(
                    f"{self.story}: at {self.name} call {self.calls + 1} its cache held {len(held)} tokens and "
                    f"was fed {tokens[:1]} next, but the text's token at position {len(held)} is "
                    f"{self.truth[len(held)]}: the {self.name} never saw a kept token (or lost it to a "
                    f"truncate that cut too far). Feed every kept token the cache has not seen: "
                    f"seq[cache.seq_len:]" + (" (when all k proposals are accepted, the draft has seen "
                                              "only k - 1 of them)" if self.name == "draft" else ""))
        self.calls += 1
        with torch.no_grad():
            out = self.model(ids, *args, cache=cache, **kwargs)
        self.shadow[id(cache)] = held + tokens
        if self.name == "draft":
            self.round_start = False
        elif self.peer is not None:
            self.peer.round_start = True      # after a verification the draft starts a new round
        return out


def _watched_run(candidate, text: str, k: int, n: int) -> None:
    target, draft = _models()
    prompt = list(_prompt(text))
    truth = _plain(tuple(prompt), n + k + 2)[0].tolist()
    story = f"prompt {text!r}, k={k}, max_new_tokens={n}"
    t, d = _Watched(target, "target", story, truth), _Watched(draft, "draft", story, truth)
    t.peer = d
    try:
        got = candidate(t, d, list(prompt), n, k)
    except Incorrect:
        raise
    except Exception as err:  # noqa: BLE001 - a learner's error is a hint
        if d.problem:
            raise Incorrect(d.problem) from None
        if "the cache holds" in str(err):
            raise Incorrect(f"{story}: truncate was asked to keep more positions than a cache holds "
                            f"({err}). Keep the kept tokens but the last (len(seq) - 1), and never more "
                            "than the cache has seen: when every proposal is accepted the draft has seen "
                            "only k - 1 of them, so min(cache.seq_len, len(seq) - 1)") from None
        raise
    if isinstance(got, torch.Tensor):
        got = got.flatten().tolist()
    if not isinstance(got, (list, tuple)):
        raise Incorrect(f"{story}: returned {type(got).__name__}; return the list of new token ids")
    expected = truth[len(prompt):len(prompt) + n]
    if len(got) != n:
        raise Incorrect(f"{story}: returned {len(got)} tokens, expected {n}" + (
            " (the prompt included? return only the new tokens)" if len(got) == len(prompt) + n else
            ": cap each round's proposals at the tokens still wanted (k_now = min(k, left - 1))"))
    if list(got) != expected:
        at = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
        raise Incorrect(f"{story}: new token {at} is {got[at]}, the target's own greedy decoding gives "
                        f"{expected[at]}; the caches were consistent, so look at how proposals are compared "
                        "with the target's picks")
    if d.problem:
        raise Incorrect(d.problem)
    _, stats = speculative_generate(target, draft, prompt, n, num_speculative_tokens=k)
    if t.calls > stats.target_forwards:
        raise Incorrect(f"{story}: the output is right but took {t.calls} target forwards; a loop that "
                        f"rolls both caches back exactly needs {stats.target_forwards}")


ROLLBACK_CASES = [("The KV cache holds", 4, 24), ("Each rank", 2, 20), ("A router sends", 6, 30)]


@exercise("16.fix_rollback", "stretch: fix a speculative loop that forgets to roll back its KV caches")
def check_fix_rollback(candidate):
    refuse_reference(candidate, speculative_generate, greedy_verify)
    for text, k, n in ROLLBACK_CASES:
        _watched_run(candidate, text, k, n)
    return ("token-identical to the target's greedy decoding, neither cache ever holds a rejected "
            "proposal, and no more target forwards than the library's loop")
