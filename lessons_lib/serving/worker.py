"""A serving worker: one process, one model replica, one serving engine, on a loopback socket.

Started by the router as ``python -m lessons_lib.serving.worker --worker-id w0 --version v1 ...``.
It listens on 127.0.0.1 (port chosen by the OS), prints ``{"port": N}`` on stdout, accepts exactly
one connection (the router's) and then runs three threads:

* a reader that puts incoming requests on the worker's inbox (a frame it cannot read is
  reported to the router as ``bad-frame`` and the worker exits: the router re-sends what it owed);
* the engine loop (main thread): every request in the inbox joins the :class:`LLMEngine`, which
  advances all of them together one step at a time (continuous batching over a paged KV cache
  with prefix caching); each finished request is answered at once;
* a heartbeat sender, which also watches the parent: if the router process dies the worker exits,
  so no replica outlives the program that started it. A heartbeat says the process is alive; it
  also carries the engine's load (waiting, running, KV usage), its *progress* (tokens produced so
  far: a worker stuck in compute keeps heart-beating but its progress stops) and the block hashes
  its prefix cache stored and removed since the last one, for KV-aware routing.

Each result carries the engine's timings of the request, measured in the worker from the moment
its message arrived: queue time, time to first token (TTFT), time per output token (TPOT) and
service time. The router adds what it alone sees (the network and its own queue) as latency.
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

import torch

from ..engine import LLMEngine, SamplingParams
from ..model import TINY_LM_PATH, ModelConfig, TinyLM, load_tiny_lm
from ..validate import bad, check_str
from .faults import ANSWER_FAULTS, corrupt_answer
from .fingerprint import state_fingerprint
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
    check_model_spec(spec)
    if spec == "auto":
        spec = "checkpoint" if TINY_LM_PATH.exists() else "random:0"
    if spec == "checkpoint":
        return load_tiny_lm()[0]
    torch.manual_seed(int(spec[7:]))
    return TinyLM(ModelConfig()).eval()


def make_engine(model, block_size: int = 16, max_num_seqs: int = 8):
    """The worker's engine: prefix caching on unless ``block_size`` is 0 (then blocks of 16)."""
    return LLMEngine(model, block_size=block_size or 16, max_num_seqs=max_num_seqs,
                     enable_prefix_caching=block_size > 0)


def request_metrics(metrics, received: float) -> dict:
    """A finished request's timings in seconds, all from when the worker received it (the engine's
    clock is ``time.perf_counter``): ``queue_s`` until first scheduled, ``ttft_s`` until its first
    token, ``service_s`` until its last, ``tpot_s`` the mean gap between tokens (None for one token)."""
    return {"queue_s": max(0.0, metrics.first_scheduled_time - received),
            "ttft_s": max(0.0, metrics.first_token_time - received),
            "tpot_s": metrics.tpot,
            "service_s": max(0.0, metrics.finished_time - received)}


def serve(args) -> None:
    torch.set_num_threads(1)   # several workers share few cores
    model = load_model(args.model)
    fingerprint = state_fingerprint(model.state_dict())
    engine = make_engine(model, args.block_size, args.max_num_seqs)

    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind((LOOPBACK, 0))    # loopback only: nothing off this machine can connect
    server.listen(1)
    print(json.dumps({"port": server.getsockname()[1]}), flush=True)
    server.settimeout(60)
    conn, _ = server.accept()
    server.close()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    send_lock = threading.Lock()
    # What the heartbeat reports, published by the engine loop after each step. The heartbeat
    # thread never waits for a step: a slow or stuck step must show as missing progress, while
    # the heartbeats (liveness) go on.
    state_lock = threading.Lock()
    state = {"queue": 0, "running": 0, "kv_usage": 0.0, "progress": 0}
    events: list[tuple[str, str]] = []

    def publish():
        stats = engine.stats()
        cache = engine.block_manager.prefix_cache
        drained = cache.drain_events() if cache is not None else []
        with state_lock:
            state.update(queue=stats.num_waiting, running=stats.num_running,
                         kv_usage=round(stats.kv_usage, 4), progress=stats.num_generated_tokens)
            events.extend(drained)

    def send(obj):
        with send_lock:
            send_msg(conn, obj)

    send({"op": "hello", "worker": args.worker_id, "version": args.version,
          "fingerprint": fingerprint, "pid": os.getpid(), "vocab_size": model.config.vocab_size,
          "max_seq_len": model.config.max_seq_len, "block_size": engine.block_size})
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
                # Stamped on arrival, so the queue time it reports includes the wait in the inbox.
                inbox.put((time.perf_counter(), parse_generate(msg)))
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
            with state_lock:
                load = dict(state)
                news = events[:]
                events.clear()
            try:
                send({"op": "heartbeat", "worker": args.worker_id, "seq": seq,
                      "queue": inbox.qsize() + load["queue"], "running": load["running"],
                      "kv_usage": load["kv_usage"], "progress": load["progress"],
                      "stored": [h for kind, h in news if kind == "stored"],
                      "removed": [h for kind, h in news if kind == "removed"]})
            except OSError:
                os._exit(0)
            seq += 1
            time.sleep(args.heartbeat_interval)

    threading.Thread(target=reader, daemon=True).start()
    threading.Thread(target=heartbeat, daemon=True).start()
    served = 0
    started: dict[str, float] = {}
    while not stopping.is_set():
        # Take every request that has arrived; wait for one only when the engine is idle.
        jobs = []
        try:
            jobs.append(inbox.get(timeout=None if not engine.has_unfinished_requests() else 0))
            while True:
                jobs.append(inbox.get_nowait())
        except queue.Empty:
            pass
        if None in jobs:
            break
        for received, (rid, prompt, max_new_tokens) in jobs:
            if args.crash_on_token is not None and args.crash_on_token in prompt:
                os._exit(1)   # an injected poison request: this prompt crashes the replica
            try:
                engine.add_request(rid, list(prompt), SamplingParams(max_tokens=max_new_tokens))
                started[rid] = received
            except Exception as e:   # a bad request must not kill the replica
                send({"op": "error", "id": rid, "error": f"{type(e).__name__}: {e}"})
        if not engine.has_unfinished_requests():
            continue
        outputs = engine.step()
        publish()
        if args.delay:
            time.sleep(args.delay)   # an injected slow worker (e.g. a throttled GPU): per step
        for out in outputs:
            if not out.finished:
                continue
            result = {"op": "result", "id": out.request_id, "tokens": out.output_token_ids,
                      "worker": args.worker_id, "version": args.version,
                      "cached_tokens": out.num_cached_tokens,
                      **request_metrics(out.metrics, started.pop(out.request_id))}
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
    p.add_argument("--delay", type=float, default=0.0, help="extra seconds per engine step")
    p.add_argument("--block-size", type=int, default=16, help="KV block size; 0 disables prefix caching")
    p.add_argument("--max-num-seqs", type=int, default=8, help="requests the engine runs at once")
    p.add_argument("--crash-on-token", type=int, default=None,
                   help="exit when a prompt holds this token (an injected poison request)")
    p.add_argument("--crash-after", type=int, default=0, help="exit after N results (0: never)")
    p.add_argument("--fault", choices=sorted(ANSWER_FAULTS), default=None,
                   help="corrupt every answer after the first --fault-after ones")
    p.add_argument("--fault-after", type=int, default=0)
    serve(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
