"""A serving engine: continuous batching over a paged KV cache (lesson 15), in vLLM's names.

``LLMEngine`` takes requests (``add_request``) and advances them all one step at a time
(``step``): the ``Scheduler`` picks what runs under a token budget, the ``BlockManager`` gives
each request KV blocks (sharing cached prefixes), and one packed forward serves the whole batch.
"""

from .block_manager import BlockManager
from .llm_engine import EngineStats, LLMEngine
from .model_runner import PagedBatch, execute_model
from .request import Request, RequestMetrics, RequestOutput, RequestStatus, SamplingParams
from .scheduler import Scheduler, SchedulerOutput

__all__ = ["BlockManager", "EngineStats", "LLMEngine", "PagedBatch", "Request", "RequestMetrics",
           "RequestOutput", "RequestStatus", "SamplingParams", "Scheduler", "SchedulerOutput",
           "execute_model"]
