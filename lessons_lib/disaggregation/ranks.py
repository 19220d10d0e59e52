"""The prefill worker and the decode worker as two real ranks (gloo), every receive under a timeout.

Rank 0 prefills each prompt, seals its :class:`~.transfer.KVTransfer` (lesson 08) and sends the two
sealed messages to rank 1 with :func:`send_bytes`; rank 1 receives them with :func:`recv_bytes`,
opens them, checks the model version and the KV layout, installs the KV into its decode engine and
decodes. A transfer that fails a check is refused by name and the decode rank goes on with the
next one: it has received the whole message, so no send is left waiting. A message that does not
come within ``timeout`` seconds raises :class:`~.transfer.TransferTimeout` on the rank that
waits, and ``run_distributed`` stops both ranks: nothing hangs.
"""

from __future__ import annotations

import copy
import functools
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from ..serving.security import SecurityError, TensorOpener, TensorSealer
from ..validate import check_int, check_real
from .transfer import KVLayoutMismatch, ModelVersionMismatch, TransferTimeout, open_transfer, seal_transfer
from .workers import DecodeWorker, PrefillWorker
from ..launch import run_distributed
from ..model import load_tiny_lm

__all__ = ["recv_bytes", "send_bytes", "serve_on_ranks"]

PREFILL_RANK, DECODE_RANK = 0, 1
REFUSALS = (KVLayoutMismatch, ModelVersionMismatch, SecurityError)


def _wait(work, timeout: float, what: str) -> None:
    try:
        work.wait(timeout=timedelta(seconds=timeout))
    except RuntimeError as e:
        if "Timed out" not in str(e) and "timed out" not in str(e):
            raise
        raise TransferTimeout(f"rank {dist.get_rank()}: {what} did not complete within {timeout:g} s "
                              "(is the other worker alive?)") from None


def send_bytes(message: bytes, dst: int, pending: list) -> int:
    """Post a send of ``message`` to ``dst`` (its length first); the works go to ``pending``. Returns bytes sent."""
    body = torch.frombuffer(bytearray(message), dtype=torch.uint8)
    length = torch.tensor([body.numel()], dtype=torch.int64)
    pending.append((dist.isend(length, dst), length, body))
    pending.append((dist.isend(body, dst), length, body))
    return body.numel() + length.numel() * length.element_size()


def finish_sends(pending: list, timeout: float) -> None:
    """Wait for every posted send, each under ``timeout``."""
    for work, *_ in pending:
        _wait(work, timeout, "a send to the decode worker")
    pending.clear()


def recv_bytes(src: int, timeout: float) -> bytes:
    """Receive one message sent with :func:`send_bytes` from ``src``; ``TransferTimeout`` after ``timeout`` s."""
    length = torch.empty(1, dtype=torch.int64)
    _wait(dist.irecv(length, src), timeout, f"receiving a message's length from rank {src}")
    body = torch.empty(int(length), dtype=torch.uint8)
    _wait(dist.irecv(body, src), timeout, f"receiving a {int(length)}-byte message from rank {src}")
    return body.numpy().tobytes()


@functools.lru_cache(maxsize=1)
def _model():
    return load_tiny_lm()[0]


def _prefill_rank(prompts, max_tokens, key, block_size, timeout, tamper):
    worker = PrefillWorker(_model(), block_size=block_size)
    sealer, pending, sent, seconds = TensorSealer(key, "prefill-0"), [], [], []
    for i, (prompt, m) in enumerate(zip(prompts, max_tokens)):
        start = time.perf_counter()
        transfer = worker.prefill(f"r{i}", prompt, m)
        seconds.append(time.perf_counter() - start)
        messages = seal_transfer(transfer, sealer)
        if i in tamper:                     # a byte flipped on the wire: the GCM tag must catch it
            messages[1] = messages[1][:-20] + bytes([messages[1][-20] ^ 1]) + messages[1][-19:]
        wire = sum(send_bytes(msg, DECODE_RANK, pending) for msg in messages)
        sent.append({"request_id": transfer.request_id, "tokens": transfer.num_tokens,
                     "kv_bytes": transfer.nbytes, "wire_bytes": wire, "first_token": transfer.first_token})
        finish_sends(pending, timeout)
    return {"sent": sent, "prefill_s": seconds}


