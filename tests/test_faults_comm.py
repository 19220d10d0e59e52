"""Faults and bad input in collectives, data parallelism and pipelines.

Ranks that disagree about an argument that must agree (a broadcast's src, a gathered tensor's
trailing shape or dtype, a pipeline's batch) used to hang until the timeout or abort in gloo.
Each case runs on real ranks with a small timeout and asserts that every rank raises the same
named error: a hang would end in a ``timeout`` error instead, and a gloo abort in ``killed``.
"""

import math

import pytest
import torch
import torch.distributed as dist

from lessons_lib import DistributedError, run_distributed
from lessons_lib.comm import RanksDisagree, bytes_sent, chunk_bounds, ring_schedule, tree_broadcast
from lessons_lib.comm import tree_broadcast_schedule
from lessons_lib.comm.collectives import run_ring
from lessons_lib.comm.deadlock import exchange_send_first
from lessons_lib.comm.overlap import overlap_timeline
from lessons_lib.model import ModelConfig, TinyLM
from lessons_lib.parallel.data import gather_rows, local_rows, row_range, split_sizes
from lessons_lib.parallel.pipeline import (PipelineInference, PipelineStageModule, bubble_formula, gpipe,
                                           make_schedule, microbatch_sizes, one_f_one_b, partition_layers,
                                           recv_tensor, send_tensor, split_microbatches)
from lessons_lib.parallel.pipeline.bubble import measure_idle_fraction
from lessons_lib.parallel.pipeline.p2p import encode_header
from lessons_lib.parallel.pipeline.torch_pipelining import TorchGPipe
from lessons_lib.validate import BadArgument

pytestmark = [pytest.mark.lesson03, pytest.mark.lesson11, pytest.mark.lesson13]
TIMEOUT = 20      # seconds a run may take; every case below fails in about one message latency
CONFIG = dict(n_layers=2, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64)


def _model():
    torch.manual_seed(0)
    return TinyLM(ModelConfig(**CONFIG)).eval()


def _ids(rows=10, seq=5):
    return torch.randint(0, 256, (rows, seq), generator=torch.Generator().manual_seed(1))


# -- ranks that disagree: every rank raises the same error, none hangs --------------------
def _pipeline(n_microbatches=2):
    from lessons_lib.parallel.mesh import Mesh
    from lessons_lib.parallel.pipeline import build_stage
    mesh = Mesh(pp=dist.get_world_size())
    return PipelineInference(build_stage(_model(), mesh), mesh, n_microbatches)


