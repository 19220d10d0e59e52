"""Continuous batching: which requests run this step, and how many tokens each.

Every step the scheduler re-forms the batch (Orca's iteration-level scheduling, Yu et al.,
OSDI 2022): a request that finished leaves at once and a waiting one takes its place, instead
of the whole batch waiting for its longest member. A step has a *token budget*
(``max_num_batched_tokens``) shared by decode tokens (one per running request) and prefill
tokens; with chunked prefill a long prompt takes only what is left of the budget and goes on
next step, so it cannot stall the running requests' next tokens.

The policy, vLLM's at teaching size:

1. Running requests first, oldest first: each gets its next token (or its next prefill chunk).
   If the pool has no block for it, the newest running request is *preempted by recompute*:
   its blocks are freed, it goes back to the front of the queue, and later it prefills prompt and
   outputs again (with prefix caching, much of that is found in the cache).
2. Then waiting requests, first come first served, while the budget, ``max_num_seqs`` and the
   free blocks allow. The queue is not reordered: a request that does not fit stops admission,
   so no later, smaller request overtakes it (no starvation). Nothing is admitted in a step that
   had to preempt.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """One step's plan: ``(request, tokens to compute)`` in batch order, and who was preempted."""

    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    """Waiting and running queues, a token budget per step, preemption when blocks run out."""

    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.block_manager.allocate_slots(request, num_new):
                victim = self.running.pop()            # the newest running request
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.scheduled.append((request, num_new))
                budget -= num_new
                i += 1
                continue
            break
        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            computed = self.block_manager.get_computed_blocks(request)
            num_cached = len(computed) * self.block_manager.block_size
            num_new = request.num_tokens - num_cached
            if num_new > budget:
                if not self.enable_chunked_prefill:
                    break
                num_new = budget
            if not self.block_manager.allocate_slots(request, num_new, computed):
                break
            self.waiting.popleft()
            if request.num_cached_tokens is None:
                request.num_cached_tokens = num_cached
                self.block_manager.note_lookup(request, num_cached)
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append((request, num_new))
            budget -= num_new
        return out

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def finish(self, request: Request) -> None:
        """Take a finished (or aborted) request out of its queue and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.block_manager.free(request)
        request.status = RequestStatus.FINISHED
