"""Serving many replicas: a router, worker processes, policies, health, versions, security.

Lessons 05-08 import their names from here. The modules: ``router`` and ``worker`` (real processes
on loopback sockets, each worker serving with the engine of lesson 15, ``lessons_lib.engine``),
``protocol`` (the messages between them), ``workload`` (seeded requests and their single-process
answers), ``policies`` and ``simulate`` (load balancing, lesson 06), ``health``, ``faults`` and
``elastic`` (failure detection, retries, exactly-once, fault injection, resharding: lesson 07),
``fingerprint``, ``numerics`` and ``versioning`` (consistency: lesson 05), ``security``, ``pii``
and ``isolation`` (lesson 08).
"""

from .elastic import run_elastic, tp_row_parallel_step
from .faults import FAULTS, exactly_once_report, run_with_fault
from .fingerprint import (broadcast_state_, diff_states, gather_fingerprints, shard_manifest, shard_state, short,
                          state_fingerprint, sum_order_demo, tensor_digest)
from .health import ExactlyOnce, FailureDetector, backoff_delays
from .isolation import TenantServer, probe
from .numerics import batch_variance, tp_vs_one_process
from .pii import RedactingFilter, luhn_valid, redact
from .policies import (POLICIES, BoundedPrefixAffinity, KVAware, LeastOutstanding, Policy, PowerOfTwoChoices,
                       PrefixCacheAware, RoundRobin, TokenCostAware, WorkerLoad, make_policy)
from .protocol import MessageTooLarge, Request, Response
from .router import (DuplicateRequestId, NoWorkerError, RequestFailed, RequestQuarantined, Router, RouterClosed,
                     WorkerSpec)
from .security import AuthError, ReplayWindow, SecurityError, TensorOpener, TensorSealer, TokenAuthority, new_key
from .simulate import (CostModel, SimResult, TraceItem, compare_policies, fit_cost_model, make_trace,
                       measure_capacity, percentile, retime, simulate)
from .versioning import rolling_update, run_session
from .worker import load_model, make_engine
from .workload import make_requests, measure_fleet_capacity, measure_step_costs, reference_tokens, replay

__all__ = ["AuthError", "BoundedPrefixAffinity", "CostModel", "DuplicateRequestId", "ExactlyOnce", "FAULTS",
           "FailureDetector", "KVAware", "LeastOutstanding", "MessageTooLarge", "NoWorkerError", "POLICIES",
           "Policy", "PowerOfTwoChoices", "PrefixCacheAware", "RedactingFilter", "ReplayWindow", "Request",
           "RequestFailed", "RequestQuarantined", "Response", "RoundRobin", "Router", "RouterClosed",
           "SecurityError", "SimResult", "TenantServer", "TensorOpener", "TensorSealer", "TokenAuthority",
           "TokenCostAware", "TraceItem", "WorkerLoad", "WorkerSpec", "backoff_delays", "batch_variance",
           "broadcast_state_", "compare_policies", "diff_states", "exactly_once_report", "fit_cost_model",
           "gather_fingerprints", "load_model", "luhn_valid", "make_engine", "make_policy", "make_requests",
           "make_trace", "measure_capacity", "measure_fleet_capacity", "measure_step_costs", "new_key",
           "percentile", "probe", "redact", "reference_tokens", "replay", "retime", "rolling_update",
           "run_elastic", "run_session", "run_with_fault", "shard_manifest", "shard_state", "short", "simulate",
           "state_fingerprint", "sum_order_demo", "tensor_digest", "tp_row_parallel_step", "tp_vs_one_process"]
