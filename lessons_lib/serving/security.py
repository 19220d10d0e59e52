"""Sealed tensors and access tokens: what protects the wires and the endpoint.

``torch.distributed`` has **no authentication and no encryption**: anything that can reach a rank's
port (the TCPStore, gloo's or NCCL's sockets) can join, read or inject tensors. Bind it to
loopback or a private, trusted network, never to a public interface. Where tensors must cross an
untrusted link (activations between sites, KV blocks to a remote cache), seal them:

* :class:`TensorSealer` / :class:`TensorOpener`: AES-GCM (authenticated encryption) over the
  tensor's bytes, with its dtype, shape, sender and a **sequence number** in the authenticated
  header. Tampering with any byte, or using the wrong key, fails the GCM tag check; a sliding
  **replay window** rejects a message seen before, or one too old to tell.
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

_LEN = struct.Struct("!H")


class SecurityError(ValueError):
    """A sealed message was rejected; ``reason`` is tampered, replayed, too-old or malformed."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"rejected ({reason}){': ' + detail if detail else ''}")


def new_key() -> bytes:
    """A fresh random 256-bit AES key (share it out of band, e.g. from a secrets manager)."""
    return AESGCM.generate_key(bit_length=256)


class TensorSealer:
    """Seals tensors from one sender. Each message gets the next sequence number.

    The 96-bit GCM nonce is 4 random bytes fixed per sealer plus the 8-byte sequence number, so a
    nonce never repeats under one key, which GCM requires (a repeat leaks the XOR of plaintexts).
    """

    def __init__(self, key: bytes, sender: str) -> None:
        if not isinstance(key, bytes) or len(key) not in (16, 24, 32):
            raise ValueError("key must be 16, 24 or 32 bytes (use new_key())")
        self.aead, self.sender, self.seq = AESGCM(key), sender, 0
        self._prefix = os.urandom(4)

    def seal(self, tensor: torch.Tensor) -> bytes:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
        self.seq += 1
        nonce = self._prefix + self.seq.to_bytes(8, "big")
        t = tensor.detach().contiguous().cpu()
        header = json.dumps({"sender": self.sender, "seq": self.seq, "nonce": nonce.hex(),
                             "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)},
                            sort_keys=True).encode()
        body = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        # The header travels in clear but is authenticated (associated data): changing the shape,
        # the sender or the sequence number breaks the tag just like changing the payload.
        return _LEN.pack(len(header)) + header + self.aead.encrypt(nonce, body, header)


class ReplayWindow:
    """Sliding-window replay protection (as in IPsec and DTLS), one window per sender.

    Accepts each sequence number at most once; numbers more than ``size`` below the highest seen
    are refused as too old, since the window no longer remembers them. Reordering within the window
    is fine.
    """

    def __init__(self, size: int = 64) -> None:
        if size < 1:
            raise ValueError(f"size={size!r} must be >= 1")
        self.size = size
        self.highest: dict[str, int] = {}
        self.seen: dict[str, set[int]] = {}

    def check(self, sender: str, seq: int) -> None:
        """Raise ``SecurityError`` if ``seq`` is a replay or too old; don't record it."""
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
    """Opens sealed tensors: authenticates, decrypts, then enforces the replay window."""

    def __init__(self, key: bytes, window: int = 64) -> None:
        self.aead, self.window = AESGCM(key), ReplayWindow(window)

    def open(self, message: bytes) -> tuple[str, int, torch.Tensor]:
        """Return (sender, seq, tensor) or raise ``SecurityError``."""
        try:
            (n,) = _LEN.unpack_from(message)
            header_bytes = message[2:2 + n]
            h = json.loads(header_bytes)
            sender, seq, nonce = str(h["sender"]), int(h["seq"]), bytes.fromhex(h["nonce"])
            dtype, shape = getattr(torch, h["dtype"]), [int(s) for s in h["shape"]]
        except (struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SecurityError("malformed", f"{type(e).__name__}") from None
        # Authenticate first: until the tag verifies, the sender and sequence number are only
        # claims. Record the number only after that, so a forgery cannot burn one the real sender
        # will use.
        try:
            body = self.aead.decrypt(nonce, message[2 + n:], header_bytes)
        except (InvalidTag, ValueError):
            raise SecurityError("tampered", "authentication tag mismatch: modified or wrong key") from None
        self.window.check(sender, seq)
        self.window.record(sender, seq)
        tensor = torch.frombuffer(bytearray(body), dtype=torch.uint8).view(dtype).reshape(shape)
        return sender, seq, tensor


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
            raise ValueError("secret must be at least 16 random bytes (e.g. os.urandom(32))")
        self.secret, self.clock = secret, clock

    def issue(self, tenant: str, scopes, ttl_s: float = 3600.0) -> str:
        payload = json.dumps({"tenant": tenant, "scopes": sorted(scopes), "exp": self.clock() + ttl_s},
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
        claims = self.verify(token)
        if scope not in claims["scopes"]:
            raise AuthError(403, f"tenant {claims['tenant']!r} lacks scope {scope!r}")
        return claims
