"""Lesson 14's exercises: every catalogued wrong answer earns the hint for its mistake."""

import pytest
import torch
import torch.distributed as dist

from exercise_catalogue import (assert_correct, assert_hint, assert_not_attempted, assert_refused,
                               solution_function)

pytestmark = pytest.mark.lesson14


# -- 14.predict_mesh_bytes ---------------------------------------------------------------------
predicted_mesh_bytes = solution_function("14_capstone", "predicted_mesh_bytes")


PAYLOAD = 4 * 6 * 64 * 4 + 2 * 4 * 64 * 4


@pytest.mark.parametrize("guess, fragments", [
    (PAYLOAD // 2 + 240, ["whole hidden state", "not a 1/tp slice"]),
    (2 * PAYLOAD + 480, ["one rank (rank 0)"]),
    (PAYLOAD, ["header"]),
    (PAYLOAD + 4 * 64 * 4 + 320, ["one pass too many"]),
    (sum(4 * (6 + k) * 64 * 4 for k in range(3)) + 240, ["KV cache"]),
    ((PAYLOAD + 240) * 8, ["bits"]),
    (PAYLOAD // 2 + 240 + 1, ["Per pass"]),
])
def test_predict_mesh_bytes_names_the_mistake(guess, fragments):
    assert_hint("14.predict_mesh_bytes", lambda: guess, *fragments)


def test_predict_mesh_bytes_verdicts():
    assert_correct("14.predict_mesh_bytes", predicted_mesh_bytes)

    def stub():
        raise NotImplementedError()
    assert_not_attempted("14.predict_mesh_bytes", stub)

    def measuring():
        from lessons_lib.exercises.lesson14 import measured_mesh_bytes
        return measured_mesh_bytes()
    assert_refused("14.predict_mesh_bytes", measuring, "measured_mesh_bytes")


# -- 14.mesh_groups ----------------------------------------------------------------------------
mesh_groups = solution_function("14_capstone", "mesh_groups")


def dp_fastest(rank, dp, pp, tp):
    d, p, t = rank % dp, rank // dp % pp, rank // (dp * pp)
    return {"coords": (d, p, t), "tp": [], "pp": [], "dp": []}


def tp_and_pp_swapped(rank, dp, pp, tp):
    right = mesh_groups(rank, dp, pp, tp)
    return {**right, "tp": right["pp"], "pp": right["tp"]}


def groups_in_reverse(rank, dp, pp, tp):
    right = mesh_groups(rank, dp, pp, tp)
    return {**right, "dp": right["dp"][::-1]}


def dp_stride_off(rank, dp, pp, tp):
    right = mesh_groups(rank, dp, pp, tp)
    d, p, t = right["coords"]
    return {**right, "dp": [(i * pp + p) * tp + t + (1 if i else 0) for i in range(dp)]}


def with_the_mesh(rank, dp, pp, tp):
    from lessons_lib.parallel.mesh import mesh_grid
    return mesh_grid(tp=tp, pp=pp, dp=dp)


@pytest.mark.parametrize("answer, fragments", [
    (dp_fastest, ["dp vary fastest", "tp varies fastest"]),
    (tp_and_pp_swapped, ["tp group", "is its pp group"]),
    (groups_in_reverse, ["another order", "rank inside the group"]),
    (dp_stride_off, ["your dp group is"]),
])
def test_mesh_groups_names_the_mistake(answer, fragments):
    assert_hint("14.mesh_groups", answer, *fragments)


def test_mesh_groups_verdicts():
    assert_correct("14.mesh_groups", mesh_groups)
    assert_refused("14.mesh_groups", with_the_mesh, "mesh_grid")

    def stub(rank, dp, pp, tp):
        raise NotImplementedError()
    assert_not_attempted("14.mesh_groups", stub)


# -- 14.dp_forward -----------------------------------------------------------------------------
def _share(rows, p, r):
    base, extra = divmod(rows, p)
    start = r * base + min(r, extra)
    return start, start + base + (r < extra)


def dp_forward(model, x):
    p, r = dist.get_world_size(), dist.get_rank()
    start, stop = _share(x.shape[0], p, r)
    local = model(x[start:stop])
    most = -(-x.shape[0] // p)
    padded = torch.zeros(most, *local.shape[1:], dtype=local.dtype)
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(p)]
    dist.all_gather(parts, padded)
    return torch.cat([parts[i][:_share(x.shape[0], p, i)[1] - _share(x.shape[0], p, i)[0]]
                      for i in range(p)])


def dp_with_chunk(model, x):
    """Pads and trims right, but takes its share with torch.chunk."""
    p, r = dist.get_world_size(), dist.get_rank()
    pieces = x.chunk(p)
    local = model(pieces[r])
    most = pieces[0].shape[0]
    padded = torch.zeros(most, *local.shape[1:])
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(p)]
    dist.all_gather(parts, padded)
    return torch.cat([parts[i][:pieces[i].shape[0]] for i in range(p)])


def dp_unpadded_gather(model, x):
    p, r = dist.get_world_size(), dist.get_rank()
    local = model(x[slice(*_share(x.shape[0], p, r))])
    parts = [torch.empty_like(local) for _ in range(p)]
    dist.all_gather(parts, local)
    return torch.cat(parts)


def dp_floor_split(model, x):
    p, r = dist.get_world_size(), dist.get_rank()
    n = x.shape[0] // p
    local = model(x[r * n:(r + 1) * n])
    parts = [torch.empty_like(local) for _ in range(p)]
    dist.all_gather(parts, local)
    return torch.cat(parts)


def dp_whole_batch(model, x):
    return model(x)


def dp_reversed(model, x):
    out = dp_forward(model, x)
    p = dist.get_world_size()
    pieces = [out[slice(*_share(x.shape[0], p, i))] for i in range(p)]
    return torch.cat(pieces[::-1])


def dp_with_the_library(model, x):
    from lessons_lib.parallel.data import DataParallelInference
    return DataParallelInference(model)(x)


@pytest.mark.parametrize("answer, fragments", [
    (dp_with_chunk, ["torch.chunk returns fewer than p pieces"]),
    (dp_unpadded_gather, ["one shape on every rank", "pad"]),
    (dp_floor_split, ["rows are lost", "floor split"]),
    (dp_whole_batch, ["split the batch"]),
    (dp_reversed, ["wrong order"]),
])
def test_dp_forward_names_the_mistake(answer, fragments):
    assert_hint("14.dp_forward", answer, *fragments)


def test_dp_forward_verdicts():
    assert_correct("14.dp_forward", dp_forward)
    assert_refused("14.dp_forward", dp_with_the_library, "DataParallelInference")

    def stub(model, x):
        raise NotImplementedError()
    assert_not_attempted("14.dp_forward", stub)
