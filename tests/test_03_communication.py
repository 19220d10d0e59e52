"""Lesson 03: collectives from send/recv equal torch's (ring, one-shot, two-shot, tree), byte
counts, schedules, bad inputs, the deadlock and its fixes, the cost model, the ring widget."""

import pytest
import torch
import torch.distributed as dist

from lessons_lib import DistributedError, run_distributed
from lessons_lib.comm import (bytes_sent, chunk_bounds, one_shot_all_reduce, one_shot_schedule,
                              ring_all_gather, ring_all_reduce, ring_reduce_scatter, ring_schedule,
                              simulate_ring, tree_broadcast, tree_broadcast_schedule, two_shot_all_reduce,
                              two_shot_schedule)
from lessons_lib.comm.cost_model import (all_reduce_terms, bus_bandwidth, crossover_bytes,
                                         fastest_all_reduce, fit_alpha_beta, predict_all_reduce,
                                         predict_ring_all_reduce)
from lessons_lib.comm.deadlock import exchange_batched, exchange_by_parity, exchange_send_first

pytestmark = pytest.mark.lesson03
SIZES = (12, 13, 2)   # divisible by 2, 3 and 4; divisible by none; fewer elements than ranks


# -- schedules as data (pure) ------------------------------------------------------------
@pytest.mark.parametrize("p", [1, 2, 3, 4, 5, 8])
def test_ring_schedule_keeps_every_link_busy_once_per_step(p):
    steps = ring_schedule(p, "all_reduce")
    assert len(steps) == 2 * (p - 1)
    for step in steps:
        assert sorted(t.src for t in step) == list(range(p))
        assert all(t.dst == (t.src + 1) % p for t in step)
        assert len({t.chunk for t in step}) == p   # each chunk on exactly one link
    assert [t.op for t in steps[0]] == ["reduce"] * p if p > 1 else True
    assert all(t.op == "copy" for step in steps[p - 1:] for t in step)


@pytest.mark.parametrize("p", [2, 3, 4, 7])
def test_simulated_ring_reduces_everything_everywhere(p):
    everyone = frozenset(range(p))
    final = simulate_ring(p, "all_reduce")[-1]
    assert all(cell == everyone for row in final for cell in row)
    after_rs = simulate_ring(p, "reduce_scatter")[-1]
    for r in range(p):   # rank r owns chunk r, complete; no other chunk is complete on it
        assert [c for c in range(p) if after_rs[r][c] == everyone] == [r]


def test_first_step_state_is_exact():
    # step 0: rank r sends chunk (r - 1) % p to r + 1, who adds it to its own copy
    after_one = simulate_ring(3)[1]
    assert after_one[1] == [frozenset({1}), frozenset({1}), frozenset({0, 1})]
    assert after_one[0] == [frozenset({0}), frozenset({0, 2}), frozenset({0})]


