"""Checkers for notebook 15 (the serving engine): the padding static batching computes, a
first-come-first-served token-budget scheduler step run inside the engine, and an admission
queue that starves a long request and leaks KV blocks on abort."""

from __future__ import annotations

import functools
import numbers

import torch

from ..engine import BlockManager, LLMEngine, SamplingParams, Scheduler
from ..engine.request import RequestStatus
from ..engine.scheduler import SchedulerOutput
from ..model import generate, load_tiny_lm
from ..viz.engine import continuous_slots, static_slots
from .check import (HIDDEN_ONLY, Incorrect, exercise, judge_prediction, labelled_cases, refuse_reference,
                    with_hidden)

# -- predict: the slots static batching spends on padding --------------------------------------
OUTPUT_LENGTHS = [5, 12, 3, 8, 20, 4, 6, 9, 2, 15]      # max_tokens of each request, in arrival order
STATIC_BATCH = 4


@functools.lru_cache(maxsize=1)
def _model():
    return load_tiny_lm()[0]


@functools.lru_cache(maxsize=1)
def measured_padded_slots() -> int:
    """Run the trace as static batches through ``generate()`` and count the padding it computed.

    Each batch of left-padded prompts decodes until its longest request has its tokens; every row
    gets a token at every step, so a row computes (batch's new tokens - its own max_tokens) tokens
    nobody asked for."""
    model = _model()
    padded = 0
    for b in range(0, len(OUTPUT_LENGTHS), STATIC_BATCH):
        group = OUTPUT_LENGTHS[b:b + STATIC_BATCH]
        prompts = [[(7 * (b + i) + j) % 250 + 1 for j in range(4 + i)] for i in range(len(group))]
        width = max(map(len, prompts))
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        out = generate(model, ids, max(group), attention_mask=mask)
        new = out.shape[1] - width
        padded += sum(new - m for m in group)
    return padded


def _padded(lengths: list[int], batch: int, rows=None) -> int:
    total = 0
    for b in range(0, len(lengths), batch):
        group = lengths[b:b + batch]
        total += (rows or len(group)) * max(group) - sum(group)
    return total


def _padded_mistakes() -> list[tuple[float, str]]:
    n, useful = len(OUTPUT_LENGTHS), sum(OUTPUT_LENGTHS)
    batches = [OUTPUT_LENGTHS[b:b + STATIC_BATCH] for b in range(0, n, STATIC_BATCH)]
    return [
        (n * max(OUTPUT_LENGTHS) - useful,
         f"That pads every request to the longest of the whole trace ({max(OUTPUT_LENGTHS)}); each "
         "batch runs only as long as its own longest request"),
        (_padded(OUTPUT_LENGTHS, STATIC_BATCH, rows=STATIC_BATCH),
         f"That counts {STATIC_BATCH} rows in the last batch, but only {len(batches[-1])} requests are "
         f"left for it ({n} = {' + '.join(str(len(g)) for g in batches)}): a batch has a row per request"),
        (_padded(sorted(OUTPUT_LENGTHS), STATIC_BATCH),
         "That batches the requests sorted by length; the static batcher takes them in arrival order, "
         "as they come"),
        (sum(max(g) for g in batches),
         "That is the number of steps the batches run, not the slots: every row of a batch takes a "
         "slot in every step"),
        (useful, "That is the tokens the requests asked for (the useful slots); the question is the "
         "slots spent on padding after a request is done"),
        (useful + _padded(OUTPUT_LENGTHS, STATIC_BATCH),
         "That is every slot the batches compute, useful and padding; subtract the useful tokens"),
        (sum(max(g) - min(g) for g in batches),
         "That counts the padding of one row per batch (its shortest request); every request shorter "
         "than its batch's longest pads, each for (longest - its own length) steps"),
        (0, "Zero padding is what continuous batching achieves (a finished request's slot is refilled "
            "at once); static batching keeps the slot until its batch ends"),
    ]


