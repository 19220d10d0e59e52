"""The wire format between router and workers: length-prefixed JSON over a loopback TCP socket.

Every message is a JSON object preceded by its length as a 4-byte big-endian integer.
JSON (not pickle) because a worker must never execute what arrives on a socket: unpickling
attacker-controlled bytes runs arbitrary code. Token ids are plain lists of ints.

Messages (the ``op`` field):

* router -> worker: ``generate`` {id, prompt, max_new_tokens}; ``stop``.
* worker -> router: ``hello`` {worker, version, fingerprint, pid, vocab_size, max_seq_len} once;
  ``heartbeat`` {worker, seq, queue, running, kv_usage, progress, stored, removed} every
  ``heartbeat_interval`` seconds (load, tokens produced so far, and the block hashes its prefix
  cache stored and removed since the last one); ``result`` {id, tokens, worker,
  version, cached_tokens, queue_s, ttft_s, tpot_s, service_s} (the engine's timings of the request,
  in seconds from when the worker received it; ``tpot_s`` is null for a single token);
  ``error`` {id, error}; ``bad-frame`` {error} when it could not read what the router sent (it
  then exits).

Neither side trusts the other's bytes: a frame over :data:`MAX_MESSAGE`, bytes that are not a JSON
object, or a message with a missing or mistyped field raise :class:`BadFrame`, and the reader
decides what the sender's misbehaviour costs it (the router takes such a worker out of rotation).
"""

from __future__ import annotations

import json
import math
import numbers
import socket
import struct
from dataclasses import dataclass, field

from ..validate import BadArgument, bad, check_int, check_real, check_str

HEADER = struct.Struct("!I")
MAX_MESSAGE = 16 * 1024 * 1024   # a bound, so a corrupt length cannot make us allocate gigabytes
LOOPBACK = "127.0.0.1"


class ProtocolError(ConnectionError):
    """The peer closed the connection or sent something that is not a message."""


class BadFrame(ProtocolError):
    """The peer sent bytes that are not a valid message: too long, not JSON, or a field wrong."""


class MessageTooLarge(BadArgument):
    """A message would exceed :data:`MAX_MESSAGE`: refused before a byte is sent."""


def encode(obj: dict) -> bytes:
    """One framed message; :class:`MessageTooLarge` if the peer would refuse it."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE:
        if obj.get("op") == "generate":
            shown = f"{obj.get('id')!r} with {len(obj.get('prompt', ()))} prompt tokens"
            err = bad("request", shown, f"a message of at most {MAX_MESSAGE} bytes",
                      f"it encodes to {len(body)} bytes; protocol.MAX_MESSAGE is the limit, and the "
                      f"model's max_seq_len bounds a useful prompt far below it")
        else:
            err = bad("message", obj.get("op"), f"a message of at most {MAX_MESSAGE} bytes",
                      f"it encodes to {len(body)} bytes")
        raise MessageTooLarge(*err.args)
    return HEADER.pack(len(body)) + body


def send_msg(sock: socket.socket, obj: dict) -> None:
    """Send one JSON message (the caller serialises concurrent senders with a lock)."""
    sock.sendall(encode(obj))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, remaining = [], n
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise ProtocolError("connection closed by peer")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def recv_msg(sock: socket.socket) -> dict:
    """Receive one JSON message: ``ProtocolError`` when the peer is gone, ``BadFrame`` when it
    sent something that is not a message (after which the stream cannot be trusted)."""
    (length,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if length > MAX_MESSAGE:
        raise BadFrame(f"a frame of {length} bytes exceeds the {MAX_MESSAGE}-byte limit")
    body = _recv_exact(sock, length)
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:   # RecursionError: "[[[[..." nested too deep
        raise BadFrame(f"a frame of {length} bytes is not JSON ({type(e).__name__}: "
                       f"{str(e)[:80]})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("op"), str):
        raise BadFrame(f"a message must be a JSON object with a string 'op' field, got {body[:60]!r}")
    return obj


def message_field(msg: dict, name: str, check, **kwargs):
    """``msg[name]`` passed through ``check`` (a validate helper); ``BadFrame`` if absent or wrong."""
    if name not in msg:
        raise BadFrame(f"{msg['op']!r} message without its {name!r} field")
    try:
        return check(f"{msg['op']}.{name}", msg[name], **kwargs)
    except BadArgument as e:
        raise BadFrame(str(e)) from None


def _token_list(name: str, value, *, vocab_size: int | None = None, min_len: int = 0,
                max_len: int | None = None) -> tuple[int, ...]:
    top = vocab_size if vocab_size is not None else 2 ** 31
    expected = f"a list of token ids in [0, {top})"
    if not isinstance(value, list):
        raise bad(name, value, expected, f"got a {type(value).__name__}")
    if len(value) < min_len or (max_len is not None and len(value) > max_len):
        raise bad(name, value, expected, f"{len(value)} ids, expected {min_len} to {max_len}")
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < top:
            raise bad(name, value, expected, f"the id {t!r} is not one")
    return tuple(value)


def _seconds(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < 0:
        raise bad(name, value, "a finite number of seconds >= 0")
    return float(value)


def _seconds_or_none(name: str, value) -> float | None:
    return None if value is None else _seconds(name, value)


def parse_generate(msg: dict) -> tuple[str, tuple[int, ...], int]:
    """A worker's check of a ``generate`` message: (id, prompt, max_new_tokens) or ``BadFrame``."""
    return (message_field(msg, "id", check_str), message_field(msg, "prompt", _token_list, min_len=1),
            message_field(msg, "max_new_tokens", check_int, low=1))


