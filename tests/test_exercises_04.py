"""Lesson 04's exercises: the solutions pass, stubs are not attempted, the library's own placement
and loader are refused, and each plausible wrong answer earns the hint about its mistake."""

import pytest
from safetensors import safe_open

from exercise_catalogue import assert_correct, assert_hint, assert_not_attempted, assert_refused
from lessons_lib.cluster.placement import cross_node_bytes_per_token, place_ranks
from lessons_lib.cluster.sharded_loading import load_tp_shard
from lessons_lib.exercises.lesson04 import (COST_HIDDEN, COST_LAYERS, PLACEMENT_CASES, _cost,
                                            least_cross_node_bytes, megatron_coords)

pytestmark = pytest.mark.lesson04


def _stub(*args):
    raise NotImplementedError()


# -- 04.cross_node_bytes (predict) -------------------------------------------------------------
def predicted_right():
    # Links 1->2 and 3->0 cross; each carries 2(p-1) = 6 chunks of 128/4 floats per all-reduce.
    return 2 * (6 * 32 * 4) * 2 * 3


def predicted_with_the_model():
    return cross_node_bytes_per_token(place_ranks(2, 2, 4, 1, 1), 128, 3, bytes_per_element=4)["total"]


@pytest.mark.parametrize("guess, fragments", [
    (4608, ["you predicted 4608", "carry 9216", "exactly half", "two all-reduces", "two ring links"]),
    (18432, ["exactly twice", "right neighbour"]),
    (6144, ["whole activation", "768 bytes"]),
    (2304, ["elements, not bytes"]),
    (3072, ["one layer"]),
    (1536, ["single all-reduce"]),
    (73728, ["bits"]),
    (9000, ["too low", "2 all-reduces x 3 layers"]),
])
def test_cross_node_bytes_names_the_mistake(guess, fragments):
    assert_hint("04.cross_node_bytes", lambda: guess, *fragments)


def test_cross_node_bytes_verdicts():
    assert_correct("04.cross_node_bytes", predicted_right)
    assert_not_attempted("04.cross_node_bytes", _stub)
    assert_hint("04.cross_node_bytes", predicted_with_the_model, "uses lessons_lib's own", "write it yourself")
    assert_hint("04.cross_node_bytes", lambda: None, "return one number")


