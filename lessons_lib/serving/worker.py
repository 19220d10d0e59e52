"""A serving worker: one process, one model replica, one request queue, on a loopback socket.

Started by the router as ``python -m lessons_lib.serving.worker --worker-id w0 --version v1 ...``.
It listens on 127.0.0.1 (port chosen by the OS), prints ``{"port": N}`` on stdout, accepts exactly
one connection (the router's) and then runs three threads:

* a reader that puts incoming requests on the worker's FIFO queue (a frame it cannot read is
  reported to the router as ``bad-frame`` and the worker exits: the router re-sends what it owed);
* the compute loop (main thread): greedy decoding, one request at a time;
* a heartbeat sender, which also watches the parent: if the router process dies the worker exits,
  so no replica outlives the program that started it.

Each worker keeps a prefix cache: the keys and values of recent prompts at every full block
boundary, so a prompt that shares a long prefix with an earlier one only prefills the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import socket
import sys
import threading
import time
from collections import OrderedDict

from ..validate import bad, check_int, check_real, check_str, check_token_ids
from .faults import ANSWER_FAULTS, corrupt_answer
from .policies import block_hashes
from .protocol import LOOPBACK, BadFrame, ProtocolError, parse_generate, recv_msg, send_msg

BAD_FRAME_EXIT = 3   # the exit status of a worker that could not read the router's message


def check_model_spec(spec) -> str:
    """``spec`` if :func:`load_model` understands it (checked without loading anything)."""
    expected = "'auto', 'checkpoint' or 'random:SEED' (SEED an int)"
    check_str("model", spec, why=expected)
    if spec in ("auto", "checkpoint") or re.fullmatch(r"random:-?\d+", spec):
        return spec
    raise bad("model", spec, expected)


def load_model(spec: str):
    """``random:SEED`` (fresh init with a fixed seed), ``checkpoint`` (the trained tiny LM) or
    ``auto`` (the checkpoint if it exists, else ``random:0``)."""
    import torch

    from ..model import TINY_LM_PATH, ModelConfig, TinyLM, load_tiny_lm

    check_model_spec(spec)
    if spec == "auto":
        spec = "checkpoint" if TINY_LM_PATH.exists() else "random:0"
    if spec == "checkpoint":
        return load_tiny_lm()[0]
    torch.manual_seed(int(spec[7:]))
    return TinyLM(ModelConfig()).eval()


class PrefixKVCache:
    """Keys/values after prefill, found by the hash chain of the prompt's full blocks (LRU)."""

    def __init__(self, block_size: int = 16, capacity: int = 64) -> None:
        self.block_size = check_int("block_size", block_size, low=1)
        self.capacity = check_int("capacity", capacity, low=1)
        self.entries: OrderedDict[str, tuple[int, list]] = OrderedDict()

    def _hashes(self, prompt) -> list[str]:
        return block_hashes(prompt, self.block_size)

    def lookup(self, prompt) -> tuple[int, list | None]:
        """(cached tokens, per-layer (k, v) sliced to them). Always leaves >= 1 token to prefill,
        because the last prompt token's logits are needed to pick the first new token."""
        best = (0, None)
        for i, h in enumerate(self._hashes(prompt)):
            n = (i + 1) * self.block_size
            if n >= len(prompt) or h not in self.entries:
                break
            self.entries.move_to_end(h)
            best = (n, self.entries[h][1])
        n, kv = best
        if kv is None:
            return 0, None
        return n, [(k[:, :, :n], v[:, :, :n]) for k, v in kv]

    def insert(self, prompt, kv: list) -> None:
        for i, h in enumerate(self._hashes(prompt)):
            self.entries[h] = ((i + 1) * self.block_size, kv)
            self.entries.move_to_end(h)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


def greedy_generate(model, prompt, max_new_tokens: int, prefix_cache: PrefixKVCache | None = None,
                    delay_per_token: float = 0.0) -> tuple[list[int], int]:
    """Greedy decoding with a KV cache, reusing a cached prefix. Returns (new tokens, cached)."""
    import torch

    from ..model import KVCache

    check_token_ids("prompt", prompt, model.config.vocab_size)
    check_int("max_new_tokens", max_new_tokens, low=0)
    check_real("delay_per_token", delay_per_token, low=0)
    cached, kv = prefix_cache.lookup(prompt) if prefix_cache is not None else (0, None)
    cache = KVCache(len(model.layers))
    if kv is not None:
        for layer, (k, v) in zip(cache.layers, kv):
            layer.k, layer.v = k, v
    out = []
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt[cached:])]), cache=cache)
        if prefix_cache is not None:
            # torch.cat in the cache makes new tensors each step, so these stay the prefill's.
            prefix_cache.insert(prompt, [(layer.k, layer.v) for layer in cache.layers])
        for step in range(max_new_tokens):
            next_id = int(logits[0, -1].argmax())
            out.append(next_id)
            if delay_per_token:
                time.sleep(delay_per_token)   # an injected slow worker (e.g. a throttled GPU)
            if step + 1 < max_new_tokens:
                logits = model(torch.tensor([[next_id]]), cache=cache)
    return out, cached


