"""A send/send deadlock, reproduced safely, and two ways out.

Two ranks exchange tensors. If both begin with a *blocking* ``dist.send``, each
waits for the other to post the matching ``recv``, which it will only do after its
own send returns: neither returns. With gloo this happens at every message size
(its send waits until the receiver has posted a buffer; we checked 4 bytes to
16 MB). Other transports buffer small messages in the kernel or the library (MPI's
"eager" protocol), so the same bug can hide in tests with small tensors and appear
in production with large ones: a latent deadlock.

Run :func:`exchange_send_first` under ``run_distributed(..., timeout=3)``: the
call ends with ``DistributedError`` of kind ``"timeout"`` and the ranks are
restarted. The fixes complete.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..validate import check_int

DEFAULT_NUMEL = 1 << 18   # 1 MiB of float32: blocks on any transport, not only on gloo


def _peer(numel) -> int:
    check_int("numel", numel, low=1)
    if not dist.is_initialized() or dist.get_world_size() != 2:
        raise ValueError("the exchange runs on exactly 2 ranks: run_distributed(fn, 2)")
    return 1 - dist.get_rank()


def exchange_send_first(numel: int = DEFAULT_NUMEL) -> float:
    """Both ranks send first, then receive: hangs (call it with a small timeout)."""
    peer = _peer(numel)
    mine, theirs = torch.full((numel,), float(dist.get_rank())), torch.empty(numel)
    dist.send(mine, peer)        # blocks until the peer posts its recv ... which comes after its own send
    dist.recv(theirs, peer)
    return theirs[0].item()


def exchange_by_parity(numel: int = DEFAULT_NUMEL) -> float:
    """Fix 1: even ranks send then receive, odd ranks receive then send."""
    peer = _peer(numel)
    mine, theirs = torch.full((numel,), float(dist.get_rank())), torch.empty(numel)
    if dist.get_rank() % 2 == 0:
        dist.send(mine, peer)
        dist.recv(theirs, peer)
    else:
        dist.recv(theirs, peer)
        dist.send(mine, peer)
    return theirs[0].item()


def exchange_batched(numel: int = DEFAULT_NUMEL) -> float:
    """Fix 2: post both operations at once with ``batch_isend_irecv`` and wait for both."""
    peer = _peer(numel)
    mine, theirs = torch.full((numel,), float(dist.get_rank())), torch.empty(numel)
    ops = [dist.P2POp(dist.isend, mine, peer), dist.P2POp(dist.irecv, theirs, peer)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return theirs[0].item()
