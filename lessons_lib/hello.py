"""The first distributed program of the course: every rank adds up the rank ids.

Run it from a notebook with ``run_distributed(allreduce_rank_ids, 4)`` or on one
node with ``torchrun --standalone --nproc-per-node=4 -m lessons_lib.hello``.
"""

import torch
import torch.distributed as dist


def allreduce_rank_ids() -> int:
    """All-reduce (sum) each rank's id; every rank ends with 0 + 1 + ... + (p - 1)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([rank])
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    # One write per line (newline included): lines from ranks sharing a pipe never interleave.
    print(f"rank {rank} of {world_size}: sum of rank ids = {t.item()}\n", end="", flush=True)
    return t.item()


if __name__ == "__main__":
    from lessons_lib.launch import run_under_torchrun

    run_under_torchrun(allreduce_rank_ids)
