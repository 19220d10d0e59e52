"""The sharding view: layouts computed from the same functions the parallel code runs, and the widget."""

import matplotlib
import pytest

from lessons_lib.model import ModelConfig
from lessons_lib.viz.sharding import STRATEGIES, ShardingWidget, draw_layout, sharding_layout

matplotlib.use("Agg")
pytestmark = pytest.mark.lesson02


def _by_name(layout):
    return {t.name: t for t in layout["tensors"]}


def test_dp_replicates_every_weight_and_splits_the_batch_unevenly():
    layout = sharding_layout("dp", 3, ModelConfig(), batch=10)
    assert all(t.fraction_held(r) == 1.0 for t in layout["tensors"] for r in range(3))
    assert layout["batch"].pieces == (((0, 4),), ((4, 7),), ((7, 10),))


def test_dp_with_fewer_rows_than_ranks_leaves_a_rank_empty():
    assert sharding_layout("dp", 3, batch=2)["batch"].pieces == (((0, 1),), ((1, 2),), ())


def test_tp_follows_the_plan_and_replicates_kv_heads_at_tp4():
    tensors = _by_name(sharding_layout("tp", 4, ModelConfig(), batch=2))
    assert tensors["attn.q_proj"].pieces == (((0, 32),), ((32, 64),), ((64, 96),), ((96, 128),))
    assert tensors["attn.k_proj"].pieces == (((0, 32),), ((0, 32),), ((32, 64),), ((32, 64),))
    assert tensors["attn.o_proj"].dim == "cols" and tensors["mlp.down_proj"].dim == "cols"
    assert tensors["embed"].fraction_held(3) == 0.25


def test_tp_column_and_row_split_the_same_weight_on_different_sides():
    col = _by_name(sharding_layout("tp-column", 2))["mlp.up_proj"]
    row = _by_name(sharding_layout("tp-row", 2))["mlp.up_proj"]
    assert (col.dim, col.pieces[1]) == ("rows", ((192, 384),))
    assert (row.dim, row.pieces[1]) == ("cols", ((64, 128),))


def test_pp_gives_each_rank_whole_layers():
    layout = sharding_layout("pp", 2, ModelConfig(n_layers=5))
    assert layout["layers"] == [[0, 1, 2], [3, 4]]
    tensors = _by_name(layout)
    assert tensors["embed"].pieces == (((0, 1),), ())
    assert tensors["layers.3"].pieces == ((), ((0, 1),))
    assert tensors["lm_head"].pieces == ((), ((0, 1),))


@pytest.mark.parametrize("args, words", [
    (("tp", 3), "tp=3 does not divide n_heads=4: choose tp among 1, 2 or 4"),
    (("zp", 2), "strategy='zp' is not valid: expected one of 'dp', 'tp'"),
    (("dp", 0), "world_size=0 is not valid: expected an int >= 1"),
])
def test_bad_inputs_name_the_parameter(args, words):
    with pytest.raises(ValueError, match=words):
        sharding_layout(*args)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_draws_one_bar_per_tensor_and_the_batch(strategy):
    layout = sharding_layout(strategy, 2)
    fig = draw_layout(layout)
    assert len(fig.axes[0].texts) == len(layout["tensors"]) + 1
    matplotlib.pyplot.close(fig)


def test_widget_callbacks_redraw_from_the_new_values():
    ui = ShardingWidget(ModelConfig(), batch=8, strategy="dp", world_size=2)
    assert ui.data["strategy"] == "dp" and ui.data["batch"].pieces[1] == ((4, 8),)
    ui.controls["world_size"].value = 4
    assert ui.data["world_size"] == 4 and ui.data["batch"].pieces[3] == ((6, 8),)
    ui.controls["strategy"].value = "tp"
    assert _by_name(ui.data)["attn.k_proj"].pieces[1] == ((0, 32),)
    ui.controls["world_size"].value = 3   # refused: the last layout stays, the reason is shown
    assert ui.data["world_size"] == 4 and "n_heads=4" in ui.error and "n_heads=4" in ui.caption.value
    ui.controls["strategy"].value = "dp"
    assert ui.error is None and ui.data["world_size"] == 3
