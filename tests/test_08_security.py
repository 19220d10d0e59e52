"""Lesson 08: sealed tensors (tamper, replay, forgery rejected), tokens, PII redaction, cache isolation."""

import io
import logging

import pytest
import torch

from lessons_lib.serving.isolation import TenantServer, probe
from lessons_lib.serving.pii import RedactingFilter, luhn_valid, redact
from lessons_lib.serving.security import (AuthError, ReplayWindow, SecurityError, TensorOpener, TensorSealer,
                                          TokenAuthority, new_key)
from lessons_lib.serving.worker import load_model

pytestmark = pytest.mark.lesson08


@pytest.fixture
def channel():
    key = new_key()
    return key, TensorSealer(key, "rank0"), TensorOpener(key, window=8)


def test_a_sealed_tensor_round_trips_exactly(channel):
    _, sealer, opener = channel
    for t in (torch.randn(3, 4), torch.arange(10, dtype=torch.int64), torch.randn(2, 2).half()):
        sender, seq, back = opener.open(sealer.seal(t))
        assert sender == "rank0" and torch.equal(back, t) and back.dtype == t.dtype
    assert b"rank0" in sealer.seal(torch.ones(1))          # header is clear text ...
    assert torch.ones(64).numpy().tobytes() not in sealer.seal(torch.ones(64))   # ... payload is not


def test_assigned_stream_ids_make_nonces_unique_across_sealers_under_one_key():
    # SP 800-38D 8.2.1: a fixed field that names the sealer, then its counter. Distinct ids can
    # never share a nonce, whatever the number of sealers; each opens as its own stream.
    key = new_key()
    opener = TensorOpener(key)
    sealers = [TensorSealer(key, f"rank{r}", stream_id=r) for r in range(50)]
    nonces = set()
    for sealer in sealers:
        for _ in range(3):
            message = sealer.seal(torch.ones(1))
            n = 2 + int.from_bytes(message[:2], "big")
            nonces.add(__import__("json").loads(message[2:n])["nonce"])
            opener.open(message)
    assert len(nonces) == 150
    assert sealers[7].stream == (7).to_bytes(8, "big")
    with pytest.raises(ValueError, match="stream_id="):
        TensorSealer(key, "r", stream_id=2 ** 64)