@exercise("15.padded_slots", "predict: the slots static batching computes for requests already done")
def check_padded_slots(candidate):
    refuse_reference(candidate, measured_padded_slots, static_slots, continuous_slots)
    guess = candidate()
    judge_prediction(guess, measured_padded_slots(), _padded_mistakes(), "slots",
                     "Batch the requests in arrival order; a batch runs as many steps as its longest "
                     "request; each shorter request pads for the rest of them.", tolerance=0)
    return "exactly the padding generate() computed when the trace ran as static batches"


# -- build: one step of a first-come-first-served token-budget scheduler ----------------------
def _reference_step(running, waiting, budget, max_seqs, mistake=None) -> dict:
    """The policy the exercise asks for; ``mistake`` switches on one typical error."""
    plan = {}
    order = list(reversed(running)) if mistake == "newest_first" else list(running)

    def run_running():
        nonlocal budget
        for rid, left in order:
            if budget <= 0:
                break
            n = 1 if mistake == "decode_one" else min(left, budget)
            plan[rid] = n
            budget -= n

    def run_waiting():
        nonlocal budget
        admitted = 0
        for rid, left in waiting:
            seqs = admitted if mistake == "admitted_only" else len(running) + admitted
            if budget <= 0 or (seqs >= max_seqs and mistake != "ignores_max_seqs"):
                break
            if left > budget and mistake in ("no_chunking", "skips"):
                if mistake == "skips":
                    continue
                break
            plan[rid] = min(left, budget)
            budget -= plan[rid]
            admitted += 1

    if mistake == "waiting_first":
        run_waiting()
        run_running()
    else:
        run_running()
        run_waiting()
    return plan


STEP_MISTAKES = {
    "waiting_first": "running requests go first: each gets its next token (or its next prefill chunk) "
                     "before any waiting prompt is admitted, or a burst of new prompts stalls every "
                     "stream (its inter-token latency)",
    "no_chunking": "with chunked prefill a prompt longer than what is left of the budget is not held "
                   "back: it takes what is left (a chunk) and goes on next step",
    "skips": "first come first served: a waiting request that cannot be served stops admission; "
             "skipping it lets later requests overtake it, and under steady traffic a long prompt "
             "never runs (starvation). With chunked prefill it always gets what is left anyway",
    "ignores_max_seqs": "at most max_num_seqs requests may be running after the step: count the "
                        "running ones and the ones you admit",
    "admitted_only": "max_num_seqs bounds the running requests plus the ones admitted, not only the "
                     "ones admitted this step",
    "decode_one": "a running request still prefilling (tokens_left > 1) takes its next chunk, "
                  "min(tokens_left, budget left), not one token",
    "newest_first": "running requests are served oldest first (the list is in arrival order), so "
                    "when the budget runs out it is the newest that waits",
}


def _story(case: str, running, waiting, budget, max_seqs) -> str:
    return (f"{case}: running={running}, waiting={waiting}, token_budget={budget}, "
            f"max_num_seqs={max_seqs}")


def _as_plan(got, story: str, known: dict) -> dict:
    if isinstance(got, dict):
        raise Incorrect(f"{story}: returned a dict; return a list of (request_id, num_tokens) pairs")
    if not isinstance(got, (list, tuple)):
        raise Incorrect(f"{story}: returned {got!r}; return a list of (request_id, num_tokens) pairs")
    plan = {}
    for item in got:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise Incorrect(f"{story}: {item!r} in the result is not a (request_id, num_tokens) pair")
        rid, n = item
        if rid not in known:
            raise Incorrect(f"{story}: {rid!r} is neither running nor waiting")
        if rid in plan:
            raise Incorrect(f"{story}: {rid!r} is scheduled twice; give each request one entry")
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise Incorrect(f"{story}: {rid!r} gets {n!r} tokens; give an int")
        if n <= 0:
            raise Incorrect(f"{story}: {rid!r} gets {n} tokens; leave out a request that gets none "
                            "this step (every entry computes at least one token)")
        if n > known[rid]:
            raise Incorrect(f"{story}: {rid!r} gets {n} tokens but has only {known[rid]} left to compute")
        plan[rid] = int(n)
    return plan


