"""Lesson 08's exercises: every catalogued wrong answer earns the hint for its mistake."""

import hashlib
import hmac

import pytest

from exercise_catalogue import (assert_correct, assert_hint, assert_not_attempted, assert_refused,
                               solution_function)

pytestmark = pytest.mark.lesson08


# -- 08.predict_sealed_bytes -------------------------------------------------------------------
predicted_sealed_bytes = solution_function("08_security", "predicted_sealed_bytes")


@pytest.mark.parametrize("guess, fragments", [
    (30, ["16-byte authentication tag"]),
    (58, ["nonce travels in the clear"]),
    (76, ["2 bytes per element"]),
    (62, ["not 32"]),
    (48, ["no padding"]),
    (100, ["ciphertext (as long as the plaintext) plus the tag"]),
])
def test_predict_sealed_bytes_names_the_mistake(guess, fragments):
    assert_hint("08.predict_sealed_bytes", lambda: guess, *fragments)


def test_predict_sealed_bytes_verdicts():
    assert_correct("08.predict_sealed_bytes", predicted_sealed_bytes)

    def stub():
        raise NotImplementedError()
    assert_not_attempted("08.predict_sealed_bytes", stub)

    def sealing():
        from lessons_lib.serving.security import TensorSealer
        return TensorSealer
    assert_refused("08.predict_sealed_bytes", sealing, "TensorSealer")


# -- 08.replay_window --------------------------------------------------------------------------
replay_window = solution_function("08_security", "replay_window")


def strictly_increasing(seqs, window):
    highest, out = 0, []
    for s in seqs:
        if s > highest:
            out.append("ok")
            highest = s
        else:
            out.append("old")
    return out


def forgets_in_window(seqs, window):
    highest, out = 0, []
    for s in seqs:
        if s <= highest - window:
            out.append("old")
        elif s == highest:
            out.append("replay")
        else:
            out.append("ok")
            highest = max(highest, s)
    return out


def remembers_forever(seqs, window):
    seen, out = set(), []
    for s in seqs:
        out.append("replay" if s in seen else "ok")
        seen.add(s)
    return out


def with_the_library(seqs, window):
    from lessons_lib.serving.security import ReplayWindow
    return ReplayWindow(window)


@pytest.mark.parametrize("answer, fragments", [
    (strictly_increasing, ["out of order"]),
    (forgets_in_window, ["accepted before"]),
    (remembers_forever, ["too old"]),
])
def test_replay_window_names_the_mistake(answer, fragments):
    assert_hint("08.replay_window", answer, *fragments)


def test_replay_window_verdicts():
    assert_correct("08.replay_window", replay_window)
    assert_refused("08.replay_window", with_the_library, "ReplayWindow")

    def stub(seqs, window):
        raise NotImplementedError()
    assert_not_attempted("08.replay_window", stub)


# -- 08.tenant_blocks --------------------------------------------------------------------------
tenant_block_keys = solution_function("08_security", "tenant_block_keys")


def name_as_salt(tokens, tenant, server_secret, block_size):
    return tenant_block_keys(tokens, "", tenant.encode(), block_size)   # the salt is the name


def no_salt(tokens, tenant, server_secret, block_size):
    return tenant_block_keys(tokens, "", server_secret, block_size)


def unchained(tokens, tenant, server_secret, block_size):
    salt = hmac.new(server_secret, tenant.encode(), hashlib.sha256).digest()
    return [hashlib.sha256(salt + ",".join(map(str, tokens[s:s + block_size])).encode()).hexdigest()
            for s in range(0, len(tokens) - block_size + 1, block_size)]


def partial_block_too(tokens, tenant, server_secret, block_size):
    keys = tenant_block_keys(tokens, tenant, server_secret, block_size)
    return keys + ["tail"] if len(tokens) % block_size else keys


def whole_prompt_each_block(tokens, tenant, server_secret, block_size):
    salt = hmac.new(server_secret, tenant.encode(), hashlib.sha256).digest()
    whole = hashlib.sha256(salt + str(tokens).encode()).hexdigest()
    return [f"{whole}-{i}" for i in range(len(tokens) // block_size)]


def with_the_library_hashes(tokens, tenant, server_secret, block_size):
    from lessons_lib.serving.policies import block_hashes
    return block_hashes(tokens, block_size, salt=tenant.encode())


@pytest.mark.parametrize("answer, fragments", [
    (name_as_salt, ["computable from the tenant name"]),
    (no_salt, ["common key"]),
    (unchained, ["chained"]),
    (partial_block_too, ["partial last block"]),
    (whole_prompt_each_block, ["up to the end of that block"]),
])
def test_tenant_blocks_names_the_mistake(answer, fragments):
    assert_hint("08.tenant_blocks", answer, *fragments)


def test_tenant_blocks_verdicts():
    assert_correct("08.tenant_blocks", tenant_block_keys)
    assert_refused("08.tenant_blocks", with_the_library_hashes, "block_hashes")

    def stub(tokens, tenant, server_secret, block_size):
        raise NotImplementedError()
    assert_not_attempted("08.tenant_blocks", stub)
