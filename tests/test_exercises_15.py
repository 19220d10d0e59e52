"""Lesson 15's exercises: the solution passes, a stub is not attempted, the library is refused, and
each plausible wrong answer earns the hint about its own mistake."""

import pytest

from exercise_catalogue import (assert_correct, assert_hint, assert_not_attempted, assert_refused,
                                solution_function)

pytestmark = pytest.mark.lesson15


def stub(*args):
    raise NotImplementedError()


# -- 15.padded_slots (predict) ----------------------------------------------------------------
def predicted_with_library():
    from lessons_lib.viz.engine import static_slots
    grid = static_slots([5, 12, 3, 8, 20, 4, 6, 9, 2, 15], 4)
    return sum(row.count("pad") for row in grid)


@pytest.mark.parametrize("guess, fragments", [
    (116, ["longest of the whole trace (20)", "its own longest"]),
    (104, ["counts 4 rows in the last batch", "only 2 requests are left", "10 = 4 + 4 + 2"]),
    (24, ["sorted by length", "arrival order"]),
    (47, ["number of steps", "every row of a batch takes a slot"]),
    (84, ["tokens the requests asked for"]),
    (158, ["every slot the batches compute", "subtract the useful tokens"]),
    (38, ["one row per batch"]),
    (0, ["continuous batching"]),
    (60, ["too low", "the measurement is 74 slots", "arrival order"]),
])
def test_padded_slots_wrong_predictions(guess, fragments):
    assert_hint("15.padded_slots", lambda: guess, f"you predicted {guess} slots", *fragments)


def test_padded_slots_verdicts():
    assert_correct("15.padded_slots", solution_function("15_serving_engine", "predicted_padded_slots"))
    assert_hint("15.padded_slots", lambda: "74", "as a number")
    assert_not_attempted("15.padded_slots", stub)
    assert_refused("15.padded_slots", predicted_with_library, "static_slots")


# -- 15.schedule_step (build) -------------------------------------------------------------------
def step_right(running, waiting, token_budget, max_num_seqs):
    plan, budget = [], token_budget
    for rid, left in running:
        if budget == 0:
            break
        n = min(left, budget)
        plan.append((rid, n))
        budget -= n
    admitted = 0
    for rid, left in waiting:
        if budget == 0 or len(running) + admitted >= max_num_seqs:
            break
        n = min(left, budget)
        plan.append((rid, n))
        budget -= n
        admitted += 1
    return plan


def step_waiting_first(running, waiting, token_budget, max_num_seqs):
    plan, budget, admitted = [], token_budget, 0
    for rid, left in waiting:
        if budget == 0 or len(running) + admitted >= max_num_seqs:
            break
        plan.append((rid, min(left, budget)))
        budget -= plan[-1][1]
        admitted += 1
    for rid, left in running:
        if budget == 0:
            break
        plan.append((rid, min(left, budget)))
        budget -= plan[-1][1]
    return plan


def step_without_chunking(running, waiting, token_budget, max_num_seqs):
    plan, budget = [], token_budget
    for rid, left in running:
        if budget == 0:
            break
        plan.append((rid, min(left, budget)))
        budget -= plan[-1][1]
    admitted = 0
    for rid, left in waiting:
        if left > budget or len(running) + admitted >= max_num_seqs:
            break                                    # waits for a step with room for the whole prompt
        plan.append((rid, left))
        budget -= left
        admitted += 1
    return plan


def step_skipping(running, waiting, token_budget, max_num_seqs):
    plan, budget = [], token_budget
    for rid, left in running:
        if budget == 0:
            break
        plan.append((rid, min(left, budget)))
        budget -= plan[-1][1]
    admitted = 0
    for rid, left in waiting:
        if len(running) + admitted >= max_num_seqs:
            break
        if left > budget:
            continue                                 # a smaller one behind it may fit
        plan.append((rid, left))
        budget -= left
        admitted += 1
    return plan