# -- 04.megatron_placement (build) -------------------------------------------------------------
def place_right(nodes, devices_per_node, tp, pp, dp):
    def slot(rank):
        d, s, t = (rank // tp) % dp, rank // (tp * dp), rank % tp
        return (d * pp + s) * tp + t
    return [divmod(slot(rank), devices_per_node) for rank in range(tp * pp * dp)]


def place_in_rank_order(nodes, devices_per_node, tp, pp, dp):
    return [divmod(rank, devices_per_node) for rank in range(tp * pp * dp)]


def place_pipeline_fastest(nodes, devices_per_node, tp, pp, dp):
    def slot(rank):
        d, s, t = (rank // tp) % dp, rank // (tp * dp), rank % tp
        return (d * tp + t) * pp + s
    return [divmod(slot(rank), devices_per_node) for rank in range(tp * pp * dp)]


def place_by_nodes(nodes, devices_per_node, tp, pp, dp):
    return [divmod(rank, nodes) for rank in range(tp * pp * dp)]


def place_global_slots(nodes, devices_per_node, tp, pp, dp):
    return [(slot // devices_per_node, slot) for slot in place_right_slots(tp, pp, dp)]


def place_right_slots(tp, pp, dp):
    return [((rank // tp) % dp * pp + rank // (tp * dp)) * tp + rank % tp for rank in range(tp * pp * dp)]


def place_twice(nodes, devices_per_node, tp, pp, dp):
    # One replica's layout copied for every replica.
    return [divmod(rank % (tp * pp), devices_per_node) for rank in range(tp * pp * dp)]


def place_tp_round_robin(nodes, devices_per_node, tp, pp, dp):
    # Every TP group split evenly over the nodes, "to balance them".
    n = tp * pp * dp
    order = sorted(range(n), key=lambda r: (r % tp % nodes, r))
    devices = [None] * n
    for slot, rank in enumerate(order):
        devices[rank] = divmod(slot, devices_per_node)
    return devices


def place_with_the_library(nodes, devices_per_node, tp, pp, dp):
    course = place_ranks(nodes, devices_per_node, tp, pp, dp).devices
    return [course[((r // tp) % dp * pp + r // (tp * dp)) * tp + r % tp] for r in range(tp * pp * dp)]


@pytest.mark.parametrize("answer, fragments", [
    (place_in_rank_order, ["place(nodes=2, devices_per_node=4, tp=2, pp=2, dp=2)", "rank r on slot r",
                           "stage 0 of every replica", "dp before pp"]),
    (place_pipeline_fastest, ["tp=4, pp=2, dp=1", "TP group [0, 1, 2, 3]", "spans nodes [0, 1]"]),
    (place_by_nodes, ["rank 4 is placed on (2, 0)", "node 2 does not exist"]),
    (place_global_slots, ["devices 0..3", "restart at 0 in every node"]),
    (place_twice, ["both placed on", "GPU of its own"]),
    (place_tp_round_robin, ["TP group [0, 1]", "spans nodes"]),
    (lambda *args: {"rank 0": (0, 0)}, ["returned 1 devices", "ranks"]),
])
def test_megatron_placement_names_the_mistake(answer, fragments):
    assert_hint("04.megatron_placement", answer, *fragments)


def test_megatron_placement_verdicts():
    assert_correct("04.megatron_placement", place_right)
    assert_not_attempted("04.megatron_placement", _stub)
    assert_refused("04.megatron_placement", place_with_the_library, "place_ranks")


def _node_assignments(nodes, per_node, units, unit_size):
    """Every way to put ``units`` groups of ``unit_size`` ranks on nodes, up to order inside a node."""
    capacity = per_node // unit_size

    def fill(i, counts, assignment):
        if i == units:
            yield tuple(assignment)
            return
        for node in range(nodes):
            if counts[node] < capacity:
                counts[node] += 1
                yield from fill(i + 1, counts, assignment + [node])
                counts[node] -= 1
    yield from fill(0, [0] * nodes, [])


@pytest.mark.parametrize("case", PLACEMENT_CASES, ids=str)
def test_the_placement_checker_knows_the_true_optimum(case):
    """No assignment of ranks to nodes beats the checker's best (TP groups kept whole where the
    node size allows, as the checker demands)."""
    nodes, per_node, tp, pp, dp = case
    n = tp * pp * dp
    unit = tp if per_node % tp == 0 else 1
    best = least_cross_node_bytes(*case)["total"]
    lowest = float("inf")
    for assignment in _node_assignments(nodes, per_node, n // unit, unit):
        used = [0] * nodes
        devices = []
        for rank in range(n):   # Megatron rank -> its unit -> that unit's node
            node = assignment[rank // unit]
            devices.append((node, used[node]))
            used[node] += 1
        lowest = min(lowest, _cost(devices, *case)["total"])
    assert best == lowest


def test_megatron_numbering_matches_megatron_order():
    # tp fastest, then dp, then pp: ranks 0..tp-1 are one TP group, the next tp the next replica.
    assert [megatron_coords(r, 2, 2, 2) for r in range(8)] == [
        (0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1), (0, 1, 0), (0, 1, 1), (1, 1, 0), (1, 1, 1)]
    assert COST_LAYERS % 3 == 0 and COST_HIDDEN > 0


# -- 04.shard_loader (stretch) -----------------------------------------------------------------
ROW_PARALLEL = ("o_proj.weight", "down_proj.weight")


def loader_given(path, tp, tp_rank):
    state, read = {}, 0
    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            view = f.get_slice(name)
            shape = view.get_shape()
            if "norm" in name:
                tensor = view[:]
            else:
                per = shape[0] // tp
                tensor = view[tp_rank * per:(tp_rank + 1) * per]
            state[name] = tensor
            read += tensor.numel()
    return state, read


def _loader(path, tp, tp_rank, *, count_elements=False,
            refuse_uneven=True, split_norms=False, columns_for_column_parallel=False):
    state, read = {}, 0
    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            view = f.get_slice(name)
            shape = view.get_shape()
            if "norm" in name and not split_norms:
                tensor = view[:]
            else:
                row_parallel = name.endswith(ROW_PARALLEL)
                dim = 1 if row_parallel else 0
                if columns_for_column_parallel and not row_parallel and "proj" in name:
                    dim = 1
                if refuse_uneven and shape[dim] % tp:
                    raise ValueError(f"tp={tp} does not divide dimension {dim} of {name} {shape}")
                per = shape[dim] // tp
                part = slice(tp_rank * per, (tp_rank + 1) * per)
                tensor = view[part] if dim == 0 else view[:, part]
            state[name] = tensor
            read += tensor.numel() * (1 if count_elements else tensor.element_size())
    return state, read


def loader_right(path, tp, tp_rank):
    return _loader(path, tp, tp_rank)


def loader_counting_elements(path, tp, tp_rank):
    return _loader(path, tp, tp_rank, count_elements=True)


def loader_dropping_rows(path, tp, tp_rank):
    return _loader(path, tp, tp_rank, refuse_uneven=False)


def loader_splitting_norms(path, tp, tp_rank):
    return _loader(path, tp, tp_rank, split_norms=True)


def loader_columns_for_q(path, tp, tp_rank):
    return _loader(path, tp, tp_rank, columns_for_column_parallel=True)


def loader_with_a_vague_error(path, tp, tp_rank):
    if tp == 5:
        raise ValueError("bad tp")
    return _loader(path, tp, tp_rank)


def _defined_in_a_notebook(source: str, name: str):
    """A function as a notebook cell defines it: its module cannot be imported, so it reaches
    the ranks by value, with its globals."""
    scope = {"__name__": "__notebook_cell__"}
    exec(compile(source, "<cell>", "exec"), scope)
    return scope[name]


LOADER_WITH_SAFE_OPEN_ALONE = _defined_in_a_notebook("""
from safetensors import safe_open

def load_shard(path, tp, tp_rank):
    with safe_open(path, framework="pt") as f:
        return {name: f.get_slice(name)[:] for name in f.keys()}, 0
""", "load_shard")


def loader_from_the_library(path, tp, tp_rank):
    return load_tp_shard(path, tp, tp_rank)


@pytest.mark.parametrize("answer, fragments", [
    (loader_given, ["tp=3", "rank 0's layers.0.attn.o_proj.weight holds rows 0:4, expected columns 0:4",
                    "row-parallel"]),
    (loader_counting_elements, ["tp=3", "counts elements"]),
    (loader_dropping_rows, ["tp=5", "returned shards instead of refusing", "1 row belongs to no rank",
                            "floor split"]),
    (loader_splitting_norms, ["attn_norm.weight holds rows 0:4", "replicate"]),
    (loader_columns_for_q, ["q_proj.weight holds columns 0:4, expected rows 0:4", "output rows"]),
    (loader_with_a_vague_error, ["'bad tp'", "name the tensor"]),
])
def test_shard_loader_names_the_mistake(answer, fragments):
    assert_hint("04.shard_loader", answer, *fragments)


def test_shard_loader_verdicts():
    assert_correct("04.shard_loader", loader_right)
    assert_not_attempted("04.shard_loader", _stub)
    assert_refused("04.shard_loader", loader_from_the_library, "load_tp_shard")


def test_safe_open_sent_by_value_is_explained():
    # Last: the error ends on the ranks, so the next check would wait for fresh ones.
    assert_hint("04.shard_loader", LOADER_WITH_SAFE_OPEN_ALONE, "raised AttributeError",
                "import safetensors")
