"""Point-to-point transfer of activations between pipeline stages, shape first.

``dist.recv`` fills a tensor the receiver already allocated, so the receiver must know
the shape and dtype before the data arrives. During decoding they change every step:
the prefill sends (batch, prompt_len, dim), each decode step (batch, 1, dim), and a
micro-batch of a ragged batch may have fewer rows. A receiver that reuses the buffer of
the first step either errors or, worse, silently reads stale or truncated data.

So every tensor travels as two messages: a small fixed-size header (dtype code, number of
dimensions, the sizes), then the payload. This costs one tiny extra message per hop, the
same price Megatron pays when ``variable_seq_lengths`` is on.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ...validate import bad, check_int, check_tensor

MAX_DIMS = 8
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
          torch.int32, torch.bool, torch.uint8)
_HEADER_LEN = 2 + MAX_DIMS


def encode_header(t: torch.Tensor) -> torch.Tensor:
    """``[dtype code, ndim, size_0, ..., size_{ndim-1}, 0, ...]`` as a fixed-length int64 tensor."""
    check_tensor("t", t)
    if t.dtype not in DTYPES:
        raise bad("t.dtype", t.dtype, "one of " + ", ".join(str(d) for d in DTYPES),
                  "the header has a code for each")
    if t.dim() > MAX_DIMS:
        raise bad("t.dim()", t.dim(), f"at most {MAX_DIMS}", "the header has room for that many sizes")
    header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
    header[0], header[1] = DTYPES.index(t.dtype), t.dim()
    header[2:2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    return header


def decode_header(header: torch.Tensor) -> tuple[torch.Size, torch.dtype]:
    """Inverse of :func:`encode_header`: ``(shape, dtype)``."""
    ndim = int(header[1])
    return torch.Size(header[2:2 + ndim].tolist()), DTYPES[int(header[0])]


def send_tensor(t: torch.Tensor, dst: int, group=None) -> tuple:
    """Send ``t`` to global rank ``dst``: header, then data. Non-blocking.

    Returns ``(works, buffers)``: the caller keeps the buffers alive until the works are
    done (collect the pairs in a list and call :func:`wait_all`). Non-blocking sends let a stage start its next
    micro-batch while this one is on the wire, and avoid the deadlock two blocking sends
    facing each other would cause.
    """
    check_int("dst", dst, low=0, why="a global rank")
    header = encode_header(t)
    t = t.detach().contiguous()
    return [dist.isend(header, dst, group=group), dist.isend(t, dst, group=group)], (header, t)


def recv_tensor(src: int, group=None, device=None) -> torch.Tensor:
    """Receive a tensor sent with :func:`send_tensor` from global rank ``src`` (blocking)."""
    check_int("src", src, low=0, why="a global rank")
    header = torch.empty(_HEADER_LEN, dtype=torch.int64)
    dist.recv(header, src, group=group)
    shape, dtype = decode_header(header)
    out = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(out, src, group=group)
    return out


class TensorReceiver:
    """Receives a stream of :func:`send_tensor` messages from one rank, header posted early.

    Each message costs two round trips: the header, then the data (only then is the size
    known). ``recv(more=True)`` posts the *next* header's receive before returning, so that
    round trip overlaps with the caller's compute instead of adding to it. Pass ``more=False``
    for the last message, so no receive is left waiting.
    """

    def __init__(self, src: int, group=None) -> None:
        check_int("src", src, low=0, why="a global rank")
        self.src, self.group = src, group
        self._header: torch.Tensor | None = None
        self._work = None

    def _post_header(self) -> None:
        self._header = torch.empty(_HEADER_LEN, dtype=torch.int64)
        self._work = dist.irecv(self._header, self.src, group=self.group)

    def recv(self, more: bool = False, device=None) -> torch.Tensor:
        if self._work is None:
            self._post_header()
        self._work.wait()
        shape, dtype = decode_header(self._header)
        out = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(out, self.src, group=self.group)
        self._work = None
        if more:
            self._post_header()
        return out


def wait_all(pending: list) -> None:
    """Wait for every ``(works, buffers)`` pair that :func:`send_tensor` returned."""
    for works, _buffers in pending:
        for w in works:
            w.wait()
    pending.clear()
