"""``LLMEngine``: continuous batching over a paged KV cache, in vLLM's names.

::

    engine = LLMEngine(model, block_size=16, num_blocks=256, max_num_seqs=16)
    engine.add_request("a", prompt_ids, SamplingParams(max_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step():          # one batched forward per step
            print(out.request_id, out.new_token_ids, out.finished)

Each :meth:`LLMEngine.step` asks the :class:`~.scheduler.Scheduler` which requests run and how
many tokens each computes, runs them as one packed forward (:mod:`.model_runner`), samples a
token for every request whose known tokens are now all computed, and frees the blocks of the
requests that finished. Greedy outputs are token for token those of
:func:`lessons_lib.model.generate` on the prompt alone, whatever else shares the batch.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from ..caching.paged_kv import KVBlockPool, blocks_needed
from ..model.generate import sample_next_token
from ..validate import bad, check_int, check_str, check_token_ids
from .block_manager import BlockManager
from .model_runner import execute_model
from .request import Request, RequestOutput, RequestStatus, SamplingParams
from .scheduler import Scheduler, SchedulerOutput


@dataclass(frozen=True)
class EngineStats:
    """The engine at one moment (``LLMEngine.stats()``)."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    kv_usage: float              # fraction of blocks held by requests
    kv_tokens: int               # tokens whose keys and values the running requests hold
    kv_slots: int                # token slots in the blocks they hold (kv_tokens / kv_slots: utilisation)
    prefix_hit_rate: float       # prompt tokens found in the prefix cache / prompt tokens looked up
    num_preemptions: int
    num_steps: int
    num_computed_tokens: int     # tokens run through the model, prefill and decode, in all
    num_generated_tokens: int