def serve(args) -> None:
    import torch

    from .fingerprint import state_fingerprint

    torch.set_num_threads(1)   # several workers share few cores
    model = load_model(args.model)
    fingerprint = state_fingerprint(model.state_dict())
    prefix_cache = PrefixKVCache(args.block_size) if args.block_size > 0 else None

    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind((LOOPBACK, 0))    # loopback only: nothing off this machine can connect
    server.listen(1)
    print(json.dumps({"port": server.getsockname()[1]}), flush=True)
    server.settimeout(60)
    conn, _ = server.accept()
    server.close()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    send_lock = threading.Lock()

    def send(obj):
        with send_lock:
            send_msg(conn, obj)

    send({"op": "hello", "worker": args.worker_id, "version": args.version,
          "fingerprint": fingerprint, "pid": os.getpid(), "vocab_size": model.config.vocab_size,
          "max_seq_len": model.config.max_seq_len})
    inbox: queue.Queue = queue.Queue()
    stopping = threading.Event()   # "stop" overtakes the queue: the router has re-sent or failed it all

    def reader():
        try:
            while True:
                msg = recv_msg(conn)
                if msg["op"] == "stop":
                    stopping.set()
                    inbox.put(None)
                    return
                if msg["op"] != "generate":
                    raise BadFrame(f"unknown op {msg['op']!r}")
                inbox.put(parse_generate(msg))
        except BadFrame as e:
            # The stream can no longer be trusted (framing may be lost): say why, then exit, and
            # the router re-sends every request it owed to this worker to the others.
            print(f"worker {args.worker_id}: {e}", file=sys.stderr, flush=True)
            try:
                send({"op": "bad-frame", "worker": args.worker_id, "error": str(e)})
            except OSError:
                pass
            os._exit(BAD_FRAME_EXIT)
        except (ProtocolError, OSError):
            os._exit(0)    # the router is gone: a worker never outlives it

    def heartbeat():
        seq = 0
        while True:
            if os.getppid() != args.parent_pid:
                os._exit(0)
            try:
                send({"op": "heartbeat", "worker": args.worker_id, "seq": seq,
                      "queue": inbox.qsize()})
            except OSError:
                os._exit(0)
            seq += 1
            time.sleep(args.heartbeat_interval)

    threading.Thread(target=reader, daemon=True).start()
    threading.Thread(target=heartbeat, daemon=True).start()
    served = 0
    while True:
        job = inbox.get()
        if job is None or stopping.is_set():
            break
        rid, prompt, max_new_tokens = job
        start = time.perf_counter()
        try:
            tokens, cached = greedy_generate(model, prompt, max_new_tokens, prefix_cache, args.delay)
        except Exception as e:   # a bad request must not kill the replica
            send({"op": "error", "id": rid, "error": f"{type(e).__name__}: {e}"})
            continue
        result = {"op": "result", "id": rid, "tokens": tokens, "worker": args.worker_id,
                  "version": args.version, "cached_tokens": cached,
                  "service_s": time.perf_counter() - start}
        if args.fault and served >= args.fault_after:
            with send_lock:
                conn.sendall(corrupt_answer(result, args.fault, model.config.vocab_size))
        else:
            send(result)
        served += 1
        if args.crash_after and served >= args.crash_after:
            os._exit(1)   # injected crash
    conn.close()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker-id", required=True)
    p.add_argument("--version", default="v1")
    p.add_argument("--model", default="auto")
    p.add_argument("--parent-pid", type=int, default=os.getppid())
    p.add_argument("--heartbeat-interval", type=float, default=0.1)
    p.add_argument("--delay", type=float, default=0.0, help="extra seconds per new token")
    p.add_argument("--block-size", type=int, default=16, help="prefix-cache block; 0 disables")
    p.add_argument("--crash-after", type=int, default=0, help="exit after N results (0: never)")
    p.add_argument("--fault", choices=sorted(ANSWER_FAULTS), default=None,
                   help="corrupt every answer after the first --fault-after ones")
    p.add_argument("--fault-after", type=int, default=0)
    serve(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