def _judge_step(candidate, case, running, waiting, budget, max_seqs) -> dict:
    story = _story(case, running, waiting, budget, max_seqs)
    got = candidate([tuple(r) for r in running], [tuple(w) for w in waiting], budget, max_seqs)
    plan = _as_plan(got, story, dict(running + waiting))
    total = sum(plan.values())
    expected = _reference_step(running, waiting, budget, max_seqs)
    if plan == expected:
        return plan
    alike = [STEP_MISTAKES[m] for m in STEP_MISTAKES
             if _reference_step(running, waiting, budget, max_seqs, m) == plan]
    if total > budget:
        alike.insert(0, f"the step computes {total} tokens, over token_budget={budget}: every token, "
                        "decode or prefill, comes out of the one budget")
    why = (" Likely cause: " + "; or ".join(alike)) if alike else (
        " Serve running requests oldest first, min(tokens_left, budget left) each, then admit waiting "
        "ones in order while budget is left and fewer than max_num_seqs run, a chunk each.")
    raise Incorrect(f"{story}: expected {list(expected.items())}, got {list(plan.items())}.{why}")


# Steps checked on their own, before the engine runs: edge cases a trace may not reach.
UNIT_STEPS = [
    ("nothing to do", [], [], 8, 2),
    ("a long prompt first in the queue", [("a", 1)], [("L", 40), ("s", 2)], 12, 4),
    ("a decode for each running request, then a chunk", [("a", 1), ("b", 1)], [("c", 20)], 8, 4),
    ("the budget runs out inside the running list", [("a", 1), ("b", 6), ("c", 1)], [("d", 2)], 5, 4),
    ("max_num_seqs already reached", [("a", 1), ("b", 1)], [("c", 3), ("d", 3), ("e", 3)], 16, 2),
]
HIDDEN_STEPS = [  # grading only
    ("a budget of one token, a prefilling request first", [("a", 5), ("b", 1)], [("c", 2)], 1, 4),
    ("nothing running: the queue fills max_num_seqs", [], [("a", 3), ("b", 3), ("c", 3), ("d", 3)], 100, 3),
    ("a prompt that uses exactly the budget left", [("a", 1)], [("b", 7), ("c", 1)], 8, 4),
    ("more running requests than budget", [("a", 1), ("b", 1), ("c", 1), ("d", 1), ("e", 1)], [("f", 1)], 3, 6),
]

# Engine runs: (case, engine settings, arrivals as (step, request id, prompt length, max_tokens)).
ENGINE_RUNS = [
    ("engine run 1 (budget 16, 3 sequences)", dict(max_num_batched_tokens=16, max_num_seqs=3),
     [(0, "r0", 5, 6), (0, "r1", 30, 3), (1, "r2", 4, 5), (1, "r3", 7, 4), (2, "r4", 3, 2), (6, "r5", 9, 3)]),
    ("engine run 2 (budget 3, 4 sequences)", dict(max_num_batched_tokens=3, max_num_seqs=4),
     [(0, "a", 3, 4), (0, "b", 2, 3), (0, "c", 4, 2), (1, "d", 2, 2)]),
]


def _prompt(rid: str, length: int) -> list[int]:
    seed = sum(map(ord, rid))
    return [(seed * 31 + 17 * i) % 250 + 1 for i in range(length)]


@functools.lru_cache(maxsize=64)
def _alone(prompt: tuple, max_tokens: int) -> list[int]:
    return generate(_model(), torch.tensor([list(prompt)]), max_tokens)[0, len(prompt):].tolist()