def _disagree(case):
    """Run one mismatch on this rank; return the error every rank raised, as text."""
    from lessons_lib.parallel.data import DataParallelInference
    from lessons_lib.parallel.pipeline import execute
    rank = dist.get_rank()
    try:
        if case == "src":
            tree_broadcast(torch.ones(4), src=rank)
        elif case == "src_one_rank_out_of_range":
            tree_broadcast(torch.ones(4), src=5 if rank == 2 else 0)
        elif case == "gather_shape":
            gather_rows(torch.ones(2 + rank, 3 + (rank == 1)))
        elif case == "gather_dtype":
            gather_rows(torch.ones(2, 3, dtype=torch.float64 if rank == 1 else torch.float32))
        elif case == "gather_not_a_tensor":
            gather_rows([[1.0, 2.0]] if rank == 1 else torch.ones(1, 2))
        elif case == "different_calls":
            tree_broadcast(torch.ones(4)) if rank == 0 else gather_rows(torch.ones(1, 2))
        elif case == "pipeline_batch":
            _pipeline().generate(_ids(4 + rank), 2)
        elif case == "pipeline_microbatches":
            _pipeline(n_microbatches=2 + rank).forward(_ids(4))
        elif case == "pipeline_new_tokens":
            _pipeline().generate(_ids(4), 2 + rank)
        elif case == "pipeline_mask":
            _pipeline().forward(_ids(4), torch.ones(4, 5, dtype=torch.long) if rank == 0 else None)
        elif case == "execute_schedule":
            execute(gpipe(2, 2 + rank), rank, lambda i, x: x, [torch.zeros(1)] * 2, prev=None if rank == 0 else 0,
                    next=1 if rank == 0 else None)
        elif case == "dp_batch":
            DataParallelInference(torch.nn.Identity())(torch.zeros(6 + rank, 2))
        elif case == "torch_gpipe_microbatches":
            from lessons_lib.parallel.mesh import Mesh
            from lessons_lib.parallel.pipeline import build_stage
            mesh = Mesh(pp=2)
            TorchGPipe(build_stage(_model(), mesh), mesh, 2 + rank).step(_ids(4) if rank == 0 else None)
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case, world, words", [
    ("src", 2, "RanksDisagree: src differs across ranks: rank 0 has src=0, rank 1 has src=1; "
               "every rank must pass the same src"),
    ("src_one_rank_out_of_range", 3, "RanksDisagree: src differs across ranks: ranks 0, 1 have src=0, "
                                     "rank 2 has src=5"),
    ("gather_shape", 2, r"RanksDisagree: local.shape[1:] differs across ranks: rank 0 has local.shape[1:]=(3,), "
                        r"rank 1 has local.shape[1:]=(4,); every rank must pass the same local.shape[1:] "
                        r"(only dim 0, the rows, may differ)"),
    ("gather_dtype", 2, "RanksDisagree: local.dtype differs across ranks: rank 0 has local.dtype=torch.float32, "
                        "rank 1 has local.dtype=torch.float64"),
    ("gather_not_a_tensor", 2, "BadArgument: local on rank 1 is not valid: expected a torch.Tensor (got a list)"),
    ("different_calls", 2, "RanksDisagree: ranks are in different calls: rank 0 in tree_broadcast; "
                           "rank 1 in gather_rows"),
    ("pipeline_batch", 2, "RanksDisagree: input_ids.shape differs across ranks: rank 0 has input_ids.shape=(4, 5), "
                          "rank 1 has input_ids.shape=(5, 5)"),
    ("pipeline_microbatches", 2, "RanksDisagree: n_microbatches differs across ranks: rank 0 has n_microbatches=2, "
                                 "rank 1 has n_microbatches=3"),
    ("pipeline_new_tokens", 2, "RanksDisagree: max_new_tokens differs across ranks"),
    ("pipeline_mask", 2, "RanksDisagree: attention_mask.shape differs across ranks: rank 0 has "
                         "attention_mask.shape=(4, 5), rank 1 has attention_mask.shape=None"),
    ("execute_schedule", 2, "RanksDisagree: n_microbatches differs across ranks"),
    ("dp_batch", 2, "RanksDisagree: x.shape differs across ranks: rank 0 has x.shape=(6, 2), rank 1 has "
                    "x.shape=(7, 2)"),
    ("torch_gpipe_microbatches", 2, "RanksDisagree: n_microbatches differs across ranks"),
])
def test_ranks_that_disagree_all_raise_the_same_named_error(case, world, words):
    messages = run_distributed(_disagree, world, case, timeout=TIMEOUT)
    assert len(set(messages)) == 1, messages
    assert messages[0].startswith(words), messages[0]


def _broadcast_from_own_rank():
    return tree_broadcast(torch.ones(4), src=dist.get_rank())


@pytest.mark.timeout(60)
def test_an_uncaught_disagreement_ends_the_run_as_an_exception_not_a_timeout():
    with pytest.raises(DistributedError) as info:
        run_distributed(_broadcast_from_own_rank, 2, timeout=TIMEOUT)
    assert info.value.kind == "exception" and info.value.remote_type == "RanksDisagree"
    assert "src differs across ranks" in str(info.value)


def _agreeing_ranks_still_work():
    rank = dist.get_rank()
    b = torch.arange(4.0) if rank == 1 else torch.zeros(4)
    tree_broadcast(b, src=1)
    rows = gather_rows(torch.full((3 - rank, 2), float(rank)))   # dim 0 may differ
    return b, rows


@pytest.mark.timeout(60)
def test_ranks_that_agree_are_not_refused():
    for b, rows in run_distributed(_agreeing_ranks_still_work, 3, timeout=TIMEOUT):
        assert torch.equal(b, torch.arange(4.0))
        assert rows.shape == (6, 2) and rows[:, 0].tolist() == [0, 0, 0, 1, 1, 2]


def _bad_src_everywhere(src):
    try:
        tree_broadcast(torch.ones(4), src=src)
    except BadArgument as exc:
        return str(exc)
    return "no error"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("src", [2, -1, True, "0", 1.0])
def test_a_bad_src_on_every_rank_is_named_on_every_rank(src):
    messages = run_distributed(_bad_src_everywhere, 2, src, timeout=TIMEOUT)
    assert messages[0] == messages[1] and messages[0].startswith("src=") and "is not valid" in messages[0]


