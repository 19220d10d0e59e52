"""The wire format between router and workers: length-prefixed JSON over a loopback TCP socket.

Every message is a JSON object preceded by its length as a 4-byte big-endian integer.
JSON (not pickle) because a worker must never execute what arrives on a socket: unpickling
attacker-controlled bytes runs arbitrary code. Token ids are plain lists of ints.

Messages (the ``op`` field):

* router -> worker: ``generate`` {id, prompt, max_new_tokens}; ``stop``.
* worker -> router: ``hello`` {worker, version, fingerprint, pid} once; ``heartbeat`` {worker, seq}
  every ``heartbeat_interval`` seconds; ``result`` {id, tokens, worker, version, cached_tokens,
  service_s}; ``error`` {id, error}.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass, field

HEADER = struct.Struct("!I")
MAX_MESSAGE = 16 * 1024 * 1024   # a bound, so a corrupt length cannot make us allocate gigabytes
LOOPBACK = "127.0.0.1"


class ProtocolError(ConnectionError):
    """The peer closed the connection or sent something that is not a message."""


def send_msg(sock: socket.socket, obj: dict) -> None:
    """Send one JSON message (the caller serialises concurrent senders with a lock)."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(HEADER.pack(len(body)) + body)


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
    """Receive one JSON message; ``ProtocolError`` when the peer is gone or misbehaves."""
    (length,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if length > MAX_MESSAGE:
        raise ProtocolError(f"message of {length} bytes exceeds the {MAX_MESSAGE}-byte limit")
    obj = json.loads(_recv_exact(sock, length))
    if not isinstance(obj, dict) or "op" not in obj:
        raise ProtocolError("a message must be a JSON object with an 'op' field")
    return obj


@dataclass(frozen=True)
class Request:
    """One generation request. ``id`` is the idempotency key: re-sending it is always safe.

    ``version`` pins the request to workers serving that model version (None: any).
    """

    id: str
    prompt: tuple[int, ...]
    max_new_tokens: int = 4
    version: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"id={self.id!r} must be a non-empty string (the idempotency key)")
        if not self.prompt or not all(isinstance(t, int) and t >= 0 for t in self.prompt):
            raise ValueError("prompt must be a non-empty sequence of token ids (ints >= 0)")
        object.__setattr__(self, "prompt", tuple(self.prompt))
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an int >= 1")

    @property
    def cost_tokens(self) -> int:
        """Work estimate a token-cost-aware router uses: prompt plus new tokens."""
        return len(self.prompt) + self.max_new_tokens

    def to_wire(self) -> dict:
        return {"op": "generate", "id": self.id, "prompt": list(self.prompt),
                "max_new_tokens": self.max_new_tokens}


@dataclass(frozen=True)
class Response:
    """What served a request, and its result: the new tokens only (greedy, deterministic)."""

    id: str
    tokens: tuple[int, ...]
    worker: str
    version: str
    cached_tokens: int = 0
    service_s: float = 0.0
    latency_s: float = 0.0
    attempts: int = 1
    extra: dict = field(default_factory=dict, compare=False)
