"""The two halves of a disaggregated server: a prefill worker and a decode worker.

The **prefill worker** runs prompts through the model (the engine's packed forward,
:func:`~lessons_lib.engine.execute_model`) into blocks of its own pool, samples each request's
first token, packs the request's blocks into a :class:`~.transfer.KVTransfer` and frees them:
it keeps no request once its KV has left.

The **decode worker** owns an :class:`~lessons_lib.engine.LLMEngine` that never runs a prompt.
:meth:`DecodeWorker.accept` checks a transfer (model version, KV layout), gives the request blocks
of its own pool, writes the keys and values into them and puts the request straight into the
running list with its prompt already computed and its first token produced: from the next step it
decodes like any other request, so its tokens are those colocated serving would produce.
"""

from __future__ import annotations

import torch

from ..caching.paged_kv import KVBlockPool, blocks_needed
from ..engine import LLMEngine, SamplingParams, execute_model
from ..model.generate import sample_next_token
from ..serving.fingerprint import state_fingerprint
from ..validate import bad, check_int, check_str, check_token_ids
from .transfer import KVLayout, KVTransfer, check_layout, check_version, pack_kv, unpack_kv

__all__ = ["DecodeWorker", "PrefillWorker", "resume_transfer"]


def model_fingerprint(model) -> str:
    """Lesson 05's version of a model: one SHA-256 over its state_dict."""
    return state_fingerprint(model.state_dict())


class PrefillWorker:
    """Computes prompts' KV and first tokens; hands each request on as a :class:`KVTransfer`.

    Args:
        model: the tiny LM (or any model the engine runs).
        block_size: tokens per KV block (the decode worker must use the same).
        num_blocks: blocks of its pool; by default enough for one full context.
    """

    def __init__(self, model, *, block_size: int = 16, num_blocks: int | None = None) -> None:
        config = getattr(model, "config", None)
        if not isinstance(model, torch.nn.Module) or config is None:
            raise bad("model", model, "a TinyLM (an nn.Module with a .config)")
        self.model, self.config = model.eval(), config
        check_int("block_size", block_size, low=1)
        if num_blocks is None:
            num_blocks = blocks_needed(config.max_seq_len, block_size)
        check_int("num_blocks", num_blocks, low=1)
        dtype = next(model.parameters()).dtype
        self.pool = KVBlockPool(num_blocks, block_size, config.n_layers, config.n_kv_heads,
                                config.head_dim, dtype=dtype)
        self.layout = KVLayout.of(self.pool)
        self.fingerprint = model_fingerprint(model)
        self.num_prefill_tokens = 0          # prompt tokens run through the model, in all

    def prefill(self, request_id: str, prompt_token_ids, max_tokens: int) -> KVTransfer:
        """Prefill one prompt (greedy first token); return its transfer. The pool is empty again after."""
        check_str("request_id", request_id)
        prompt = [int(t) for t in check_token_ids("prompt_token_ids", prompt_token_ids, self.config.vocab_size)]
        check_int("max_tokens", max_tokens, low=1, why="tokens the request may produce, the first one included")
        if len(prompt) + max_tokens > self.config.max_seq_len:
            raise bad("prompt_token_ids", f"a prompt of {len(prompt)} tokens",
                      f"prompt + max_tokens <= max_seq_len={self.config.max_seq_len}")
        allocator = self.pool.allocator
        need = blocks_needed(len(prompt), self.pool.block_size)
        if need > allocator.num_free:
            raise bad("prompt_token_ids", f"a prompt of {len(prompt)} tokens",
                      f"at most {allocator.num_free * self.pool.block_size} tokens (this worker's pool)")
        table = [allocator.allocate() for _ in range(need)]
        try:
            logits = execute_model(self.model, self.pool, prompt, [(table, 0, len(prompt))])
            first = int(sample_next_token(logits, greedy=True)[0])
            payload = pack_kv(self.pool, table, len(prompt))
        finally:
            allocator.free_all(list(reversed(table)))
        self.num_prefill_tokens += len(prompt)
        return KVTransfer(request_id, prompt, first, max_tokens, self.layout, self.fingerprint, payload)


class DecodeWorker:
    """An engine that only decodes: requests arrive prefilled, as :class:`KVTransfer` objects.

    ``engine_kwargs`` go to :class:`~lessons_lib.engine.LLMEngine` (block_size, num_blocks,
    max_num_seqs, clock, ...).
    """

    def __init__(self, model, **engine_kwargs) -> None:
        self.engine = LLMEngine(model, **engine_kwargs)
        self.layout = KVLayout.of(self.engine.pool)
        self.fingerprint = model_fingerprint(model)
        self.num_installed_tokens = 0

    def accept(self, transfer: KVTransfer) -> None:
        """Check the transfer, install its KV in this worker's pool and start decoding the request.

        Raises :class:`~.transfer.ModelVersionMismatch` or :class:`~.transfer.KVLayoutMismatch`
        (nothing is taken), or a ``BadArgument`` if the pool has no room for the request.
        """
        if not isinstance(transfer, KVTransfer):
            raise bad("transfer", transfer, "a KVTransfer from a PrefillWorker")
        check_version(transfer.fingerprint, self.fingerprint)
        check_layout(transfer.layout, self.engine.pool)
        if transfer.max_tokens < 2:
            raise bad("transfer", f"request {transfer.request_id!r} with max_tokens={transfer.max_tokens}",
                      "max_tokens >= 2", "its one token came from the prefill worker: nothing is left to decode")
        prompt = transfer.prompt_token_ids
        # The engine checks the prompt as add_request does, and refuses it (nothing taken) if it
        # does not fit; the request then starts decoding at once: its prompt is computed already.
        self.engine.add_prefilled_request(
            transfer.request_id, prompt, SamplingParams(max_tokens=transfer.max_tokens), transfer.first_token,
            lambda pool, block_table: unpack_kv(transfer.payload, pool, block_table))
        self.num_installed_tokens += len(prompt)

    def step(self):
        return self.engine.step()

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests()


def resume_transfer(prefill: PrefillWorker, request_id: str, prompt_token_ids, delivered: list[int],
                    max_tokens: int) -> KVTransfer | None:
    """Recover a request whose decode worker died: re-prefill prompt + the tokens already delivered.

    The client has ``delivered`` (the first token and those decoded before the failure). Their KV
    died with the worker, so the prefill worker computes it again, over prompt + delivered, and
    samples the *next* token; the new transfer may produce ``max_tokens - len(delivered)`` more.
    Returns None when nothing is left to produce.
    """
    check_int("max_tokens", max_tokens, low=1)
    delivered = [int(t) for t in delivered]
    if len(delivered) > max_tokens:
        raise bad("delivered", delivered, f"at most max_tokens={max_tokens} tokens")
    left = max_tokens - len(delivered)
    if left == 0:
        return None
    return prefill.prefill(request_id, list(prompt_token_ids) + delivered, left)
