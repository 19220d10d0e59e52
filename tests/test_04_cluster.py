"""Lesson 04: placement (and its widget), sharded loading, two torchrun "nodes" on localhost."""

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from lessons_lib import run_distributed

from lessons_lib.cluster.multinode import launch_nodes, torchrun_command
from lessons_lib.cluster.placement import (BAD_ORDER, Placement, check_placement,
                                           cross_node_bytes_per_token, place_ranks, placement_grid)
from lessons_lib.cluster.sharded_loading import (expected_bytes_per_rank, load_tp_shard, pages_touched,
                                                 split_dim)
from lessons_lib.model import TINY_LM_PATH, ModelConfig, TinyLM, save_checkpoint

pytestmark = pytest.mark.lesson04


# -- placement ---------------------------------------------------------------------------
def test_good_placement_keeps_tp_in_a_node_and_pp_across():
    pl = place_ranks(2, 4, tp=4, pp=2)
    assert pl.devices == ((0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3))
    for group in pl.groups("tp"):
        assert len({pl.devices[r][0] for r in group}) == 1
    # hidden 8192, batch 1, bf16: one 16 KiB activation crosses the single stage boundary
    assert cross_node_bytes_per_token(pl, 8192, 80) == {"tp": 0.0, "pp": 16384.0, "total": 16384.0}


def test_bad_placement_sends_tp_all_reduces_across_nodes():
    pl = place_ranks(2, 4, tp=4, pp=2, order=BAD_ORDER)
    check_placement(pl)
    # PP stages fill adjacent devices, so each TP ring is split over both nodes:
    node = [d[0] for d in pl.devices]
    assert [node[r] for r in pl.groups("tp")[0]] == [0, 0, 1, 1]   # ring links 1->2 and 3->0 cross
    # 2 stages x 2 crossing links x 2(t-1)/t x M x 2 all-reduces x 40 layers per stage
    message = 8192 * 2
    expected_tp = 2 * 2 * (2 * 3 / 4 * message) * 2 * 40
    got = cross_node_bytes_per_token(pl, 8192, 80)
    assert got["tp"] == expected_tp and got["pp"] == 0.0
    assert got["total"] / cross_node_bytes_per_token(place_ranks(2, 4, 4, 2), 8192, 80)["total"] == 480


def test_dp_replicas_never_cross_nodes_and_batch_scales_linearly():
    pl = place_ranks(2, 2, tp=2, pp=1, dp=2)
    assert cross_node_bytes_per_token(pl, 64, 4, batch=8)["total"] == 0
    pp4 = place_ranks(4, 1, tp=1, pp=4)
    assert cross_node_bytes_per_token(pp4, 64, 4, batch=3, bytes_per_element=4)["pp"] == 3 * 64 * 3 * 4