class _LearnerScheduler(Scheduler):
    """The engine's scheduler with the learner's step deciding who runs (no prefix caching, a pool
    large enough that nothing is preempted)."""

    def __init__(self, block_manager: BlockManager, candidate, case: str, **kwargs) -> None:
        super().__init__(block_manager, **kwargs)
        self.candidate, self.case, self.step_no = candidate, case, 0

    def schedule(self) -> SchedulerOutput:
        running = [(r.request_id, r.num_tokens - r.num_computed_tokens) for r in self.running]
        waiting = [(r.request_id, r.num_tokens - r.num_computed_tokens) for r in self.waiting]
        plan = _judge_step(self.candidate, f"{self.case}, step {self.step_no}", running, waiting,
                           self.max_num_batched_tokens, self.max_num_seqs)
        self.step_no += 1
        out = SchedulerOutput()
        for request in list(self.running):
            if request.request_id in plan:
                n = plan[request.request_id]
                if not self.block_manager.allocate_slots(request, n):
                    raise RuntimeError("the check's pool ran out of blocks")
                out.scheduled.append((request, n))
        while self.waiting and self.waiting[0].request_id in plan:
            request = self.waiting.popleft()
            n = plan[request.request_id]
            if not self.block_manager.allocate_slots(request, n):
                raise RuntimeError("the check's pool ran out of blocks")
            request.num_cached_tokens = 0
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append((request, n))
        return out


def _engine_run(candidate, case, settings, arrivals) -> None:
    engine = LLMEngine(_model(), block_size=4, num_blocks=64, enable_prefix_caching=False, **settings)
    engine.scheduler = _LearnerScheduler(engine.block_manager, candidate, case,
                                         max_num_seqs=engine.max_num_seqs,
                                         max_num_batched_tokens=engine.max_num_batched_tokens,
                                         enable_chunked_prefill=True)
    pending, finals, step = sorted(arrivals), {}, 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, rid, length, max_tokens = pending.pop(0)
            engine.add_request(rid, _prompt(rid, length), SamplingParams(max_tokens=max_tokens))
        finals.update({o.request_id: o.output_token_ids for o in engine.step() if o.finished})
        step += 1
        if step > 200:
            raise Incorrect(f"{case}: the requests did not finish within 200 steps")
    for _, rid, length, max_tokens in arrivals:
        if finals[rid] != _alone(tuple(_prompt(rid, length)), max_tokens):
            raise Incorrect(f"{case}: {rid} produced {finals[rid]}, generate() alone gives "
                            f"{_alone(tuple(_prompt(rid, length)), max_tokens)}")
    if engine.block_manager.num_free_blocks != engine.num_blocks:
        raise Incorrect(f"{case}: blocks were left held after every request finished")


@exercise("15.schedule_step", "build: one step of a first-come-first-served token-budget scheduler")
def check_schedule_step(candidate, hidden=False):
    refuse_reference(candidate, Scheduler, LLMEngine)
    for label, (case, running, waiting, budget, max_seqs) in labelled_cases(UNIT_STEPS, HIDDEN_STEPS, hidden):
        _judge_step(candidate, f"{label}{case}", running, waiting, budget, max_seqs)
    for case, settings, arrivals in ENGINE_RUNS if hidden != HIDDEN_ONLY else ():
        _engine_run(candidate, case, settings, arrivals)
    return with_hidden("running requests first, oldest first; then the queue in order with chunked prefill, "
                       "within the budget and max_num_seqs; the engine served every request as generate() "
                       "alone", HIDDEN_STEPS, hidden)


