"""Grading adds hidden cases to every build exercise, and the course's own answers pass them.

The answers are the functions the solution notebooks define (``solution_function``), judged on
the hidden cases alone (``hidden="only"``): the solution notebooks' own check cells judge them on
the public cases whenever the notebooks run, so the public cases need not run twice. The answers
that run on ranks are judged in one test, ordered so that warm pools of ranks are reused.
"""

import pytest

from exercise_catalogue import solution_function
from lessons_lib.exercises import cases, evaluate, has_hidden_cases, labelled_cases, registered, with_hidden

pytestmark = pytest.mark.lesson00

# exercise id -> (solution notebook, the answer's name); the build exercise of every lesson
BUILD = {
    "00.mean_nll": ("00_welcome", "mean_nll"),
    "01.device_memory": ("01_why_distribute", "device_memory"),
    "02.tp_attention": ("02_parallel_strategies", "tp_attention"),
    "03.recursive_doubling": ("03_communication", "all_reduce_doubling"),
    "04.megatron_placement": ("04_cluster_architecture", "place"),
    "05.majority_repair": ("05_consistency", "repair"),
    "06.bounded_affinity": ("06_load_balancing", "bounded_affinity"),
    "07.worker_states": ("07_fault_tolerance", "worker_states"),
    "08.replay_window": ("08_security", "replay_window"),
    "09.quantize_int4": ("09_compression", "quantize_int4"),
    "10.prefix_blocks": ("10_caching", "PrefixBlocks"),
    "11.gather_rows": ("11_data_parallel", "gather_rows"),
    "12.vocab_argmax": ("12_tensor_parallel", "vocab_argmax"),
    "13.stage_loop": ("13_pipeline_parallel", "stage_loop"),
    "14.mesh_groups": ("14_capstone", "mesh_groups"),
    "15.schedule_step": ("15_serving_engine", "schedule_step"),
    "16.greedy_verify": ("16_speculative_decoding", "verify_step"),
    "17.pack_unpack": ("17_disaggregation", "KVCodec"),
}
# Build exercises whose checks start ranks, in an order that reuses warm pools (5 ranks first).
ON_RANKS = ["00.mean_nll", "02.tp_attention", "05.majority_repair", "11.gather_rows", "12.vocab_argmax",
            "13.stage_loop", "03.recursive_doubling"]

def test_every_build_exercise_has_hidden_cases():
    assert set(BUILD) <= set(registered())
    assert [e for e in BUILD if not has_hidden_cases(e)] == []


def test_the_success_message_names_hidden_cases_only_when_they_ran():
    assert with_hidden("right", [1, 2], False) == "right"
    assert with_hidden("right", [1, 2], True) == "right; and the 2 hidden grading cases"
    assert with_hidden("right", [1], "only") == "the 1 hidden grading case (the public ones not run)"
    assert cases([1, 2], [3], False) == [1, 2] and cases([1, 2], [3], True) == [1, 2, 3]
    assert labelled_cases([1], [3], "only") == [("hidden case ", 3)]


def _judge(exercise_id: str):
    result = evaluate(exercise_id, solution_function(*BUILD[exercise_id]), hidden="only")
    assert result.status == "correct", str(result)
    assert "hidden grading case" in result.message, str(result)


@pytest.mark.parametrize("exercise_id", [e for e in BUILD if e not in ON_RANKS])
def test_the_solution_passes_the_hidden_cases(exercise_id):
    _judge(exercise_id)


@pytest.mark.handouts
def test_the_solutions_on_ranks_pass_the_hidden_cases():
    assert sorted(ON_RANKS) == sorted(set(ON_RANKS) & set(BUILD))
    for exercise_id in ON_RANKS:
        _judge(exercise_id)