class LLMEngine:
    """Serve many requests at once from one model replica.

    Args:
        model: a decoder whose layers call ``cache[i].update(k, v)`` and whose ``prepare_inputs``
            accepts a packed cache (the course's ``TinyLM``, or a tensor-parallel wrapper of it).
        block_size: tokens per KV block.
        num_blocks: blocks in the pool; by default enough for ``max_num_seqs`` full contexts.
        max_num_seqs: running requests at most.
        max_num_batched_tokens: tokens computed per step at most (decode tokens + prefill chunks).
        enable_prefix_caching: share the blocks of prompt prefixes computed before.
        enable_chunked_prefill: let a prompt's prefill take several steps; without it a prompt is
            prefilled in one step and must fit ``max_num_batched_tokens``.
        clock: the time source of the metrics (``time.perf_counter``).
    """

    def __init__(self, model, *, block_size: int = 16, num_blocks: int | None = None,
                 max_num_seqs: int = 16, max_num_batched_tokens: int | None = None,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                 clock=time.perf_counter) -> None:
        config = getattr(model, "config", None)
        if not isinstance(model, torch.nn.Module) or config is None:
            raise bad("model", model, "a TinyLM (an nn.Module with a .config)")
        self.model = model.eval()
        self.config = config
        check_int("block_size", block_size, low=1)
        check_int("max_num_seqs", max_num_seqs, low=1)
        if num_blocks is None:
            num_blocks = max_num_seqs * blocks_needed(config.max_seq_len, block_size)
        check_int("num_blocks", num_blocks, low=max_num_seqs,
                  why=f"at least one block per running sequence (max_num_seqs={max_num_seqs})")
        if max_num_batched_tokens is None:
            max_num_batched_tokens = 256 if enable_chunked_prefill else config.max_seq_len
        check_int("max_num_batched_tokens", max_num_batched_tokens, low=1,
                  why="tokens computed per step")
        for name, flag in (("enable_prefix_caching", enable_prefix_caching),
                           ("enable_chunked_prefill", enable_chunked_prefill)):
            if not isinstance(flag, bool):
                raise bad(name, flag, "True or False")
        if not callable(clock):
            raise bad("clock", clock, "a function returning seconds, e.g. time.perf_counter")
        dtype = next(model.parameters()).dtype
        self.pool = KVBlockPool(num_blocks, block_size, config.n_layers, config.n_kv_heads,
                                config.head_dim, dtype=dtype)
        self.block_manager = BlockManager(self.pool.allocator, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens,
                                   enable_chunked_prefill=enable_chunked_prefill)
        self.block_size, self.num_blocks = block_size, num_blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.clock = clock
        self.requests: dict[str, Request] = {}       # unfinished requests by id
        self.num_steps = self.num_computed_tokens = self.num_generated_tokens = 0
        self.last_schedule: SchedulerOutput | None = None
        self._generate_ids = itertools.count()

    # -- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids, sampling_params: SamplingParams | None = None,
                    *, cache_salt: str = "") -> None:
        """Queue a request. Everything that could never be served is refused here, by name."""
        check_str("request_id", request_id)
        if request_id in self.requests:
            raise bad("request_id", request_id, "an id no unfinished request uses",
                      "it is already queued or running; abort it first or choose another id")
        if isinstance(prompt_token_ids, torch.Tensor):
            if prompt_token_ids.dim() != 1:
                raise bad("prompt_token_ids", prompt_token_ids, "one prompt: a list of ints or a 1-D tensor")
            prompt_token_ids = check_token_ids("prompt_token_ids", prompt_token_ids,
                                               self.config.vocab_size).tolist()
        prompt = [int(t) for t in check_token_ids("prompt_token_ids", prompt_token_ids,
                                                   self.config.vocab_size)]
        params = SamplingParams() if sampling_params is None else sampling_params
        if not isinstance(params, SamplingParams):
            raise bad("sampling_params", sampling_params, "a SamplingParams, e.g. SamplingParams(max_tokens=16)")
        check_str("cache_salt", cache_salt, allow_empty=True)
        context = len(prompt) + params.max_tokens
        if context > self.config.max_seq_len:
            raise bad("prompt_token_ids", f"a prompt of {len(prompt)} tokens",
                      f"prompt + max_tokens <= max_seq_len={self.config.max_seq_len}",
                      f"{len(prompt)} + max_tokens={params.max_tokens} = {context}")
        # The KV cache holds every token but the last one produced.
        needed = blocks_needed(context - 1, self.block_size)
        if needed > self.num_blocks:
            raise bad("prompt_token_ids", f"a prompt of {len(prompt)} tokens",
                      f"a request that fits the pool: prompt + max_tokens - 1 <= "
                      f"num_blocks x block_size = {self.num_blocks * self.block_size} tokens",
                      f"it needs {needed} blocks of {self.block_size}; the pool has {self.num_blocks}")
        if not self.enable_chunked_prefill and context - 1 > self.max_num_batched_tokens:
            raise bad("prompt_token_ids", f"a prompt of {len(prompt)} tokens",
                      f"prompt + max_tokens - 1 <= max_num_batched_tokens={self.max_num_batched_tokens} "
                      "without chunked prefill", "a preempted request recomputes prompt and outputs in "
                      "one step: raise max_num_batched_tokens or enable_chunked_prefill")
        request = Request(request_id, prompt, params, self.clock(), cache_salt)
        self.requests[request_id] = request
        self.scheduler.add(request)

    def add_prefilled_request(self, request_id: str, prompt_token_ids, sampling_params: SamplingParams,
                              first_token: int, install_kv) -> None:
        """Admit a request whose prompt was prefilled elsewhere: it joins the running requests at once.

        Prefill/decode disaggregation (lesson 17): another worker computed the prompt's keys and
        values and its first token. ``install_kv(pool, block_table)`` writes those keys and values
        into the blocks this engine gives the request. Everything ``add_request`` checks is checked;
        a request the free blocks cannot hold is refused with nothing taken. ``max_num_seqs`` bounds
        what the scheduler admits from the queue; a prefilled request brings its KV and runs at once.
        """
        params = SamplingParams() if sampling_params is None else sampling_params
        if not isinstance(params, SamplingParams) or params.max_tokens < 2:
            raise bad("sampling_params", sampling_params, "a SamplingParams with max_tokens >= 2",
                      "its first token came with the prefill: at least one is left to decode")
        check_int("first_token", first_token, low=0, high=self.config.vocab_size - 1)
        if not callable(install_kv):
            raise bad("install_kv", install_kv, "a function (pool, block_table) that writes the prompt's KV")
        self.add_request(request_id, prompt_token_ids, params)
        request = self.requests[request_id]
        self.scheduler.waiting.remove(request)
        n = len(request.prompt_token_ids)
        if not self.block_manager.allocate_slots(request, n):
            del self.requests[request_id]
            raise bad("prompt_token_ids", f"a prefilled request of {n} tokens",
                      f"a request that fits the free blocks ({self.block_manager.num_free_blocks} of "
                      f"{self.num_blocks} free)", "accept it once running requests finish")
        try:
            install_kv(self.pool, self.block_manager.block_table(request_id))
        except BaseException:
            self.block_manager.free(request)
            del self.requests[request_id]
            raise
        request.num_computed_tokens = n
        request.num_cached_tokens = 0
        request.output_token_ids.append(first_token)
        now = self.clock()
        request.metrics.first_scheduled_time = request.metrics.first_token_time = now
        request.metrics.token_times.append(now)
        request.status = RequestStatus.RUNNING
        self.scheduler.running.append(request)
        self.block_manager.cache_full_blocks(request)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its blocks."""
        if request_id not in self.requests:
            known = sorted(self.requests)
            raise bad("request_id", request_id, "the id of an unfinished request",
                      f"unfinished: {known[:8]}{' ...' if len(known) > 8 else ''}" if known
                      else "no request is unfinished")
        request = self.requests.pop(request_id)
        self.scheduler.finish(request)
        request.finish_reason = "abort"
        request.metrics.finished_time = self.clock()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # -- one step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run one packed forward, sample; the outputs of requests that got a token."""
        plan = self.scheduler.schedule()
        self.last_schedule = plan
        self.num_steps += 1
        if not plan.scheduled:
            if self.scheduler.running or self.scheduler.waiting:
                self._check_progress()
            return []
        now = self.clock()
        input_ids, seqs = [], []
        for request, num_new in plan.scheduled:
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
            start = request.num_computed_tokens
            input_ids += request.all_token_ids[start:start + num_new]
            seqs.append((self.block_manager.block_tables[request.request_id], start, num_new))
        logits = execute_model(self.model, self.pool, input_ids, seqs)
        self.num_computed_tokens += len(input_ids)

        sampling = []                       # (row of logits, request) for requests that now sample
        for row, (request, num_new) in enumerate(plan.scheduled):
            request.num_computed_tokens += num_new
            self.block_manager.cache_full_blocks(request)
            if request.num_computed_tokens == request.num_tokens:
                sampling.append((row, request))
        new_tokens = self._sample(logits, sampling)
        now = self.clock()
        outputs = []
        for (row, request), token in zip(sampling, new_tokens):
            request.output_token_ids.append(token)
            self.num_generated_tokens += 1
            metrics = request.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            metrics.token_times.append(now)
            params = request.sampling_params
            if token in params.stop_token_ids:
                request.finish_reason = "stop"
            elif len(request.output_token_ids) >= params.max_tokens:
                request.finish_reason = "length"
            finished = request.finish_reason is not None
            if finished:
                metrics.finished_time = now
                self.scheduler.finish(request)
                del self.requests[request.request_id]
            outputs.append(self._output(request, [token]))
        return outputs

    def _sample(self, logits: torch.Tensor, sampling: list[tuple[int, Request]]) -> list[int]:
        """One token per request: arg-max for greedy ones in one call, each sampler its own generator."""
        tokens = [0] * len(sampling)
        greedy = [i for i, (_, r) in enumerate(sampling) if r.sampling_params.greedy]
        if greedy:
            rows = torch.tensor([sampling[i][0] for i in greedy], dtype=torch.long)
            picked = sample_next_token(logits[rows], greedy=True).tolist()
            for i, token in zip(greedy, picked):
                tokens[i] = token
        for i, (row, request) in enumerate(sampling):
            params = request.sampling_params
            if not params.greedy:
                tokens[i] = int(sample_next_token(logits[row:row + 1], greedy=False,
                                                  temperature=params.temperature,
                                                  generator=request.generator)[0])
        return tokens

    def _check_progress(self) -> None:
        """A step that scheduled nothing while requests wait can only repeat: say why instead."""
        waiting = self.scheduler.waiting[0] if self.scheduler.waiting else None
        raise RuntimeError(
            f"the engine cannot schedule any request: {len(self.scheduler.running)} running, "
            f"{len(self.scheduler.waiting)} waiting (first: {waiting}), "
            f"{self.block_manager.num_free_blocks} of {self.num_blocks} blocks free")

    def _output(self, request: Request, new_tokens: list[int]) -> RequestOutput:
        return RequestOutput(request.request_id, new_tokens, list(request.output_token_ids),
                             request.finish_reason is not None, request.finish_reason,
                             request.num_cached_tokens or 0, request.metrics)

    # -- whole workloads ------------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Serve ``prompts`` (lists of token ids) to completion; one final output each, in order."""
        if isinstance(prompts, torch.Tensor) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise bad("prompts", prompts, "a non-empty list of prompts, each a list of token ids")
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise bad("sampling_params", f"a list of {len(sampling_params)}",
                          f"one SamplingParams or a list of {len(prompts)}, one per prompt")
            params = list(sampling_params)
        else:
            params = [sampling_params] * len(prompts)
        ids = [f"generate-{next(self._generate_ids)}" for _ in prompts]
        added = []
        try:
            for rid, prompt, p in zip(ids, prompts, params):
                self.add_request(rid, prompt, p)
                added.append(rid)
        except BaseException:
            for rid in added:
                self.abort_request(rid)
            raise
        final: dict[str, RequestOutput] = {}
        while any(rid not in final for rid in ids):
            for out in self.step():
                if out.finished and out.request_id in ids:
                    final[out.request_id] = out
        return [RequestOutput(rid, list(final[rid].output_token_ids), list(final[rid].output_token_ids),
                              True, final[rid].finish_reason, final[rid].num_cached_tokens,
                              final[rid].metrics) for rid in ids]

    # -- what it looks like inside ----------------------------------------------------------------
    def stats(self) -> EngineStats:
        bm = self.block_manager
        running = self.scheduler.running
        kv_tokens = sum(r.num_computed_tokens for r in running)
        kv_slots = sum(len(bm.block_tables.get(r.request_id, [])) for r in running) * self.block_size
        return EngineStats(
            num_running=len(running), num_waiting=len(self.scheduler.waiting),
            num_free_blocks=bm.num_free_blocks, num_blocks=self.num_blocks, kv_usage=bm.usage,
            kv_tokens=kv_tokens, kv_slots=kv_slots, prefix_hit_rate=bm.prefix_hit_rate,
            num_preemptions=self.scheduler.num_preemptions, num_steps=self.num_steps,
            num_computed_tokens=self.num_computed_tokens, num_generated_tokens=self.num_generated_tokens)

    def snapshot(self) -> list[dict]:
        """Every unfinished request: its state, tokens, computed tokens and block table (for pictures)."""
        rows = []
        for request in list(self.scheduler.running) + list(self.scheduler.waiting):
            rows.append({"request_id": request.request_id, "status": request.status.value,
                         "prompt_tokens": len(request.prompt_token_ids),
                         "output_tokens": len(request.output_token_ids),
                         "computed_tokens": request.num_computed_tokens,
                         "block_table": self.block_manager.block_table(request.request_id)})
        return rows

    def __repr__(self) -> str:
        s = self.stats()
        return (f"LLMEngine(running={s.num_running}, waiting={s.num_waiting}, "
                f"free_blocks={s.num_free_blocks}/{s.num_blocks}, steps={s.num_steps})")


__all__ = ["EngineStats", "LLMEngine", "RequestStatus"]