@pytest.mark.parametrize("args, words", [
    ((2, 4, 4, 4, 1), "tp x pp x dp = 4 x 4 x 1 = 16 ranks"),
    ((2, 4, 0, 2, 1), "tp=0 is not valid: expected an int >= 1"),
    ((2, 4, 4, 2, 1, ("tp", "pp")), "order=('tp', 'pp') is not valid: expected a permutation"),
])
def test_bad_plans_are_named(args, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        place_ranks(*args)


def test_bad_placements_and_layers_are_named():
    doubled = Placement(1, 2, 2, 1, 1, ((0, 0), (0, 0)))
    with pytest.raises(ValueError, match=r"ranks 0 and 1 are both placed on \(0, 0\)"):
        check_placement(doubled)
    with pytest.raises(ValueError, match="pp=2 does not divide n_layers=3"):
        cross_node_bytes_per_token(place_ranks(2, 1, 1, 2), 8, 3)


def test_placement_grid_is_what_the_widget_draws():
    grid = placement_grid(place_ranks(2, 2, tp=2, pp=2))
    assert [[c["rank"] for c in row] for row in grid] == [[0, 1], [2, 3]]
    assert [[c["pp"] for c in row] for row in grid] == [[0, 0], [1, 1]]


def test_placement_widget_redraws_when_the_order_changes():
    from lessons_lib.viz.placement import placement_widget

    w = placement_widget(2, 4)
    good = w.data["bytes"]["total"]
    w.controls["order"].value = BAD_ORDER
    assert w.data["placement"].devices != place_ranks(2, 4, 4, 2).devices and w.data["bytes"]["total"] > good
    w.controls["plan"].value = (2, 2, 2)
    placement = w.data["placement"]
    assert (placement.tp, placement.pp, placement.dp) == (2, 2, 2)


# -- sharded loading ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=264, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=128)
    return save_checkpoint(TinyLM(config), tmp_path_factory.mktemp("ckpt") / "lm.safetensors")


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_each_rank_reads_its_slices_and_about_a_tp_th_of_the_bytes(checkpoint, tp):
    full = load_file(str(checkpoint))
    total = sum(t.nbytes for t in full.values())
    replicated = sum(t.nbytes for name, t in full.items() if "norm" in name)
    assert replicated == (2 * 2 + 1) * 64 * 4   # attn_norm + mlp_norm per layer, final norm; fp32
    shards = []
    for rank in range(tp):
        state, read = load_tp_shard(checkpoint, tp, rank)
        assert read == (total - replicated) // tp + replicated == expected_bytes_per_rank(checkpoint, tp)["per_rank"]
        shards.append(state)
    for name, tensor in full.items():   # the shards put back together are the checkpoint
        dim = split_dim(name)
        rebuilt = shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim=dim)
        assert torch.equal(rebuilt, tensor), name


def test_split_rules_follow_megatron():
    assert split_dim("layers.0.attn.q_proj.weight") == 0
    assert split_dim("layers.3.mlp.down_proj.weight") == 1
    assert split_dim("lm_head.weight") == 0 and split_dim("embed.weight") == 0
    assert split_dim("norm.weight") is None
    with pytest.raises(ValueError, match="no tensor-parallel rule"):
        split_dim("layers.0.mystery.weight")


def test_tp_beyond_the_kv_heads_replicates_them(tmp_path):
    path = save_checkpoint(TinyLM(ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=128)),
                           tmp_path / "gqa.safetensors")
    full = load_file(str(path))
    shards = [load_tp_shard(path, 4, rank) for rank in range(4)]
    head = 64 // 4   # head_dim rows per KV head
    for rank, (state, read) in enumerate(shards):
        for name in ("layers.0.attn.k_proj.weight", "layers.0.attn.v_proj.weight"):
            kv = rank // 2   # two ranks share each of the 2 KV heads, as lesson 12 serves them
            assert torch.equal(state[name], full[name][kv * head:(kv + 1) * head])
        assert state["layers.0.attn.q_proj.weight"].shape[0] == 64 // 4
        assert read == expected_bytes_per_rank(path, 4)["per_rank"]
    expected = expected_bytes_per_rank(path, 4)
    assert expected["kv_replicated"] == 2 * full["layers.0.attn.k_proj.weight"].nbytes // 2
    assert expected["per_rank"] > (expected["total"] - expected["replicated"]) // 4 + expected["replicated"]


def test_tp_that_splits_a_head_is_refused(tmp_path):
    path = save_checkpoint(TinyLM(ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=128)),
                           tmp_path / "gqa.safetensors")
    with pytest.raises(ValueError, match=r"tp=3 does not divide n_heads=4: choose tp among \[1, 2, 4\]"):
        load_tp_shard(path, 3, 0)
    with pytest.raises(ValueError, match=r"tp_rank=2 is not valid: expected an int in \[0, 1\]"):
        load_tp_shard(path, 2, 2)
    odd = save_checkpoint(TinyLM(ModelConfig(dim=96, n_layers=1, n_heads=12, n_kv_heads=4, ffn_dim=128)),
                          tmp_path / "odd.safetensors")
    with pytest.raises(ValueError, match=r"tp=6 neither divides n_kv_heads=4 nor is a multiple of it"):
        load_tp_shard(odd, 6, 0)