def parse_hello(msg: dict) -> dict:
    """The router's check of a worker's first message."""
    if msg["op"] != "hello":
        raise BadFrame(f"expected a 'hello' message first, got {msg['op']!r}")
    return {"worker": message_field(msg, "worker", check_str), "version": message_field(msg, "version", check_str),
            "fingerprint": message_field(msg, "fingerprint", check_str),
            "pid": message_field(msg, "pid", check_int, low=1),
            "vocab_size": message_field(msg, "vocab_size", check_int, low=1),
            "max_seq_len": message_field(msg, "max_seq_len", check_int, low=1)}


def _hash_list(name: str, value) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(h, str) and 0 < len(h) <= 128 for h in value):
        raise bad(name, value, "a list of block hashes (hex strings)")
    return tuple(value)


def parse_heartbeat(msg: dict) -> dict:
    """The router's check of a heartbeat: its load and progress fields, each of its type."""
    return {"queue": message_field(msg, "queue", check_int, low=0),
            "running": message_field(msg, "running", check_int, low=0),
            "kv_usage": message_field(msg, "kv_usage", check_real, low=0, high=1),
            "progress": message_field(msg, "progress", check_int, low=0),
            "stored": message_field(msg, "stored", _hash_list),
            "removed": message_field(msg, "removed", _hash_list)}


def parse_result(msg: dict, request: "Request", worker: str, version: str, vocab_size: int) -> dict:
    """The router's check of a ``result`` for ``request`` from ``worker``: every field present, of
    its type and range, and the sender's name and version the ones the router started it with."""
    tokens = message_field(msg, "tokens", _token_list, vocab_size=vocab_size, min_len=1,
                           max_len=request.max_new_tokens)
    for name, expected in (("worker", worker), ("version", version)):
        if message_field(msg, name, check_str) != expected:
            raise BadFrame(f"result.{name}={msg[name]!r} is not valid: expected {expected!r} "
                           f"(the {name} the router started it as)")
    return {"tokens": tokens,
            "cached_tokens": message_field(msg, "cached_tokens", check_int, low=0, high=len(request.prompt)),
            "service_s": message_field(msg, "service_s", _seconds),
            "queue_s": message_field(msg, "queue_s", _seconds),
            "ttft_s": message_field(msg, "ttft_s", _seconds),
            "tpot_s": message_field(msg, "tpot_s", _seconds_or_none)}


def _check_prompt(prompt) -> tuple[int, ...]:
    expected = "a non-empty sequence of token ids (ints >= 0)"
    if isinstance(prompt, (str, bytes)):
        raise bad("prompt", prompt, expected, "got text: encode it with the tokenizer first")
    if hasattr(prompt, "tolist"):        # a tensor or an array of ids
        prompt = prompt.tolist()
    try:
        ids = tuple(prompt)
    except TypeError:
        raise bad("prompt", prompt, expected) from None
    if not ids:
        raise bad("prompt", prompt, expected, "no tokens: a prompt needs at least one")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
            raise bad("prompt", prompt, expected, f"the id {t!r} is not one")
    return tuple(int(t) for t in ids)


@dataclass(frozen=True)
class Request:
    """One generation request. ``id`` is the idempotency key: re-sending the same request under it
    is always safe; a different request under a used id is refused by the router.

    ``version`` pins the request to workers serving that model version (None: any).
    """

    id: str
    prompt: tuple[int, ...]
    max_new_tokens: int = 4
    version: str | None = None

    def __post_init__(self) -> None:
        check_str("id", self.id, why="the request id is its idempotency key")
        object.__setattr__(self, "prompt", _check_prompt(self.prompt))
        check_int("max_new_tokens", self.max_new_tokens, low=1)
        if self.version is not None:
            check_str("version", self.version, why="None serves the request on any version")

    @property
    def cost_tokens(self) -> int:
        """Work estimate a token-cost-aware router uses: prompt plus new tokens."""
        return len(self.prompt) + self.max_new_tokens

    def to_wire(self) -> dict:
        return {"op": "generate", "id": self.id, "prompt": list(self.prompt),
                "max_new_tokens": self.max_new_tokens}


@dataclass(frozen=True)
class Response:
    """What served a request, and its result: the new tokens only (greedy, deterministic).

    Timings, in seconds. Measured by the worker's engine from when the worker received the
    request: ``queue_s`` (waiting for a place in a batch), ``ttft_s`` (time to first token),
    ``tpot_s`` (mean time per output token after the first; None for a single token) and
    ``service_s`` (until its last token). Measured by the router: ``latency_s``, from submit to
    answer = network both ways + the router's own wait (back-offs, re-dispatch) + ``service_s``.
    """

    id: str
    tokens: tuple[int, ...]
    worker: str
    version: str
    cached_tokens: int = 0
    service_s: float = 0.0
    latency_s: float = 0.0
    attempts: int = 1
    extra: dict = field(default_factory=dict, compare=False)
    queue_s: float = 0.0
    ttft_s: float = 0.0
    tpot_s: float | None = None

    @property
    def client_ttft_s(self) -> float:
        """TTFT as the client would see it if the tokens were streamed: the router's latency less
        the time the worker spent after the first token."""
        return max(0.0, self.latency_s - (self.service_s - self.ttft_s))
