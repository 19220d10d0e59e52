"""Prefill/decode disaggregation (lesson 17): prompts and decodes on separate workers, KV shipped.

* :mod:`.transfer`: a request's KV blocks packed (exactly 2 x layers x kv_heads x head_dim x bytes
  x tokens), sealed with lesson 08's AES-GCM, checked against lesson 05's fingerprint and the
  receiver's layout;
* :mod:`.workers`: :class:`PrefillWorker` and :class:`DecodeWorker` (an engine that never runs a
  prompt), and recovery of a request whose decode worker died;
* :mod:`.ranks`: the two workers as two real ranks, every receive under a timeout;
* :mod:`.timeline`: colocated against disaggregated serving on a trace, in a stated cost model
  (ITL, TTFT with the transfer, goodput under an SLO).
"""

from .ranks import recv_bytes, serve_on_ranks
from .timeline import (Arrival, CostModel, ScheduleOnlyLM, Served, Timeline, draw_timeline, long_prompt_trace,
                       percentile, run_colocated, run_disaggregated)
from .transfer import (KVLayout, KVLayoutMismatch, KVTransfer, ModelVersionMismatch, TransferTimeout,
                       check_layout, check_version, kv_transfer_bytes, open_transfer, pack_kv,
                       seal_transfer, unpack_kv)
from .workers import DecodeWorker, PrefillWorker, model_fingerprint, resume_transfer

__all__ = ["Arrival", "CostModel", "DecodeWorker", "KVLayout", "KVLayoutMismatch", "KVTransfer",
           "ModelVersionMismatch", "PrefillWorker", "ScheduleOnlyLM", "Served", "Timeline", "TransferTimeout",
           "check_layout", "check_version", "draw_timeline", "kv_transfer_bytes", "long_prompt_trace",
           "model_fingerprint", "open_transfer", "pack_kv", "percentile", "recv_bytes", "resume_transfer",
           "run_colocated", "run_disaggregated", "seal_transfer", "serve_on_ranks", "unpack_kv"]
