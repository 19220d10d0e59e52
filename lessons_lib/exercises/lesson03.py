"""Checkers for notebook 03 (communication)."""

from ..comm.schedule import bytes_sent, ring_schedule
from ..launch import DistributedError, run_distributed
from .check import Incorrect, exercise

SIZES = (12, 13)   # one divisible by 2, 3 and 4; one divisible by none of them


def _run_candidate(candidate, sizes):
    """On every rank: the candidate's result and bytes, next to torch's all-reduce of the same data."""
    import torch
    import torch.distributed as dist

    def forbidden(*args, **kwargs):
        raise RuntimeError("build the all-reduce from send/recv (isend/irecv); "
                           "dist.all_reduce and dist.reduce_scatter are not allowed here")

    rank = dist.get_rank()
    references, outcomes = [], []
    for n in sizes:
        x = torch.arange(n, dtype=torch.float32) * (rank + 1) + rank
        reference = x.clone()
        dist.all_reduce(reference)
        references.append(reference)
    saved = dist.all_reduce, dist.reduce_scatter, dist.reduce_scatter_tensor
    dist.all_reduce = dist.reduce_scatter = dist.reduce_scatter_tensor = forbidden
    try:
        for n in sizes:
            x = torch.arange(n, dtype=torch.float32) * (rank + 1) + rank
            sent = candidate(x)
            outcomes.append((x, sent))
    finally:
        dist.all_reduce, dist.reduce_scatter, dist.reduce_scatter_tensor = saved
    return [(x, sent, ref) for (x, sent), ref in zip(outcomes, references)]


@exercise("03.ring_all_reduce", "ring all-reduce from send/recv, counting bytes sent")
def check_ring_all_reduce(candidate):
    import torch

    for p in (2, 3, 4):
        try:
            results = run_distributed(_run_candidate, p, candidate, SIZES, timeout=30)
        except DistributedError as exc:
            if exc.remote_traceback and "are not allowed here" in exc.remote_traceback:
                raise Incorrect(exc.remote_traceback.strip().splitlines()[-1].split(": ", 1)[-1]) from None
            raise
        for rank, per_size in enumerate(results):
            for n, (got, sent, ref) in zip(SIZES, per_size):
                if not torch.allclose(got, ref):
                    raise Incorrect(f"p={p}, n={n}: rank {rank} holds {got.tolist()}, expected the sum "
                                    f"{ref.tolist()}. Is the reduction done in place on the input tensor?")
                expected = bytes_sent(ring_schedule(p, "all_reduce"), n, p, 4)[rank]
                if sent != expected:
                    raise Incorrect(f"p={p}, n={n} float32 elements: rank {rank} reported {sent!r} bytes sent, "
                                    f"the ring sends {expected}. Count numel x element_size of every chunk "
                                    f"you send, in both phases (chunks sized like torch.tensor_split).")
    return "equal to dist.all_reduce at p = 2, 3, 4 (n = 12 and 13), with exact byte counts"