def test_at_least_twenty_tampered_replayed_and_forged_messages_are_all_rejected(channel):
    key, sealer, opener = channel
    msgs = [sealer.seal(torch.randn(8)) for _ in range(6)]
    attacks = []
    m = msgs[0]
    for pos in (0, 1, 5, 20, len(m) // 2, len(m) - 20, len(m) - 1):      # flip one bit anywhere
        attacks.append(("tampered", m[:pos] + bytes([m[pos] ^ 1]) + m[pos + 1:]))
    attacks.append(("truncated", m[:-1]))
    attacks.append(("truncated", m[:10]))
    attacks.append(("empty", b""))
    header_end = 2 + int.from_bytes(m[:2], "big")
    attacks.append(("header forged", m[:header_end].replace(b'"seq": 1', b'"seq": 9') + m[header_end:]))
    attacks.append(("shape forged", m[:header_end].replace(b'"shape": [8]', b'"shape": [2]') + m[header_end:]))
    for _ in range(5):                                                     # wrong key, right format
        attacks.append(("wrong key", TensorSealer(new_key(), "rank0").seal(torch.randn(8))))
    attacks.append(("impersonation", TensorSealer(new_key(), "rank1").seal(torch.randn(8))))
    # Accept the genuine messages, then replay each of them.
    for msg in msgs:
        opener.open(msg)
    attacks += [("replayed", msg) for msg in msgs]
    # Ten more genuine messages push seq 1-6 out of the 8-wide window: too old, even if unseen.
    for _ in range(10):
        opener.open(sealer.seal(torch.zeros(1)))
    attacks.append(("too old", msgs[0]))
    assert len(attacks) >= 20
    for what, msg in attacks:
        with pytest.raises(SecurityError):
            opener.open(msg)
        # a rejected forgery must not disturb the genuine stream
    _, seq, _ = opener.open(sealer.seal(torch.ones(2)))
    assert seq == 17


def test_replay_window_accepts_reordering_within_the_window():
    w = ReplayWindow(size=4)
    for seq in (1, 3, 2, 6, 5, 4):
        w.check("s", seq)
        w.record("s", seq)
    with pytest.raises(SecurityError, match="replayed"):
        w.check("s", 5)
    with pytest.raises(SecurityError, match="too-old"):
        w.check("s", 2)


def test_tokens_grant_scopes_and_refuse_everything_else():
    now = [1000.0]
    auth = TokenAuthority(b"0123456789abcdef-secret", clock=lambda: now[0])
    alice = auth.issue("alice", {"generate", "model:tiny-lm"}, ttl_s=60)
    bob = auth.issue("bob", {"embed"}, ttl_s=60)
    assert auth.authorize(alice, "generate")["tenant"] == "alice"
    for token, scope, status in [(None, "generate", 401), ("", "generate", 401), ("abc.def", "generate", 401),
                                 (alice[:-2] + "AA", "generate", 401), (bob, "generate", 403),
                                 (alice, "admin", 403),
                                 (TokenAuthority(b"another-secret-16b").issue("alice", {"generate"}), "generate", 401)]:
        with pytest.raises(AuthError) as info:
            auth.authorize(token, scope)
        assert info.value.status == status
    now[0] += 61
    with pytest.raises(AuthError, match="expired"):
        auth.authorize(alice, "generate")


PLANTED = {
    "jane.doe@example.com": "EMAIL", "ops+alerts@mail.internal.example.org": "EMAIL",
    "4111 1111 1111 1111": "CARD", "5500-0000-0000-0004": "CARD", "378282246310005": "CARD",
    "+1 (415) 555-0132": "PHONE", "020 7946 0958": "PHONE", "+49 30 901820": "PHONE",
    "192.168.1.20": "IP", "8.8.8.8": "IP", "2001:0db8:85a3:0000:0000:8a2e:0370:7334": "IP",
}


def test_planted_pii_is_redacted_and_never_reaches_the_log():
    stream = io.StringIO()
    log = logging.getLogger("test08.requests")
    handler = logging.StreamHandler(stream)
    log.addHandler(handler), log.addFilter(RedactingFilter())
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        for value, kind in PLANTED.items():
            prompt = f"Please contact {value} about the order, thanks."
            assert redact(prompt) == f"Please contact [{kind}] about the order, thanks.", value
            log.info("prompt from tenant %s: %s", "acme", prompt)
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert len(text.splitlines()) == len(PLANTED)
    for value in PLANTED:
        assert value not in text
        assert value.replace(" ", "").replace("-", "") not in text.replace(" ", "").replace("-", "")


def test_pii_at_the_end_of_a_sentence_is_redacted():
    assert redact("Shipped to 10.1.2.3. Mail bob@example.org.") == "Shipped to [IP]. Mail [EMAIL]."


def test_a_message_under_another_key_is_reported_as_tampered_not_replayed(channel):
    _, sealer, opener = channel
    opener.open(sealer.seal(torch.ones(1)))
    with pytest.raises(SecurityError) as info:
        opener.open(TensorSealer(new_key(), "rank0").seal(torch.ones(1)))   # same sender, seq 1
    assert info.value.reason == "tampered"


def test_ordinary_numbers_survive_redaction():
    text = "In 2024, 3 of 4 GPUs (75.5%) ran version 1.2.3 for 42 minutes."
    assert redact(text) == text
    assert "4111 1111 1111 1112" in redact("bad card 4111 1111 1111 1112")   # fails Luhn: not a card


def test_luhn():
    assert luhn_valid("79927398713") and not luhn_valid("79927398710")
    assert luhn_valid("4111-1111-1111-1111") and not luhn_valid("41x1") and not luhn_valid("")


@pytest.fixture(scope="module")
def model():
    return load_model("random:0")


def test_shared_prefix_cache_leaks_another_tenants_prefix_and_salting_closes_it(model):
    secret = list(range(30, 30 + 64))          # four 16-token blocks of tenant A's prompt
    leaky = probe(TenantServer(model, isolate=False), secret + [1, 2], secret, trials=2)
    assert all(c == 64 for c in leaky["guess_cached_tokens"])
    assert all(c == 0 for c in leaky["control_cached_tokens"])
    safe = probe(TenantServer(model, isolate=True), secret + [1, 2], secret, trials=2)
    assert all(c == 0 for c in safe["guess_cached_tokens"])
    # Isolation does not disable caching within a tenant.
    server = TenantServer(model, isolate=True)
    server.serve("tenant-a", secret + [1])
    assert server.serve("tenant-a", secret + [9])[1] == 64
    # And caching does not change the answer.
    assert server.serve("tenant-a", secret + [5])[0] == TenantServer(model, True).serve("x", secret + [5])[0]


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="16, 24 or 32"):
        TensorSealer(b"short", "x")
    with pytest.raises(TypeError, match="torch.Tensor"):
        TensorSealer(new_key(), "x").seal([1, 2])
    with pytest.raises(ValueError, match="16 random bytes"):
        TokenAuthority(b"pw")
    with pytest.raises(TypeError):
        redact(None)