@pytest.mark.parametrize("n, p", [(12, 4), (13, 4), (2, 4), (13, 3), (1000, 2)])
def test_byte_counts_follow_the_formula(n, p):
    per_rank = bytes_sent(ring_schedule(p, "all_reduce"), n, p, 4)
    assert sum(per_rank) == 2 * (p - 1) * n * 4
    if n % p == 0:
        assert per_rank == [2 * (p - 1) * n // p * 4] * p
    rs = bytes_sent(ring_schedule(p, "reduce_scatter"), n, p, 4)
    assert sum(rs) == (p - 1) * n * 4


@pytest.mark.parametrize("n, p", [(12, 4), (13, 4), (2, 4), (13, 3), (1000, 2)])
def test_direct_all_reduces_send_the_formula_bytes(n, p):
    one = one_shot_schedule(p)
    assert len(one) == 1 and len(one[0]) == p * (p - 1)           # everyone to everyone, once
    assert bytes_sent(one, n, p, 4) == [(p - 1) * n * 4] * p
    two = two_shot_schedule(p)
    assert len(two) == 2 and all(len(step) == p * (p - 1) for step in two)
    # reduce-scatter: rank r receives chunk r from everyone; all-gather: rank r sends chunk r
    assert all(t.chunk == t.dst and t.op == "reduce" for t in two[0])
    assert all(t.chunk == t.src and t.op == "copy" for t in two[1])
    per_rank = bytes_sent(two, n, p, 4)
    assert sum(per_rank) == sum(bytes_sent(ring_schedule(p), n, p, 4)) == 2 * (p - 1) * n * 4
    if n % p == 0:
        assert per_rank == [2 * (p - 1) * n // p * 4] * p
    assert one_shot_schedule(1) == two_shot_schedule(1) == []


def test_chunk_bounds_are_tensor_split_sizes():
    for n, p in [(13, 4), (2, 4), (12, 3)]:
        expected = [len(c) for c in torch.arange(n).tensor_split(p)]
        assert [b - a for a, b in chunk_bounds(n, p)] == expected


@pytest.mark.parametrize("p", [2, 3, 4, 5, 8])
def test_tree_broadcast_reaches_everyone_in_log_rounds(p):
    rounds = tree_broadcast_schedule(p, root=1)
    assert len(rounds) == (p - 1).bit_length()
    have = {1}
    for r in rounds:
        assert all(t.src in have and t.dst not in have for t in r)
        have |= {t.dst for t in r}
    assert have == set(range(p))


@pytest.mark.parametrize("bad", [0, 2.0, True])
def test_schedule_rejects_bad_world_sizes(bad):
    with pytest.raises(ValueError, match=r"^p=.* is not valid: expected an int >= 1 \(.*number of ranks"):
        ring_schedule(bad)
    with pytest.raises(ValueError, match="kind='all_to_all' is not valid: expected one of 'all_reduce'"):
        ring_schedule(2, "all_to_all")


# -- the ring widget draws the schedule --------------------------------------------------
def test_ring_widget_redraws_when_the_step_changes():
    from lessons_lib.viz.ring import ring_frame, ring_widget

    w = ring_widget(3)
    assert w.data["fill"] == [[1] * 3] * 3 and w.data["phase"] == "reduce-scatter"
    w.controls["step"].value = 2
    assert w.data == ring_frame(3, 2) and w.data["phase"] == "all-gather"
    w.controls["p"].value = 5
    assert w.controls["step"].max == 8 and w.data["p"] == 5
    w.controls["step"].value = 8
    assert w.data["fill"] == [[5] * 5] * 5 and w.data["transfers"] == []


# -- the collectives on real ranks, against torch's own ---------------------------------
def _compare_with_torch(sizes):
    rank, p = dist.get_rank(), dist.get_world_size()
    report = []
    for n in sizes:
        g = torch.Generator().manual_seed(100 * rank + n)
        x = torch.randn(n, generator=g)
        mine, ref = x.clone(), x.clone()
        sent_ar = ring_all_reduce(mine)
        dist.all_reduce(ref)
        ints = torch.arange(n, dtype=torch.int64) * (rank + 1)
        ints_ref = ints.clone()
        ring_all_reduce(ints)
        dist.all_reduce(ints_ref)
        start, stop = chunk_bounds(n, p)[rank]
        out = torch.empty(stop - start)
        sent_rs = ring_reduce_scatter(out, x)
        gathered = torch.empty(n)
        sent_ag = ring_all_gather(gathered, x[start:stop])
        if n % p == 0:   # gloo's own reduce-scatter/all-gather need equal chunks
            all_parts = [torch.empty(stop - start) for _ in range(p)]
            rs_ref = torch.empty(n // p)
            dist.reduce_scatter(rs_ref, list(x.chunk(p)))
            dist.all_gather(all_parts, x[start:stop])
            rs_ok = torch.allclose(out, rs_ref, atol=1e-5)
            ag_ok = torch.equal(gathered, torch.cat(all_parts))
        else:            # otherwise the oracle is torch's all-reduce, sliced
            rs_ok = torch.allclose(out, ref[start:stop], atol=1e-5)
            ag_ok = torch.equal(gathered[start:stop], x[start:stop])   # full check: _full_gather_check
        direct = {}
        for name, fn in (("one_shot", one_shot_all_reduce), ("two_shot", two_shot_all_reduce)):
            y, y_int = x.clone(), torch.arange(n, dtype=torch.int64) * (rank + 1)
            sent = fn(y)
            fn(y_int)
            direct[name] = dict(ok=torch.allclose(y, ref, atol=1e-5) and torch.equal(y_int, ints_ref),
                                values=y.tolist(), sent=sent)
        b = torch.randn(n, generator=g) if rank == 1 else torch.zeros(n)
        b_ref = b.clone()
        sent_bc = tree_broadcast(b, src=1)
        dist.broadcast(b_ref, src=1)
        report.append(dict(n=n, ar=torch.allclose(mine, ref, atol=1e-5), ar_int=torch.equal(ints, ints_ref),
                           rs=rs_ok, ag=ag_ok, bc=torch.equal(b, b_ref), direct=direct,
                           sent=(sent_ar, sent_rs, sent_ag, sent_bc)))
    return report


def _full_gather_check(n):
    """Uneven all-gather, which gloo's own cannot do: rank r contributes elements of chunk r."""
    rank, p = dist.get_rank(), dist.get_world_size()
    start, stop = chunk_bounds(n, p)[rank]
    piece = torch.arange(start, stop, dtype=torch.float32) * 10
    out = torch.empty(n)
    ring_all_gather(out, piece)
    return torch.equal(out, torch.arange(n, dtype=torch.float32) * 10)


# Test order reuses warm pools of ranks (3, then 4, then 2): each fresh pool costs seconds.
def test_collectives_equal_torch_and_count_bytes_on_3_ranks():
    _check_collectives(3)


def test_a_group_without_the_caller_is_named():
    messages = run_distributed(_bad_input, 3, "group", timeout=20)
    assert messages[:2] == ["ok", "ok"]
    assert messages[2].startswith("ValueError: group does not contain the calling rank (global rank 2)")


@pytest.mark.parametrize("p", [4, 2])
def test_collectives_equal_torch_and_count_bytes(p):
    _check_collectives(p)


def item_index(report, item):
    return next(i for i, other in enumerate(report) if other is item)


def _check_collectives(p):
    reports = run_distributed(_compare_with_torch, p, SIZES, timeout=60)
    for rank, report in enumerate(reports):
        for item in report:
            n = item["n"]
            assert item["ar"] and item["ar_int"] and item["rs"] and item["ag"] and item["bc"], (rank, item)
            assert item["sent"][0] == bytes_sent(ring_schedule(p, "all_reduce"), n, p, 4)[rank]
            assert item["sent"][1] == bytes_sent(ring_schedule(p, "reduce_scatter"), n, p, 4)[rank]
            assert item["sent"][2] == bytes_sent(ring_schedule(p, "all_gather"), n, p, 4)[rank]
            assert item["sent"][3] == bytes_sent(tree_broadcast_schedule(p, 1), n, p, 4)[rank]
            if n % p == 0:
                assert item["sent"][0] == 2 * (p - 1) * n // p * 4
                assert item["sent"][1] == item["sent"][2] == (p - 1) * n // p * 4
            for name, schedule in (("one_shot", one_shot_schedule(p)), ("two_shot", two_shot_schedule(p))):
                result = item["direct"][name]
                assert result["ok"], (rank, name, n)
                assert result["sent"] == bytes_sent(schedule, n, p, 4)[rank], (rank, name, n)
                # every rank adds in rank order: the same floats, bit for bit, everywhere
                assert result["values"] == reports[0][item_index(report, item)]["direct"][name]["values"]
    assert all(run_distributed(_full_gather_check, p, 13, timeout=60))


# -- bad inputs: a clear error on every rank, no hang ------------------------------------
def _bad_input(case):
    rank = dist.get_rank()
    try:
        if case == "sizes":
            ring_all_reduce(torch.ones(4 + rank))
        elif case == "bool":
            ring_all_reduce(torch.ones(4, dtype=torch.bool))
        elif case == "dtypes":
            ring_all_reduce(torch.ones(4, dtype=torch.float32 if rank == 0 else torch.float64))
        elif case == "strided":
            t = torch.ones(4, 4)
            ring_all_reduce(t.t() if rank == 1 else t)
        elif case == "not_tensor":
            ring_all_reduce([1.0] * 4 if rank == 0 else torch.ones(4))
        elif case == "one_shot_sizes":
            one_shot_all_reduce(torch.ones(4 + rank))
        elif case == "two_shot_dtypes":
            two_shot_all_reduce(torch.ones(4, dtype=torch.float32 if rank == 0 else torch.float64))
        elif case == "chunk":
            ring_reduce_scatter(torch.empty(5), torch.ones(4))
        elif case == "group":
            group = dist.new_group([0, 1])
            ring_all_reduce(torch.ones(4), group=group)
            return "ok"
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


@pytest.mark.parametrize("case, words", [
    ("sizes", "RanksDisagree: tensor.numel() differs across ranks: rank 0 has tensor.numel()=4, "
              "rank 1 has tensor.numel()=5; every rank must pass the same tensor.numel()"),
    ("bool", "BadArgument: tensor on rank 0 has an unsupported dtype torch.bool"),
    ("dtypes", "RanksDisagree: tensor.dtype differs across ranks: rank 0 has tensor.dtype=torch.float32, "
               "rank 1 has tensor.dtype=torch.float64"),
    ("strided", "BadArgument: tensor on rank 1 is not contiguous"),
    ("not_tensor", "BadArgument: tensor on rank 0 is not valid: expected a torch.Tensor (got a list)"),
    ("one_shot_sizes", "RanksDisagree: tensor.numel() differs across ranks: rank 0 has tensor.numel()=4, "
                       "rank 1 has tensor.numel()=5"),
    ("two_shot_dtypes", "RanksDisagree: tensor.dtype differs across ranks: rank 0 has tensor.dtype=torch.float32"),
    ("chunk", "BadArgument: output on rank 0 has 5 elements; rank 0 of 2 owns chunk 0 of input, which has 2"),
])
def test_bad_inputs_raise_the_same_clear_error_on_every_rank(case, words):
    messages = run_distributed(_bad_input, 2, case, timeout=20)
    assert messages[0] == messages[1] and messages[0].startswith(words), messages


# -- the deadlock and its fixes ----------------------------------------------------------
@pytest.mark.parametrize("fix", [exchange_by_parity, exchange_batched])
def test_the_fixes_complete(fix):
    assert run_distributed(fix, 2, timeout=30) == [1.0, 0.0]


def test_send_send_deadlocks_and_times_out():
    with pytest.raises(DistributedError) as err:
        run_distributed(exchange_send_first, 2, timeout=3)
    assert err.value.kind == "timeout"


# -- cost model (pure) -------------------------------------------------------------------
def test_alpha_beta_fit_recovers_known_parameters():
    alpha, beta = 50e-6, 1 / 2e9
    samples = [(n, p, predict_ring_all_reduce(n, p, alpha, beta)) for p in (2, 4)
               for n in (1 << 10, 1 << 16, 1 << 20, 1 << 24)]
    fit = fit_alpha_beta(samples)
    assert fit == pytest.approx((alpha, beta), rel=1e-6)
    with pytest.raises(ValueError, match="samples"):
        fit_alpha_beta(samples[:1])


def test_all_reduce_cost_model_prices_steps_and_bytes():
    alpha, beta, p = 50e-6, 1 / 2e9, 4
    assert all_reduce_terms("ring", 1000, p) == (6, 1500)
    assert all_reduce_terms("one_shot", 1000, p) == (1, 3000)
    assert all_reduce_terms("two_shot", 1000, p) == (2, 1500)
    assert predict_all_reduce("ring", 1 << 20, p, alpha, beta) == pytest.approx(
        predict_ring_all_reduce(1 << 20, p, alpha, beta))
    assert fastest_all_reduce(16 << 10, p, alpha, beta) == "one_shot"       # latency-bound
    assert fastest_all_reduce(16 << 20, p, alpha, beta) == "two_shot"       # bandwidth-bound
    assert fastest_all_reduce(16 << 20, 2, alpha, beta) == "one_shot"       # p = 2: same bytes, fewer steps
    n = crossover_bytes("one_shot", "ring", p, alpha, beta)
    assert predict_all_reduce("one_shot", n, p, alpha, beta) == pytest.approx(predict_all_reduce("ring", n, p, alpha, beta))
    assert n == pytest.approx(5 * alpha / (1.5 * beta))                      # (2p-3) alpha = (p-1)(p-2)/p n beta
    assert crossover_bytes("two_shot", "ring", p, alpha, beta) is None       # same bytes: never cross
    with pytest.raises(ValueError, match="algorithm='tree' is not valid: expected one of 'ring'"):
        predict_all_reduce("tree", 1, p, alpha, beta)
    with pytest.raises(ValueError, match=r"^p=1 is not valid"):
        all_reduce_terms("one_shot", 1, 1)


def test_bus_bandwidth_is_nccl_tests_definition():
    assert bus_bandwidth(1e9, 1.0, 4) == pytest.approx(1.5e9)
    assert bus_bandwidth(1e9, 1.0, 2) == pytest.approx(1e9)


# -- sync vs async: the overlap demo ------------------------------------------------------
def test_overlap_demo_warms_up_sizes_compute_and_reports_medians():
    from lessons_lib.comm.overlap import overlap_timeline

    results = run_distributed(overlap_timeline, 2, 1 << 14, 32, None, rounds=3, timeout=120)
    assert results[0]["iters"] == results[1]["iters"] >= 1     # the ranks agree on the compute
    for r in results:
        assert {"blocking", "overlapped", "comm_s", "compute_s", "blocking_s", "overlapped_s"} <= set(r)
        assert [e[0] for e in r["blocking"]] == ["all_reduce", "compute"]
        assert [e[0] for e in r["overlapped"]] == ["all_reduce (in flight)", "compute", "wait"]
        assert r["overlapped"][1][1] == 0.0                    # compute starts with the all-reduce
        assert 0 < r["comm_s"] <= r["blocking_s"] and 0 < r["compute_s"] <= r["blocking_s"]
    fixed = run_distributed(overlap_timeline, 2, 1 << 10, 16, 3, rounds=1, warmup=1, timeout=60)
    assert fixed[0]["iters"] == 3
