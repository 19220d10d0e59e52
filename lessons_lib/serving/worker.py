"""A serving worker: one process, one model replica, one request queue, on a loopback socket.

Started by the router as ``python -m lessons_lib.serving.worker --worker-id w0 --version v1 ...``.
It listens on 127.0.0.1 (port chosen by the OS), prints ``{"port": N}`` on stdout, accepts exactly
one connection (the router's) and then runs three threads:

* a reader that puts incoming requests on the worker's FIFO queue;
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
import socket
import sys
import threading
import time
from collections import OrderedDict

from .policies import block_hashes
from .protocol import LOOPBACK, ProtocolError, recv_msg, send_msg


def load_model(spec: str):
    """``random:SEED`` (fresh init with a fixed seed), ``checkpoint`` (the trained tiny LM) or
    ``auto`` (the checkpoint if it exists, else ``random:0``)."""
    import torch

    from ..model import TINY_LM_PATH, ModelConfig, TinyLM, load_tiny_lm

    if spec == "auto":
        spec = "checkpoint" if TINY_LM_PATH.exists() else "random:0"
    if spec == "checkpoint":
        return load_tiny_lm()[0]
    if spec.startswith("random:") and spec[7:].lstrip("-").isdigit():
        torch.manual_seed(int(spec[7:]))
        return TinyLM(ModelConfig()).eval()
    raise ValueError(f"model spec {spec!r}: choose 'auto', 'checkpoint' or 'random:SEED'")


class PrefixKVCache:
    """Keys/values after prefill, found by the hash chain of the prompt's full blocks (LRU)."""

    def __init__(self, block_size: int = 16, capacity: int = 64) -> None:
        self.block_size, self.capacity = block_size, capacity
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
          "fingerprint": fingerprint, "pid": os.getpid()})
    inbox: queue.Queue = queue.Queue()

    def reader():
        try:
            while True:
                msg = recv_msg(conn)
                inbox.put(msg)
                if msg["op"] == "stop":
                    return
        except (ProtocolError, OSError, ValueError):
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
        msg = inbox.get()
        if msg["op"] == "stop":
            break
        start = time.perf_counter()
        try:
            tokens, cached = greedy_generate(model, msg["prompt"], msg["max_new_tokens"],
                                             prefix_cache, args.delay)
        except Exception as e:   # a bad request must not kill the replica
            send({"op": "error", "id": msg.get("id"), "error": f"{type(e).__name__}: {e}"})
            continue
        send({"op": "result", "id": msg["id"], "tokens": tokens, "worker": args.worker_id,
              "version": args.version, "cached_tokens": cached,
              "service_s": time.perf_counter() - start})
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
    serve(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
