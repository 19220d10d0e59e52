"""Decoding with micro-batches in flight across tokens: the pipeline fills once, not per token.

``PipelineInference.generate`` (the default) runs one whole schedule per token: every stage
fills, works and drains, the last stage broadcasts the new tokens, and only then does the next
token start. The bubble ``(p-1)/(m+p-1)`` is paid on every token.

A serving engine keeps the pipeline full instead. Its micro-batches are independent groups of
requests, so micro-batch ``i``'s next token can enter stage 0 as soon as its previous token leaves
the last stage, while the other micro-batches are still in flight. vLLM's V0 engine did this with
one "virtual engine" (scheduler and KV cache) per pipeline stage
(https://github.com/vllm-project/vllm/issues/11945). :func:`decode_in_flight` is that loop:

- every stage runs ``(step, micro-batch)`` in the same order, step-major:
  ``(0, 0), (0, 1), ..., (0, m-1), (1, 0), ...``;
- the last stage sends micro-batch ``i``'s new token straight back to the first stage (one small
  point-to-point message, not a broadcast), which uses it as that micro-batch's next input;
- with ``m >= p`` micro-batches and stages of equal cost, the token is back before the first stage
  needs it, so after the first fill no stage waits until the final drain.

The tokens are exactly those of the drain-every-token loop (same stages, same caches, same
order of work within each micro-batch); only *when* each piece runs changes.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ...model.generate import last_token_logits
from ...model.kv_cache import KVCache
from .p2p import TensorReceiver, send_tensor, wait_all
from .partition import microbatch_sizes


@torch.no_grad()
def decode_in_flight(stage, mesh, input_ids: torch.Tensor, max_new_tokens: int,
                     mask: torch.Tensor, n_microbatches: int, records: list | None = None) -> torch.Tensor:
    """Greedy generation with ``n_microbatches`` in flight across tokens; (batch, prompt + new) ids.

    Call on every stage of the pipeline with the same (already checked) batch and padding
    ``mask``; :meth:`PipelineInference.generate` with ``in_flight=True`` does the checking.
    ``records``, if given, receives ``((step, micro-batch), start, end)`` busy intervals.
    """
    batch, m = input_ids.shape[0], n_microbatches
    sizes = microbatch_sizes(batch, m)
    ids_mbs = list(torch.split(input_ids, sizes))
    mask_mbs = list(torch.split(mask, sizes))
    caches = [KVCache() for _ in range(m)]
    first, last = mesh.is_first_stage, mesh.is_last_stage
    pp_ranks = mesh.ranks("pp")
    activations = None if first else TensorReceiver(mesh.pp_prev)
    tokens_back = TensorReceiver(pp_ranks[-1]) if first and not last else None
    returns_left = m * (max_new_tokens - 1)          # tokens the first stage will be sent back
    new = [[] for _ in range(m)]                     # each micro-batch's new tokens, on the last stage
    pending: list = []
    order = [(k, i) for k in range(max_new_tokens) for i in range(m)]
    for n, (k, i) in enumerate(order):
        if not first:
            x = activations.recv(more=n + 1 < len(order))
        elif k == 0:
            x = ids_mbs[i]
        elif last:
            x = new[i][-1][:, None]                  # one stage: its own token, no message
        else:
            returns_left -= 1
            x = tokens_back.recv(more=returns_left > 0)[:, None]
        start = time.perf_counter()
        y = stage(x, mask_mbs[i], caches[i])
        if last:
            y = last_token_logits(y, mask_mbs[i]).argmax(dim=-1)
        if records is not None:
            records.append(((k, i), start, time.perf_counter()))
        if last:
            new[i].append(y)
            if not first and k + 1 < max_new_tokens:
                pending.append(send_tensor(y, pp_ranks[0]))
        else:
            pending.append(send_tensor(y, mesh.pp_next))
        mask_mbs[i] = torch.cat([mask_mbs[i], torch.ones_like(mask_mbs[i][:, :1])], dim=1)
    wait_all(pending)
    out = torch.empty(batch, input_ids.shape[1] + max_new_tokens, dtype=torch.long)
    if last:
        generated = torch.cat([torch.stack(t, dim=1) if t else torch.empty(n, 0, dtype=torch.long)
                               for t, n in zip(new, sizes)])
        out = torch.cat([input_ids, generated], dim=1)
    if len(pp_ranks) > 1:                            # one broadcast at the end, not one per token
        dist.broadcast(out, src=pp_ranks[-1], group=mesh.pp_group)
    return out


__all__ = ["decode_in_flight"]