def test_tp4_shards_of_the_tiny_lm_are_what_lesson_12_serves():
    def compare(path):
        from lessons_lib.model import load_tiny_lm
        from lessons_lib.parallel.plan import parallelize, tiny_lm_tp_plan

        model = load_tiny_lm()[0]
        served = dict(parallelize(model, tiny_lm_tp_plan(model.config)).named_parameters())
        state, _ = load_tp_shard(path, dist.get_world_size(), dist.get_rank())
        return sorted(state) == sorted(served) and all(
            torch.equal(state[n], served[n].detach()) for n in state)

    assert run_distributed(compare, 4, str(TINY_LM_PATH), timeout=120) == [True] * 4


def test_column_slices_touch_most_pages_row_slices_a_tp_th(checkpoint):
    one = pages_touched(checkpoint, 1, 0)   # 4 KiB pages
    four = pages_touched(checkpoint, 4, 1)
    assert 0.98 * one["file_pages"] <= one["pages"] <= one["file_pages"]   # all but the header
    assert four["by_dim"][0] < one["by_dim"][0] / 2      # contiguous: a quarter, plus partial edge pages
    assert four["by_dim"][1] == one["by_dim"][1]         # a piece of every short row: every page
    with pytest.raises(ValueError, match="page_size"):
        pages_touched(checkpoint, 1, 0, page_size=0)


# -- torchrun: two "nodes" on localhost --------------------------------------------------
def test_torchrun_command_rejects_bad_node_rank():
    with pytest.raises(ValueError, match=r"node_rank=2 is not valid: expected an int in \[0, 1\]"):
        torchrun_command(2, 2, 2, 1234)


@pytest.mark.timeout(200)
def test_two_torchrun_nodes_meet_and_all_reduce():
    result = launch_nodes(nnodes=2, nproc_per_node=2, timeout=180)
    assert result["returncodes"] == [0, 0], result["stderr"]
    assert len(result["lines"]) == 4
    for rank, line in enumerate(result["lines"]):
        assert line.startswith(f"RANK={rank} LOCAL_RANK={rank % 2} WORLD_SIZE=4 GROUP_RANK={rank // 2} ")
        assert line.endswith("all_reduce(rank) = 6 (expected 6)")


def test_decode_communication_time_counts_messages_not_just_bytes():
    from lessons_lib.cluster.placement import decode_comm_seconds

    links = dict(alpha_intra=2e-6, alpha_inter=8e-6, bandwidth_intra=450e9, bandwidth_inter=50e9)
    good = decode_comm_seconds(place_ranks(2, 8, 8, 2), 8192, 80, **links)
    bad = decode_comm_seconds(place_ranks(2, 8, 8, 2, order=BAD_ORDER), 8192, 80, **links)
    piece = 8192 * 2 / 8
    steps = 2 * 80 * 2 * 7            # 2 all-reduces x 80 layers x 2(t-1) ring steps
    assert good["messages"] == bad["messages"] == steps + 1
    assert good["tp_s"] == pytest.approx(steps * (2e-6 + piece / 450e9))
    assert good["pp_s"] == pytest.approx(8e-6 + piece / 50e9)
    assert bad["tp_s"] == pytest.approx(steps * (8e-6 + piece / 50e9))
    assert good["latency_s"] / good["total_s"] > 0.9      # small decode messages: latency-bound
    no_alpha = decode_comm_seconds(place_ranks(2, 8, 8, 2), 8192, 80, **{**links, "alpha_intra": 0,
                                                                         "alpha_inter": 0})
    assert no_alpha["latency_s"] == 0 and no_alpha["total_s"] < good["total_s"] / 10
    with pytest.raises(ValueError, match="bandwidth_inter"):
        decode_comm_seconds(place_ranks(2, 8, 8, 2), 8192, 80, **{**links, "bandwidth_inter": 0})