def step_ignoring_max_seqs(running, waiting, token_budget, max_num_seqs):
    return step_right(running, waiting, token_budget, 10 ** 6)


def step_counting_admitted_only(running, waiting, token_budget, max_num_seqs):
    plan, budget = [], token_budget
    for rid, left in running:
        if budget == 0:
            break
        plan.append((rid, min(left, budget)))
        budget -= plan[-1][1]
    for rid, left in waiting:
        if budget == 0 or sum(1 for r, _ in plan if r in dict(waiting)) >= max_num_seqs:
            break
        plan.append((rid, min(left, budget)))
        budget -= plan[-1][1]
    return plan


def step_one_token_per_running(running, waiting, token_budget, max_num_seqs):
    return step_right([(rid, 1) for rid, _ in running], waiting, token_budget, max_num_seqs)


def step_newest_first(running, waiting, token_budget, max_num_seqs):
    return step_right(list(reversed(running)), waiting, token_budget, max_num_seqs)


def step_over_budget(running, waiting, token_budget, max_num_seqs):
    plan = [(rid, left) for rid, left in running]
    budget = token_budget - sum(left for _, left in running)
    for rid, left in waiting[:max(0, max_num_seqs - len(running))]:
        if budget > 0:
            plan.append((rid, left))                 # the whole prompt, whatever is left
            budget -= left
    return plan


def step_with_zero_entries(running, waiting, token_budget, max_num_seqs):
    plan, budget = [], token_budget
    for rid, left in running:
        n = min(left, budget)
        plan.append((rid, n))                        # 0 tokens once the budget is gone
        budget -= n
    return plan + step_right([], waiting, budget, max_num_seqs - len(running)) if budget else plan


def step_as_dict(running, waiting, token_budget, max_num_seqs):
    return dict(step_right(running, waiting, token_budget, max_num_seqs))


def step_with_library(running, waiting, token_budget, max_num_seqs):
    from lessons_lib.engine import Scheduler
    Scheduler
    return step_right(running, waiting, token_budget, max_num_seqs)


@pytest.mark.parametrize("answer, fragments", [
    (step_waiting_first, ["a long prompt first in the queue", "expected [('a', 1), ('L', 11)], got [('L', 12)]",
                         "running requests go first"]),
    (step_without_chunking, ["a long prompt first in the queue", "waiting=[('L', 40), ('s', 2)]",
                             "got [('a', 1)]", "with chunked prefill a prompt longer"]),
    (step_skipping, ["a long prompt first in the queue", "got [('a', 1), ('s', 2)]", "starvation"]),
    (step_ignoring_max_seqs, ["max_num_seqs already reached", "('e', 3)]. likely", "count the running ones"]),
    (step_counting_admitted_only, ["max_num_seqs already reached", "('d', 3)]. likely", "not only the ones admitted"]),
    (step_one_token_per_running, ["the budget runs out inside the running list", "takes its next chunk"]),
    (step_newest_first, ["the budget runs out inside the running list", "oldest first"]),
    (step_over_budget, ["over token_budget="]),
    (step_with_zero_entries, ["gets 0 tokens", "leave out a request"]),
    (step_as_dict, ["returned a dict"]),
])
def test_schedule_step_wrong_answers(answer, fragments):
    assert_hint("15.schedule_step", answer, *fragments)


def test_schedule_step_verdicts():
    assert_correct("15.schedule_step", solution_function("15_serving_engine", "schedule_step"))
    assert_correct("15.schedule_step", step_right)
    assert_not_attempted("15.schedule_step", stub)
    assert_refused("15.schedule_step", step_with_library, "Scheduler")


