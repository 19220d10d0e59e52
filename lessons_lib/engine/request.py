"""What a client hands the engine (a prompt and its sampling parameters) and what it gets back.

Names follow vLLM: :class:`SamplingParams`, a request id per request, a :class:`RequestOutput`
per request and step carrying the tokens that step produced, and per-request metrics.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ..validate import bad, check_int, check_real


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    Attributes:
        max_tokens: new tokens to produce at most (>= 1).
        temperature: 0 is greedy (arg-max); above 0 samples from softmax(logits / temperature).
        seed: seeds this request's own random generator, so its sampled tokens do not depend on
            which other requests share its batches.
        stop_token_ids: a request that produces one of these is finished (the token is kept).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        check_int("max_tokens", self.max_tokens, low=1, why="the number of new tokens to produce")
        check_real("temperature", self.temperature, low=0, why="0 for greedy decoding")
        if self.seed is not None:
            check_int("seed", self.seed, low=0, high=2 ** 63 - 1)
        if isinstance(self.stop_token_ids, (str, bytes, int)):
            raise bad("stop_token_ids", self.stop_token_ids, "a tuple of token ids, e.g. (eos_id,)")
        ids = tuple(self.stop_token_ids)
        for t in ids:
            check_int("stop_token_ids", t, low=0, why="each a token id")
        object.__setattr__(self, "stop_token_ids", ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    """Timestamps of one request (seconds on the engine's clock) and what they add up to.

    TTFT (time to first token) = first token - arrival; TPOT (time per output token) is the
    mean gap between later tokens; the inter-token latencies are those gaps one by one.
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished_time: float | None = None

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def inter_token_latencies(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def tpot(self) -> float | None:
        gaps = self.inter_token_latencies
        return sum(gaps) / len(gaps) if gaps else None

    @property
    def e2e(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


class Request:
    """A request inside the engine: its tokens, how many have keys and values, its state.

    ``num_computed_tokens`` counts the tokens whose keys and values sit in the KV cache. The
    tokens still to compute are ``all_token_ids[num_computed_tokens:]``: the rest of the prompt
    while prefilling (a chunk at a time), one token while decoding, and prompt + outputs again
    after a preemption by recompute.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 arrival_time: float, cache_salt: str = "") -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.sampling_params = sampling_params
        self.cache_salt = cache_salt
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens: int | None = None   # prompt tokens found in the prefix cache, first time
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.metrics = RequestMetrics(arrival_time)
        self.generator = None
        if not sampling_params.greedy:
            self.generator = torch.Generator()
            if sampling_params.seed is not None:
                self.generator.manual_seed(sampling_params.seed)
            else:
                self.generator.seed()

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def max_num_tokens(self) -> int:
        """Prompt plus every token it may produce: the context it may need."""
        return len(self.prompt_token_ids) + self.sampling_params.max_tokens

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.value}, prompt={len(self.prompt_token_ids)}, "
                f"out={len(self.output_token_ids)}, computed={self.num_computed_tokens})")


@dataclass
class RequestOutput:
    """One request's news from one engine step (or its final state from :meth:`LLMEngine.generate`).

    Attributes:
        request_id: the id given to ``add_request``.
        new_token_ids: the tokens produced by this step (all of them, from ``generate``).
        output_token_ids: every token produced so far.
        finished: no more tokens will come.
        finish_reason: ``"length"`` (max_tokens reached), ``"stop"`` (a stop token) or None.
        num_cached_tokens: prompt tokens whose keys and values came from the prefix cache.
        metrics: the request's :class:`RequestMetrics`.
    """

    request_id: str
    new_token_ids: list[int]
    output_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_cached_tokens: int
    metrics: RequestMetrics