# -- TorchGPipe: uneven micro-batches --------------------------------------------------------
def _torch_gpipe(rows, n_microbatches):
    from lessons_lib.parallel.mesh import Mesh
    from lessons_lib.parallel.pipeline import build_stage
    mesh = Mesh(pp=2)
    pipe = TorchGPipe(build_stage(_model(), mesh), mesh, n_microbatches)
    return pipe.step(_ids(rows) if mesh.is_first_stage else None)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("rows, m", [(10, 4), (5, 3), (8, 4)])
def test_torch_gpipe_returns_every_row_once_for_uneven_microbatches(rows, m):
    first, last = run_distributed(_torch_gpipe, 2, rows, m, timeout=60)
    with torch.no_grad():
        reference = _model()(_ids(rows))
    assert first is None
    assert last.shape == reference.shape            # 10 rows in 3, 3, 2, 2 used to come back as 12
    torch.testing.assert_close(last, reference, atol=1e-5, rtol=0)


@pytest.mark.timeout(60)
def test_torch_gpipe_with_more_microbatches_than_rows_is_refused_on_every_stage():
    with pytest.raises(DistributedError) as info:
        run_distributed(_torch_gpipe, 2, 3, 4, timeout=TIMEOUT)
    assert info.value.kind == "exception" and "n_microbatches=4 is not valid" in str(info.value)


# -- bad arguments, one process ----------------------------------------------------------
BAD_INPUTS = [
    (lambda: ring_schedule(0), "p=0"),
    (lambda: ring_schedule(2, "all_to_all"), "kind='all_to_all'"),
    (lambda: chunk_bounds(-1, 2), "n=-1"),
    (lambda: tree_broadcast_schedule(4, root=4), "root=4"),
    (lambda: tree_broadcast_schedule(4, root=True), "root=True"),
    (lambda: bytes_sent(ring_schedule(2), 4, 2, 0), "element_size=0"),
    (lambda: run_ring("not a tensor", []), "flat='not a tensor'"),
    (lambda: exchange_send_first(numel=0), "numel=0"),
    (lambda: overlap_timeline(numel=-3), "numel=-3"),
    (lambda: split_sizes(4, 2.0), "world_size=2.0"),
    (lambda: row_range(4, 2, -1), "rank=-1"),
    (lambda: local_rows([1, 2]), r"batch=\[1, 2\]"),
    (lambda: gather_rows("rows"), "local='rows'"),
    (lambda: partition_layers(4, 0), "pp=0"),
    (lambda: partition_layers(2.5, 1), "n_layers=2.5"),
    (lambda: microbatch_sizes(10, True), "n_microbatches=True"),
    (lambda: split_microbatches([1, 2, 3], 2), r"batch=\[1, 2, 3\]"),
    (lambda: gpipe(0, 2), "n_stages=0"),
    (lambda: one_f_one_b(2, 1.0), "n_microbatches=1.0"),
    (lambda: make_schedule("zigzag", 2, 2), "schedule='zigzag'"),
    (lambda: gpipe(2, 2).timeline(forward_cost=math.nan), "forward_cost=nan"),
    (lambda: bubble_formula(2, -1), "n_microbatches=-1"),
    (lambda: encode_header(torch.zeros(2, dtype=torch.complex64)), "t.dtype=torch.complex64"),
    (lambda: encode_header([1, 2]), r"t=\[1, 2\]"),
    (lambda: send_tensor(torch.zeros(2), dst=-1), "dst=-1"),
    (lambda: recv_tensor("1"), "src='1'"),
    (lambda: measure_idle_fraction(0, 2), "n_stages=0"),
    (lambda: measure_idle_fraction(2, 2, schedule="zigzag"), "schedule='zigzag'"),
    (lambda: measure_idle_fraction(2, 2, action_s=math.inf), "action_s=inf"),
    (lambda: PipelineStageModule(_model(), 2, 2), "stage_index=2"),
    (lambda: PipelineInference(None, None, n_microbatches=0), "n_microbatches=0"),
    (lambda: PipelineInference(None, None, schedule="zigzag"), "schedule='zigzag'"),
    (lambda: TorchGPipe(None, None, n_microbatches=0), "n_microbatches=0"),
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("call, name", BAD_INPUTS, ids=[w.replace("\\", "") for _, w in BAD_INPUTS])
def test_bad_arguments_are_named(call, name):
    with pytest.raises(BadArgument, match=f"^{name} is not valid: expected "):
        call()


def test_a_disagreement_is_a_bad_argument():
    assert issubclass(RanksDisagree, BadArgument)
    assert issubclass(RanksDisagree, ValueError) and issubclass(RanksDisagree, TypeError)