# -- 15.fix_admission (stretch) ------------------------------------------------------------------
class AdmissionQueue:
    def __init__(self, num_blocks, block_size, max_num_seqs):
        self.num_free = num_blocks
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.waiting = []
        self.held = {}

    def add(self, request_id, prompt_len):
        self.waiting.append((request_id, prompt_len))

    def order(self):
        return list(self.waiting)

    def admit(self):
        admitted = []
        for request_id, prompt_len in self.order():
            need = -(-prompt_len // self.block_size)
            if len(self.held) < self.max_num_seqs and need <= self.num_free:
                self.waiting.remove((request_id, prompt_len))
                self.held[request_id] = need
                self.num_free -= need
                admitted.append(request_id)
            elif self.stops():
                break
        return admitted

    def stops(self):
        return True

    def finish(self, request_id):
        self.num_free += self.held.pop(request_id)

    def abort(self, request_id):
        if request_id in self.held:
            self.num_free += self.held.pop(request_id)
        elif any(r == request_id for r, _ in self.waiting):
            self.waiting = [r for r in self.waiting if r[0] != request_id]
        else:
            raise KeyError(f"no request {request_id!r} is waiting or running")


class AsGiven(AdmissionQueue):
    def order(self):
        return sorted(self.waiting, key=lambda r: r[1])

    def stops(self):
        return False

    def abort(self, request_id):
        self.waiting = [r for r in self.waiting if r[0] != request_id]
        self.held.pop(request_id, None)


class SkipsInOrder(AdmissionQueue):
    def stops(self):
        return False


class Leaks(AdmissionQueue):
    def abort(self, request_id):
        if request_id in self.held:
            self.held.pop(request_id)
        else:
            super().abort(request_id)


class KeepsAbortedWaiting(AdmissionQueue):
    def abort(self, request_id):
        if request_id in self.held:
            self.num_free += self.held.pop(request_id)
        elif not any(r == request_id for r, _ in self.waiting):
            raise KeyError(request_id)


class FreesForWaiting(AdmissionQueue):
    def abort(self, request_id):
        for r, length in self.waiting:
            if r == request_id:
                self.num_free += -(-length // self.block_size)
        super().abort(request_id)


class SilentOnUnknown(AdmissionQueue):
    def abort(self, request_id):
        if request_id in self.held or any(r == request_id for r, _ in self.waiting):
            super().abort(request_id)


class KeyErrorWithoutId(AdmissionQueue):
    def abort(self, request_id):
        if request_id in self.held or any(r == request_id for r, _ in self.waiting):
            return super().abort(request_id)
        raise KeyError("unknown request")


class ReturnsNothing(AdmissionQueue):
    def admit(self):
        super().admit()


class UsesLibraryScheduler(AdmissionQueue):
    def admit(self):
        from lessons_lib.engine import Scheduler
        Scheduler
        return super().admit()


@pytest.mark.parametrize("answer, fragments", [
    (AsGiven, ["a long request behind short ones", "admit() -> ['A']", "returned ['s1', 's2'], expected []",
               "smallest prompts first", "starvation"]),
    (SkipsInOrder, ["a long request behind short ones", "returned ['s2', 's1'], expected []",
                    "skipping it lets later"]),
    (Leaks, ["abort a running request", "abort('A')", "num_free is 0, expected 3", "a leak"]),
    (KeepsAbortedWaiting, ["abort a waiting request", "returned ['W'], expected ['X']", "take it out of the queue"]),
    (FreesForWaiting, ["abort('W')", "num_free is 1, expected 0", "holds no blocks"]),
    (SilentOnUnknown, ["abort with nothing to abort", "abort('A')", "expected KeyError", "naming it"]),
    (KeyErrorWithoutId, ["name the unknown id"]),
    (ReturnsNothing, ["admit() returned None"]),
])
def test_fix_admission_wrong_answers(answer, fragments):
    assert_hint("15.fix_admission", answer, *fragments)


def test_fix_admission_verdicts():
    assert_correct("15.fix_admission", solution_function("15_serving_engine", "AdmissionQueue"))
    assert_correct("15.fix_admission", AdmissionQueue)
    assert_not_attempted("15.fix_admission", stub)
    assert_refused("15.fix_admission", UsesLibraryScheduler, "Scheduler")
