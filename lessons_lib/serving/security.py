"""Sealed tensors and access tokens: what protects the wires and the endpoint.

``torch.distributed`` has **no authentication and no encryption**: anything that can reach a rank's
port (the TCPStore, gloo's or NCCL's sockets) can join, read or inject tensors. Bind it to
loopback or a private, trusted network, never to a public interface. Where tensors must cross an
untrusted link (activations between sites, KV blocks to a remote cache), seal them:

* :class:`TensorSealer` / :class:`TensorOpener`: AES-GCM (authenticated encryption) over the
  tensor's bytes, with its dtype, shape, sender and a **sequence number** in the authenticated
  header. Tampering with any byte, or using the wrong key, fails the GCM tag check; a sliding
  **replay window** rejects a message seen before, or one too old to tell. Each sealer is its own
  **stream** (a random id drawn when it is made), so a sender that restarts starts a new stream
  at sequence number 1 instead of looking like a replay of its former self.
* :class:`TokenAuthority`: HMAC-signed bearer tokens naming a tenant, its scopes and an expiry;
  :meth:`TokenAuthority.authorize` refuses unauthenticated (401) and out-of-scope (403) calls.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import struct
import time

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..validate import bad, check_int, check_real, check_str, check_str_list

_LEN = struct.Struct("!H")
# GCM's 96-bit nonce, laid out as NIST SP 800-38D section 8.2.1 does: a 64-bit fixed field naming
# the stream, then a 32-bit invocation field counting its messages (at most 2**32 - 1 per sealer,
# after which it refuses to seal rather than repeat a nonce). The fixed field is either a unique
# stream id the caller assigns (8.2.1's deterministic construction: no two sealers under one key
# can share a nonce) or, by default, 64 random bits: then two of n sealers under one key collide
# with odds of about n**2 / 2**65, and SP 800-38D section 8.3 caps the key at 2**32 messages in all.
_STREAM_BYTES, _SEQ_BYTES = 8, 4
_MAX_SEQ = 2 ** (8 * _SEQ_BYTES) - 1


class SecurityError(ValueError):
    """A sealed message was rejected (``reason``: tampered, replayed, too-old or malformed), or a
    sealer has used up its sequence numbers (``exhausted``)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"rejected ({reason}){': ' + detail if detail else ''}")


def new_key() -> bytes:
    """A fresh random 256-bit AES key (share it out of band, e.g. from a secrets manager)."""
    return AESGCM.generate_key(bit_length=256)


def _aead(key) -> AESGCM:
    if not isinstance(key, bytes) or len(key) not in (16, 24, 32):
        raise bad("key", key, "16, 24 or 32 random bytes", "an AES-128, -192 or -256 key: use new_key()")
    return AESGCM(key)


def _tensor_bytes(tensor) -> tuple[torch.Tensor, bytes]:
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
        raise bad("tensor", tensor, "a dense torch.Tensor")
    t = tensor.detach().contiguous().cpu()
    return t, t.reshape(-1).view(torch.uint8).numpy().tobytes()