# -- stretch: an admission queue that starves a long request and leaks blocks on abort -------
class _Queue:
    """The fixed admission queue; ``mistake`` switches on one typical error."""

    def __init__(self, num_blocks, block_size, max_num_seqs, mistake=None):
        self.num_free, self.num_blocks = num_blocks, num_blocks
        self.block_size, self.max_num_seqs, self.mistake = block_size, max_num_seqs, mistake
        self.waiting: list[tuple] = []
        self.held: dict = {}

    def add(self, rid, prompt_len):
        self.waiting.append((rid, prompt_len))

    def admit(self):
        admitted = []
        queue = sorted(self.waiting, key=lambda r: r[1]) if self.mistake == "smallest_first" else list(self.waiting)
        for rid, length in queue:
            need = -(-length // self.block_size)
            if len(self.held) < self.max_num_seqs and need <= self.num_free:
                self.waiting.remove((rid, length))
                self.held[rid] = need
                self.num_free -= need
                admitted.append(rid)
            elif self.mistake not in ("smallest_first", "skips"):
                break
        return admitted

    def finish(self, rid):
        self.num_free += self.held.pop(rid)

    def abort(self, rid):
        known = rid in self.held or any(r == rid for r, _ in self.waiting)
        if not known and self.mistake != "silent_unknown":
            raise KeyError(rid)
        for r, length in list(self.waiting):
            if r == rid:
                if self.mistake != "keeps_waiting":
                    self.waiting.remove((r, length))
                if self.mistake == "frees_waiting":
                    self.num_free += -(-length // self.block_size)
        if rid in self.held:
            need = self.held.pop(rid)
            if self.mistake != "leaks":
                self.num_free += need


ADMIT_MISTAKES = {
    "smallest_first": "admitting the smallest prompts first lets short requests overtake a long one; "
                      "under steady traffic of short requests the long one never runs (starvation): "
                      "admit in arrival order",
    "skips": "a waiting request that does not fit must stop admission (first come first served); "
             "skipping it lets later, smaller requests overtake it, so it starves",
    "leaks": "aborting a running request must give its blocks back to the pool; dropping its entry "
             "alone loses them for good (a leak)",
    "keeps_waiting": "aborting a waiting request must take it out of the queue, or it is admitted "
                     "later and holds blocks for a client that is gone",
    "frees_waiting": "a waiting request holds no blocks: aborting it must not add any to the pool "
                     "(the pool now counts blocks that do not exist)",
    "silent_unknown": "abort of an id that is neither waiting nor running must raise KeyError naming "
                      "it: the caller has lost track of its requests, and saying nothing hides that",
}

# Each scenario: (what it tests, num_blocks, block_size, max_num_seqs, operations).
ADMIT_SCENARIOS = [
    ("a long request behind short ones", 8, 4, 4, [
        ("add", "A", 16), ("admit",), ("add", "L", 20), ("add", "s2", 8), ("add", "s1", 4), ("admit",),
        ("finish", "A"), ("add", "s3", 4), ("admit",), ("finish", "L"), ("admit",)]),
    ("steady short traffic", 8, 4, 4, [
        ("add", "A", 8), ("add", "B", 8), ("admit",), ("add", "L", 24), ("add", "s1", 4), ("admit",),
        ("finish", "A"), ("add", "s2", 4), ("admit",), ("finish", "B"), ("add", "s3", 4), ("admit",)]),
    ("abort a running request", 6, 4, 4, [
        ("add", "A", 12), ("add", "B", 12), ("admit",), ("abort", "A"), ("add", "C", 12), ("admit",),
        ("finish", "B"), ("finish", "C")]),
    ("abort a waiting request", 4, 4, 4, [
        ("add", "A", 16), ("admit",), ("add", "W", 4), ("add", "X", 16), ("abort", "W"), ("finish", "A"),
        ("admit",), ("finish", "X"), ("admit",)]),
    ("abort with nothing to abort", 4, 4, 2, [
        ("add", "A", 4), ("admit",), ("finish", "A"), ("abort", "A"), ("add", "B", 16), ("add", "C", 16),
        ("admit",)]),
]


def _apply(queue, op):
    if op[0] == "add":
        return queue.add(op[1], op[2])
    if op[0] == "admit":
        return queue.admit()
    if op[0] == "finish":
        return queue.finish(op[1])
    return queue.abort(op[1])


def _outcome(queue, op):
    """What an operation returned, "KeyError" if it raised one, and the free count after it."""
    try:
        result = _apply(queue, op)
    except KeyError:
        result = "KeyError"
    return result, queue.num_free


def _variants(num_blocks, block_size, max_seqs, ops, upto) -> dict:
    seen = {}
    for mistake in ADMIT_MISTAKES:
        q = _Queue(num_blocks, block_size, max_seqs, mistake)
        seen[mistake] = [_outcome(q, op) for op in ops[:upto]]
    return seen


def _call(op) -> str:
    return f"{op[0]}({', '.join(repr(a) for a in op[1:])})"


def _check_admission(candidate, what, num_blocks, block_size, max_seqs, ops) -> None:
    queue = candidate(num_blocks, block_size, max_seqs)
    ref = _Queue(num_blocks, block_size, max_seqs)
    done, outcomes = [], []
    for i, op in enumerate(ops):
        story = (f"{what} (num_blocks={num_blocks}, block_size={block_size}, max_num_seqs={max_seqs}): "
                 + ", ".join(done + [_call(op)]))
        expected = _outcome(ref, op)
        try:
            result = _apply(queue, op)
        except NotImplementedError:
            raise
        except KeyError as exc:
            result = "KeyError"
            if expected[0] == "KeyError" and op[1] not in str(exc):
                raise Incorrect(f"{story}: raised KeyError({exc}); name the unknown id in it") from None
        except Exception as exc:  # noqa: BLE001 - a learner's error is a hint
            raise Incorrect(f"{story}: raised {type(exc).__name__}: {exc}") from None
        if op[0] == "admit":
            if not isinstance(result, (list, tuple)):
                raise Incorrect(f"{story}: admit() returned {result!r}; return the list of admitted ids")
            result = list(result)
        got = (result if op[0] == "admit" or result == "KeyError" else None, getattr(queue, "num_free", None))
        outcomes.append(got)
        want = (expected[0] if op[0] == "admit" or expected[0] == "KeyError" else None, expected[1])
        if got != want:
            said = []
            if got[0] != want[0]:
                said.append(f"{'raised KeyError' if got[0] == 'KeyError' else f'returned {got[0]!r}'}, expected "
                            f"{'KeyError' if want[0] == 'KeyError' else repr(want[0])}")
            if got[1] != want[1]:
                said.append(f"num_free is {got[1]!r}, expected {want[1]}")
            variants = _variants(num_blocks, block_size, max_seqs, ops, i + 1)
            alike = [ADMIT_MISTAKES[m] for m, seen in variants.items()
                     if [(r if o[0] == "admit" or r == "KeyError" else None, f)
                         for o, (r, f) in zip(ops, seen)] == outcomes]
            why = (" Likely cause: " + "; or ".join(alike)) if alike else ""
            raise Incorrect(f"{story}: {'; '.join(said)}.{why}")
        done.append(_call(op) + (f" -> {result}" if op[0] == "admit" else ""))
    if not ref.held and not ref.waiting and queue.num_free != num_blocks:
        raise Incorrect(f"{what}: after every request finished or was aborted num_free is "
                        f"{queue.num_free}, not {num_blocks}")


@exercise("15.fix_admission", "stretch: fix an admission queue that starves long requests and leaks blocks")
def check_fix_admission(candidate):
    refuse_reference(candidate, Scheduler, BlockManager, LLMEngine)
    for what, num_blocks, block_size, max_seqs, ops in ADMIT_SCENARIOS:
        _check_admission(candidate, what, num_blocks, block_size, max_seqs, ops)
    return ("admits in arrival order and stops at the first request that does not fit; abort returns "
            "a running request's blocks, drops a waiting one, and raises KeyError for an unknown id")
