"""The executor: run a schedule's actions on this rank, and serve an LM through a pipeline.

:func:`execute` is the whole idea in one loop. For each action in ``schedule.orders[s]``:
receive the micro-batch's activation from the previous stage (the first stage takes it
from its inputs), compute, and send the result to the next stage (the last stage keeps
it). The schedule decides the order; the receives make each stage wait for its input,
which is exactly where the bubble comes from. Busy intervals are recorded so the idle
fraction can be measured, not just computed.

:class:`PipelineInference` uses it for a decoder-only LM, forward-only: a prefill of the
whole prompt, then one token per step with each stage keeping the KV cache of *its own*
layers, one cache per micro-batch. After each step the last stage broadcasts the new
tokens to the other stages of its pipeline, because the first stage needs them as the
next input and every stage needs the grown padding mask. So by default the pipeline **drains
after every token**; ``generate(..., in_flight=True)`` keeps the micro-batches in flight across
tokens instead, as a serving engine does (:mod:`.inflight`).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist

from ...comm.agree import check_same_across_ranks
from ...comm.collectives import check_inputs
from ...model.generate import check_context_length, decode_loop, last_token_logits
from ...model.kv_cache import KVCache
from ...validate import bad, check_choice, check_int
from .inflight import decode_in_flight
from .p2p import TensorReceiver, send_tensor, wait_all
from .partition import microbatch_sizes
from .schedule import SCHEDULES, Schedule, make_schedule


def execute(schedule: Schedule, stage_index: int, compute: Callable[[int, torch.Tensor], torch.Tensor],
            inputs: list[torch.Tensor] | None = None, *, prev: int | None = None,
            next: int | None = None, records: list | None = None, group=None,
            check: bool = True) -> list[torch.Tensor] | None:
    """Run the forward actions of ``schedule`` for stage ``stage_index`` on this rank.

    ``compute(microbatch, x)`` is the stage's work; ``inputs[i]`` is micro-batch ``i``'s
    input (first stage only); ``prev``/``next`` are the neighbours' global ranks (from the
    mesh). ``records``, if given, receives ``(action, start, end)`` busy intervals
    (``time.perf_counter``, which is one system-wide clock on Linux). Returns the outputs
    per micro-batch on the last stage, ``None`` elsewhere.

    ``group`` holds the pipeline's stages (``mesh.pp_group``; None: every rank). With ``check``
    they first check they run the same schedule (one tiny all-gather): a stage expecting more
    micro-batches than its neighbour sends would wait for ever.
    """
    if not isinstance(schedule, Schedule):
        raise bad("schedule", schedule, "a Schedule (make_schedule, gpipe or one_f_one_b)")
    check_int("stage_index", stage_index, low=0, high=schedule.n_stages - 1)
    if check:
        check_same_across_ranks({"schedule": schedule.name, "n_stages": schedule.n_stages,
                                 "n_microbatches": schedule.n_microbatches}, group, call="execute")
    if schedule.has_backward:
        raise ValueError(f"schedule {schedule.name!r} has backward actions; inference runs "
                         "forward-only schedules: build it with backward=False")
    first, last = prev is None, next is None
    if first and (inputs is None or len(inputs) != schedule.n_microbatches):
        raise ValueError(f"the first stage needs inputs for all {schedule.n_microbatches} micro-batches")
    outputs: list = [None] * schedule.n_microbatches
    pending: list = []
    order = schedule.orders[stage_index]
    receiver = None if first else TensorReceiver(prev)
    for n, action in enumerate(order):
        x = inputs[action.microbatch] if first else receiver.recv(more=n + 1 < len(order))
        start = time.perf_counter()
        y = compute(action.microbatch, x)
        if records is not None:
            records.append((action, start, time.perf_counter()))
        if last:
            outputs[action.microbatch] = y
        else:
            pending.append(send_tensor(y, next))
    wait_all(pending)
    return outputs if last else None


def idle_fraction(records_per_stage: list[list]) -> float:
    """Measured bubble: ``1 - busy / (stages x wall time)`` from per-stage busy intervals."""
    starts = [s for recs in records_per_stage for _, s, _ in recs]
    ends = [e for recs in records_per_stage for _, _, e in recs]
    span = max(ends) - min(starts)
    busy = sum(e - s for recs in records_per_stage for _, s, e in recs)
    return 1.0 - busy / (len(records_per_stage) * span)


class PipelineInference:
    """Serve an LM through a pipeline: ``forward`` (logits of a full pass) and ``generate``.

    Create on every rank of the mesh with that rank's stage (see
    :func:`~.stage.build_stage`). Every rank of a pipeline passes the same ``input_ids``
    and ``attention_mask``: the non-first stages use them only for shapes and the mask.
    """

    def __init__(self, stage, mesh, n_microbatches: int = 1, schedule: str = "gpipe") -> None:
        check_int("n_microbatches", n_microbatches, low=1)
        check_choice("schedule", schedule, SCHEDULES)
        if stage.n_stages != mesh.pp or stage.stage_index != mesh.pp_rank:
            raise ValueError(f"stage {stage.stage_index}/{stage.n_stages} does not match the mesh's "
                             f"pp_rank {mesh.pp_rank}/{mesh.pp}: build it with build_stage(model, mesh)")
        self.stage, self.mesh = stage, mesh
        self.n_microbatches, self.schedule_name = n_microbatches, schedule
        self.records: list = []     # (action, start, end) of this stage in the latest pass
        self.generate_records: list = []   # every busy interval of the latest generate call

    def _run(self, ids: torch.Tensor, mask: torch.Tensor, caches: list | None):
        m = self.n_microbatches
        sizes = microbatch_sizes(ids.shape[0], m)
        id_mbs, mask_mbs = torch.split(ids, sizes), torch.split(mask, sizes)
        schedule = make_schedule(self.schedule_name, self.mesh.pp, m, backward=False)

        def compute(i, x):
            return self.stage(x, mask_mbs[i], caches[i] if caches is not None else None)

        self.records = []           # busy intervals of the latest pass only
        # The stages checked their arguments once per call (_check_batch), not once per step.
        return execute(schedule, self.mesh.pp_rank, compute, list(id_mbs), prev=self.mesh.pp_prev,
                       next=self.mesh.pp_next, records=self.records, check=False)

    def _check_batch(self, call: str, input_ids, attention_mask, **same) -> torch.Tensor:
        """Check that every stage got the same batch, then return the padding mask.

        Every stage cuts the batch into the same micro-batches: a stage given another batch size
        (or micro-batch count, or schedule) would run the model on mismatched pieces or wait for
        a message that never comes. One small all-gather over the pipeline's group checks it.
        """
        def shape(t):
            return tuple(t.shape) if isinstance(t, torch.Tensor) else t

        check_inputs({"input_ids": input_ids}, self.mesh.pp_group, call=call, dtypes=None, contiguous=False,
                     min_dim=2, same={"input_ids.shape": shape(input_ids), "attention_mask.shape":
                                      shape(attention_mask), "n_microbatches": self.n_microbatches,
                                      "schedule": self.schedule_name, **same})
        if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise bad("input_ids", input_ids, "integer token ids", f"got a {input_ids.dtype} tensor")
        if attention_mask is None:
            return torch.ones_like(input_ids)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise bad("attention_mask", attention_mask, f"None or a tensor of input_ids' shape "
                      f"{tuple(input_ids.shape)}")
        return attention_mask.long()

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Logits (batch, seq, vocab) of one pass with no cache, on the last stage; None elsewhere."""
        mask = self._check_batch("PipelineInference.forward", input_ids, attention_mask)
        outs = self._run(input_ids, mask, None)
        return torch.cat(outs) if outs is not None else None

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 attention_mask: torch.Tensor | None = None, *, in_flight: bool = False) -> torch.Tensor:
        """Greedy decoding with the KV cache; returns (batch, prompt + new) ids on every stage.

        By default each token is one whole schedule (fill, steady state, drain) followed by a
        broadcast of the new tokens: the bubble is paid on every token. ``in_flight=True`` keeps
        the micro-batches in flight across tokens (:func:`.inflight.decode_in_flight`): the
        pipeline fills once. The tokens are the same. ``generate_records`` then holds every busy
        interval of the call as ``((step, micro-batch), start, end)``, to measure either loop.
        """
        mask = self._check_batch("PipelineInference.generate", input_ids, attention_mask,
                                 max_new_tokens=max_new_tokens, in_flight=in_flight)
        check_int("max_new_tokens", max_new_tokens, low=0)
        if not isinstance(in_flight, bool):
            raise bad("in_flight", in_flight, "True (micro-batches in flight across tokens) or False "
                      "(the pipeline drains after every token)")
        batch = input_ids.shape[0]
        microbatch_sizes(batch, self.n_microbatches)        # fail early, on every rank alike
        check_context_length(self.stage.max_seq_len, mask, max_new_tokens)
        self.generate_records = []
        if in_flight:
            return decode_in_flight(self.stage, self.mesh, input_ids, max_new_tokens, mask,
                                    self.n_microbatches, self.generate_records)
        caches = [KVCache() for _ in range(self.n_microbatches)]
        last_rank = self.mesh.ranks("pp")[-1]
        steps = iter(range(max_new_tokens))

        def forward_last(step_ids, step_mask):
            outs = self._run(step_ids, step_mask, caches)
            step = next(steps)
            self.generate_records += [((step, action.microbatch), start, end)
                                      for action, start, end in self.records]
            return None if outs is None else last_token_logits(torch.cat(outs), step_mask)

        def pick(last_logits):
            # Only the last stage has logits: it chooses, and every stage learns the choice.
            next_ids = torch.empty(batch, dtype=torch.long) if last_logits is None else last_logits.argmax(dim=-1)
            dist.broadcast(next_ids, src=last_rank, group=self.mesh.pp_group)
            return next_ids

        return decode_loop(forward_last, pick, input_ids, mask, max_new_tokens)