def _decode_rank(n, key, block_size, timeout, max_num_seqs, perturb):
    model = _model()
    if perturb:                             # another model version: one weight nudged
        model = copy.deepcopy(model)
        with torch.no_grad():
            model.lm_head.weight[0, 0] += 1e-3
    worker = DecodeWorker(model, block_size=block_size, max_num_seqs=max_num_seqs)
    opener = TensorOpener(key)
    outputs, refused, received, install_s = {}, {}, [], []

    def drain():
        for out in worker.step():
            if out.finished:
                outputs[out.request_id] = out.output_token_ids

    for _ in range(n):
        messages = [recv_bytes(PREFILL_RANK, timeout), recv_bytes(PREFILL_RANK, timeout)]
        start = time.perf_counter()
        try:
            transfer = open_transfer(messages, opener)
            worker.accept(transfer)
        except REFUSALS as e:
            refused[len(received) + len(refused)] = f"{type(e).__name__}: {e}"
            continue
        install_s.append(time.perf_counter() - start)
        received.append({"request_id": transfer.request_id, "kv_bytes": transfer.nbytes,
                         "wire_bytes": sum(len(m) + 8 for m in messages)})
        drain()                             # decode one step between arrivals
    while worker.has_unfinished_requests():
        drain()
    free = worker.engine.block_manager.num_free_blocks == worker.engine.num_blocks
    return {"outputs": outputs, "refused": refused, "received": received, "install_s": install_s,
            "all_blocks_free": free}


def _serve(prompts, max_tokens, key, block_size, decode_block_size, timeout, tamper, perturb, max_num_seqs):
    torch.set_num_threads(1)
    if dist.get_rank() == PREFILL_RANK:
        return _prefill_rank(prompts, max_tokens, key, block_size, timeout, tamper)
    return _decode_rank(len(prompts), key, decode_block_size, timeout, max_num_seqs, perturb)


def serve_on_ranks(prompts, max_tokens, key: bytes, *, block_size: int = 16, decode_block_size: int | None = None,
                   timeout: float = 10.0, tamper=(), perturb_decode_model: bool = False,
                   max_num_seqs: int = 8) -> tuple[dict, dict]:
    """Serve ``prompts`` (each ``max_tokens[i]`` >= 2 tokens, greedy) with prefill on rank 0 and decode on rank 1.

    Returns ``(prefill report, decode report)``: what rank 0 sent (tokens, KV bytes, wire bytes per
    request, prefill seconds) and what rank 1 did (outputs by request id, transfers it refused and
    why, what it received). ``decode_block_size``, ``tamper`` (indices of transfers whose payload
    gets a flipped bit) and ``perturb_decode_model`` inject the faults the checks must catch.
    """
    prompts = [list(p) for p in prompts]
    max_tokens = list(max_tokens)
    if len(max_tokens) != len(prompts):
        raise ValueError(f"max_tokens has {len(max_tokens)} entries for {len(prompts)} prompts: give one each")
    for m in max_tokens:
        check_int("max_tokens", m, low=2, why="the first token comes from the prefill rank; decode makes the rest")
    check_int("block_size", block_size, low=1)
    timeout = check_real("timeout", timeout, low=0, low_open=True, why="seconds each receive may wait")
    decode_block_size = block_size if decode_block_size is None else decode_block_size
    return tuple(run_distributed(_serve, 2, prompts, max_tokens, key, block_size, decode_block_size, timeout,
                                 set(tamper), perturb_decode_model, max_num_seqs, timeout=timeout * (len(prompts) + 4)))
