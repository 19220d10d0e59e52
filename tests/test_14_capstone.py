"""Capstone: the seed's full example crashes and is fixed; the tiny LM on TP x PP x DP meshes.

Oracle: one process. Greedy tokens identical; fixed DP output within atol 1e-6 of model(x).
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from lessons_lib import DistributedError, check, run_distributed
from lessons_lib.exercises import HISTORY
from lessons_lib.model import ModelConfig, TinyLM, generate

pytestmark = pytest.mark.lesson14
CONFIG = dict(n_layers=4, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128)


class SeedDataParallel(nn.Module):     # the seed's example, verbatim
    def __init__(self, model, device_ids=None):
        super(SeedDataParallel, self).__init__()
        self.model = model
        if device_ids is None:
            device_ids = list(range(torch.cuda.device_count()))
        self.device_ids = device_ids

    def forward(self, x):
        outputs = []
        for device_id in self.device_ids:
            model = self.model.to(device_id)
            output = model(x)
            outputs.append(output)
        dist.all_reduce(torch.stack(outputs), op=dist.ReduceOp.SUM)
        return torch.mean(torch.stack(outputs), dim=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the seed's example only crashes without a GPU")
def test_the_seed_example_crashes_on_a_cpu_machine():
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10))
    with pytest.raises(RuntimeError, match="non-empty TensorList"):
        SeedDataParallel(model)(torch.randn(100, 10))


def _fixed_dp(model, x):
    rank, world = dist.get_rank(), dist.get_world_size()
    with torch.no_grad():
        out = model(torch.tensor_split(x, world)[rank])
    parts = [None] * world
    dist.all_gather_object(parts, out)
    return torch.cat(parts)


def _averaging_dp(model, x):          # the seed's idea with a process group: all rows, then average
    out = model(x).detach()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def _last_verdict(exercise_id, candidate):
    check(exercise_id, candidate)
    return HISTORY[-1].status


def test_dp_checker_accepts_the_fix_and_rejects_the_seed_and_a_stub():
    assert _last_verdict("14.dp_forward", _fixed_dp) == "correct"
    assert _last_verdict("14.dp_forward", _averaging_dp) == "incorrect"

    def stub(model, x):
        raise NotImplementedError()
    assert _last_verdict("14.dp_forward", stub) == "not attempted"


def _model():
    torch.manual_seed(0)
    return TinyLM(ModelConfig(**CONFIG)).eval()


def _prompts():
    ids = torch.randint(0, 256, (5, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0          # left padding
    return ids, mask


def _serve(tp, pp, m):
    from lessons_lib.parallel.mesh import Mesh
    from lessons_lib.parallel.pipeline import generate_on_mesh
    ids, mask = _prompts()
    mesh = Mesh(tp=tp, pp=pp)
    return generate_on_mesh(_model(), mesh, ids, 32, attention_mask=mask, n_microbatches=m)


@pytest.mark.parametrize("tp, pp, m", [(2, 2, 2), (1, 2, 2), (2, 1, 1), (1, 4, 1)],
                         ids=["tp2xpp2", "dp2xpp2", "tp2xdp2", "pp4"])
def test_tiny_lm_on_a_4_rank_mesh_gives_one_process_tokens(tp, pp, m):
    ids, mask = _prompts()
    want = generate(_model(), ids, 32, attention_mask=mask)
    for rank, got in enumerate(run_distributed(_serve, 4, tp, pp, m, timeout=180)):
        assert torch.equal(got, want), f"rank {rank} (tp={tp}, pp={pp}) differs from one process"


def _bad_mesh():
    from lessons_lib.parallel.mesh import Mesh
    Mesh(tp=3, pp=1)


def test_a_mesh_that_does_not_fit_the_world_is_a_clear_error():
    with pytest.raises(DistributedError) as info:
        run_distributed(_bad_mesh, 4)
    assert info.value.remote_type == "BadArgument"
    assert "tp x pp" in str(info.value.remote_traceback)