class TensorSealer:
    """Seals tensors from one sender. Each message gets the next sequence number.

    The 96-bit GCM nonce is an 8-byte stream id plus the 4-byte sequence number, so this sealer
    never repeats a nonce. GCM needs more: no repeat under one *key*, across every sealer using it
    (a repeat leaks the XOR of plaintexts and lets an attacker forge tags). ``stream_id`` is how:
    give each sealer under a key a distinct id (an int below 2**64, e.g. assigned by the
    coordinator per sender and per restart, never reused under the key) and nonces cannot collide;
    or use one key per sender. Left out, the id is random, a restarted sender gets a new one, and
    uniqueness is only probable (about n**2 / 2**65 for n sealers), so rotate the key well before
    2**32 messages in total (NIST SP 800-38D, section 8.3).
    """

    def __init__(self, key: bytes, sender: str, stream_id: int | None = None) -> None:
        self.aead, self.sender, self.seq = _aead(key), check_str("sender", sender), 0
        if stream_id is None:
            self.stream = os.urandom(_STREAM_BYTES)
        else:
            check_int("stream_id", stream_id, low=0, high=2 ** (8 * _STREAM_BYTES) - 1,
                      why="the nonce's fixed field: distinct for every sealer under one key")
            self.stream = stream_id.to_bytes(_STREAM_BYTES, "big")

    def seal(self, tensor: torch.Tensor) -> bytes:
        t, body = _tensor_bytes(tensor)          # before taking a number: a refusal burns none
        if self.seq == _MAX_SEQ:
            raise SecurityError("exhausted", f"{_MAX_SEQ} messages sealed: make a new TensorSealer")
        self.seq += 1
        nonce = self.stream + self.seq.to_bytes(_SEQ_BYTES, "big")
        header = json.dumps({"sender": self.sender, "seq": self.seq, "nonce": nonce.hex(),
                             "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)},
                            sort_keys=True).encode()
        # The header travels in clear but is authenticated (associated data): changing the shape,
        # the sender or the sequence number breaks the tag just like changing the payload.
        return _LEN.pack(len(header)) + header + self.aead.encrypt(nonce, body, header)


class ReplayWindow:
    """Sliding-window replay protection (as in IPsec and DTLS), one window per sender (the opener
    passes a sender's name with its stream id, so each life of a sender has its own window).

    Accepts each sequence number at most once; numbers more than ``size`` below the highest seen
    are refused as too old, since the window no longer remembers them. Reordering within the window
    is fine.
    """

    def __init__(self, size: int = 64) -> None:
        self.size = check_int("size", size, low=1, why="how many recent sequence numbers to remember")
        self.highest: dict[str, int] = {}
        self.seen: dict[str, set[int]] = {}

    def check(self, sender: str, seq: int) -> None:
        """Raise ``SecurityError`` if ``seq`` is a replay or too old; don't record it."""
        check_int("seq", seq, low=1)
        top = self.highest.get(sender, 0)
        if seq <= top - self.size:
            raise SecurityError("too-old", f"seq {seq} is outside the window (highest {top})")
        if seq in self.seen.get(sender, ()):
            raise SecurityError("replayed", f"seq {seq} from {sender} was already accepted")

    def record(self, sender: str, seq: int) -> None:
        top = max(self.highest.get(sender, 0), seq)
        self.highest[sender] = top
        self.seen[sender] = {s for s in self.seen.get(sender, set()) | {seq} if s > top - self.size}


class TensorOpener:
    """Opens sealed tensors: authenticates, decrypts, then enforces the replay window.

    The window is kept per stream (sender name and stream id): a restarted sender is a new
    stream, while a message replayed from any stream this opener has seen is still refused.
    """

    def __init__(self, key: bytes, window: int = 64) -> None:
        check_int("window", window, low=1, why="how many recent sequence numbers to remember")
        self.aead, self.window = _aead(key), ReplayWindow(window)

    def open(self, message: bytes) -> tuple[str, int, torch.Tensor]:
        """Return (sender, seq, tensor) or raise ``SecurityError``."""
        try:
            (n,) = _LEN.unpack_from(message)
            header_bytes = message[2:2 + n]
            h = json.loads(header_bytes)
            sender, seq, nonce = str(h["sender"]), int(h["seq"]), bytes.fromhex(h["nonce"])
            dtype, shape = getattr(torch, h["dtype"]), [int(s) for s in h["shape"]]
            if (not isinstance(dtype, torch.dtype) or len(nonce) != _STREAM_BYTES + _SEQ_BYTES
                    or int.from_bytes(nonce[_STREAM_BYTES:], "big") != seq):
                raise ValueError("header fields disagree")
        except (struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SecurityError("malformed", f"{type(e).__name__}") from None
        # Authenticate first: until the tag verifies, the sender and sequence number are only
        # claims. Record the number only after that, so a forgery cannot burn one the real sender
        # will use.
        try:
            body = self.aead.decrypt(nonce, message[2 + n:], header_bytes)
        except (InvalidTag, ValueError):
            raise SecurityError("tampered", "authentication tag mismatch: modified or wrong key") from None
        stream = f"{sender} (stream {nonce[:_STREAM_BYTES].hex()})"
        self.window.check(stream, seq)
        self.window.record(stream, seq)
        return sender, seq, _tensor_from(body, dtype, shape)


def _tensor_from(body: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if not body:    # frombuffer refuses an empty buffer; an empty tensor is still a valid message
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(dtype).reshape(shape)


# -- access control --------------------------------------------------------------------------
class AuthError(PermissionError):
    """``status`` 401: who are you? (no, bad or expired token); 403: you may not do that."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        super().__init__(f"{status} {'unauthenticated' if status == 401 else 'forbidden'}: {detail}")


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


class TokenAuthority:
    """Issues and verifies HMAC-SHA256 signed tokens ``payload.signature`` (a minimal JWT)."""

    def __init__(self, secret: bytes, clock=time.time) -> None:
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise bad("secret", secret, "at least 16 random bytes", "e.g. os.urandom(32)")
        if not callable(clock):
            raise bad("clock", clock, "a function returning the time in seconds, like time.time")
        self.secret, self.clock = secret, clock

    def issue(self, tenant: str, scopes, ttl_s: float = 3600.0) -> str:
        """A token for ``tenant`` granting ``scopes`` (a list or set of names) for ``ttl_s`` seconds."""
        check_str("tenant", tenant)
        scopes = sorted(set(check_str_list("scopes", scopes)))
        # A NaN expiry compares false with every clock reading, so the token would never expire.
        ttl_s = check_real("ttl_s", ttl_s, low=0.0, low_open=True, why="seconds until the token expires")
        payload = json.dumps({"tenant": tenant, "scopes": scopes, "exp": self.clock() + ttl_s},
                             sort_keys=True).encode()
        return _b64(payload) + "." + _b64(hmac.new(self.secret, payload, hashlib.sha256).digest())

    def verify(self, token) -> dict:
        """The token's claims, or ``AuthError(401)``."""
        if not isinstance(token, str) or token.count(".") != 1:
            raise AuthError(401, "missing or malformed bearer token")
        body, sig = token.split(".")
        try:
            payload, signature = _unb64(body), _unb64(sig)
        except ValueError:
            raise AuthError(401, "token is not base64") from None
        expected = hmac.new(self.secret, payload, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, signature):   # constant time: no timing oracle
            raise AuthError(401, "bad signature")
        claims = json.loads(payload)
        if claims["exp"] < self.clock():
            raise AuthError(401, "token expired")
        return claims

    def authorize(self, token, scope: str) -> dict:
        """Claims if ``token`` is valid and grants ``scope``; else ``AuthError`` 401 or 403."""
        check_str("scope", scope)
        claims = self.verify(token)
        if scope not in claims["scopes"]:
            raise AuthError(403, f"tenant {claims['tenant']!r} lacks scope {scope!r}")
        return claims
