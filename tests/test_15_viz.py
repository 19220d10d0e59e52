"""Lesson 15's widget: the recorded run is the engine's own state, step by step, and the slider draws it."""

import pytest
import torch

from lessons_lib.engine import LLMEngine, SamplingParams
from lessons_lib.model import generate
from lessons_lib.validate import BadArgument
from lessons_lib.viz.engine import CACHED, FREE, engine_widget, record_run, step_summary
from models import tiny_lm

pytestmark = pytest.mark.lesson15

SYSTEM = list(range(1, 17))                  # two full blocks of 8, shared by every request


@pytest.fixture(scope="module")
def model():
    return tiny_lm()


@pytest.fixture(scope="module")
def run(model):
    arrivals = [(2 * i, f"r{i}", SYSTEM + [40 + i, 50 + i, 60 + i], SamplingParams(max_tokens=3 + i))
                for i in range(4)]
    engine = LLMEngine(model, block_size=8, num_blocks=12, max_num_seqs=2, max_num_batched_tokens=16)
    return arrivals, engine, record_run(engine, arrivals)


def test_every_step_is_recorded_until_all_finish(run):
    arrivals, engine, snaps = run
    assert [s["step"] for s in snaps] == list(range(len(snaps)))
    finished = [rid for s in snaps for rid in s["finished"]]
    assert sorted(finished) == [a[1] for a in arrivals]
    assert not snaps[-1]["running"] and not snaps[-1]["waiting"]
    assert snaps[-1]["num_free_blocks"] == engine.num_blocks, "blocks leaked"


def test_snapshots_agree_with_the_block_tables(run):
    _, engine, snaps = run
    for s in snaps:
        held = {b for table in s["tables"].values() for b in table}
        assert s["num_blocks"] - s["num_free_blocks"] == len(held)
        for block, (holders, state) in enumerate(zip(s["holders"], s["state"])):
            assert (block in held) == bool(holders) == (state not in (FREE, CACHED))
            assert all(block in s["tables"][rid] for rid in holders)
        assert sum(n for _, n in s["scheduled"]) <= engine.max_num_batched_tokens
        assert len(s["running"]) <= engine.max_num_seqs


def test_the_shared_prefix_is_held_by_two_requests_then_cached(run):
    _, _, snaps = run
    assert any(len(h) == 2 for s in snaps for h in s["holders"]), "the system prompt's blocks were never shared"
    assert snaps[-1]["state"].count(CACHED) >= 2      # the system prompt stays cached when all finished


def test_recording_does_not_change_what_the_engine_serves(model):
    arrivals = [(0, "a", [5, 6, 7, 8, 9], SamplingParams(max_tokens=4)),
                (1, "b", [9, 8, 7], SamplingParams(max_tokens=2))]
    engine = LLMEngine(model, block_size=4, num_blocks=8, max_num_seqs=2)
    outputs = {}
    original_step = engine.step

    def step():
        out = original_step()
        outputs.update({o.request_id: o.output_token_ids for o in out if o.finished})
        return out

    engine.step = step
    record_run(engine, arrivals)
    for _, rid, prompt, params in arrivals:
        alone = generate(model, torch.tensor([prompt]), params.max_tokens)[0, len(prompt):].tolist()
        assert outputs[rid] == alone


def test_summary_and_bad_input(run, model):
    _, _, snaps = run
    text = step_summary(snaps[0])
    assert text.startswith("step 0: ran r0:16 (16 tokens)") and "waiting" in text
    engine = LLMEngine(model, block_size=8, num_blocks=12, max_num_seqs=2)
    with pytest.raises(BadArgument, match="arrivals"):
        record_run(engine, "r0")
    with pytest.raises(BadArgument, match=r"arrivals\[0\]"):
        record_run(engine, [(0, "r0")])
    with pytest.raises(BadArgument, match="engine"):
        record_run(model, [])
    with pytest.raises(BadArgument, match="snapshots"):
        engine_widget([])


def test_widget_slider_redraws_the_chosen_step(run):
    import matplotlib
    matplotlib.use("Agg")
    _, _, snaps = run
    box = engine_widget(snaps)
    assert box.data is snaps[0]
    box.controls["step"].value = 3
    assert box.data is snaps[3] and box.controls["step"].max == len(snaps) - 1
    assert box.text == step_summary(snaps[3])


def test_static_slots_pad_each_batch_to_its_longest_request():
    from lessons_lib.viz.engine import PAD, static_slots
    grid = static_slots([3, 1, 2, 2, 4], 2)
    assert len(grid) == 2 and len(grid[0]) == 3 + 2 + 4
    assert grid[0][:3] == [0, 0, 0] and grid[1][:3] == [1, PAD, PAD]
    assert grid[0][5:] == [4, 4, 4, 4] and grid[1][5:] == [None] * 4     # the last batch has one request
    assert sum(row.count(PAD) for row in grid) == 2
    with pytest.raises(BadArgument, match="output_lengths"):
        static_slots([], 2)


def test_continuous_slots_follow_the_recorded_steps(run):
    from lessons_lib.viz.engine import continuous_slots
    _, engine, snaps = run
    grid = continuous_slots(snaps, engine.max_num_seqs)
    for t, s in enumerate(snaps):
        assert sorted(row[t] for row in grid if row[t] is not None) == \
            sorted(s["request_ids"].index(rid) for rid, _ in s["scheduled"])
    with pytest.raises(ValueError, match="more than num_slots=1"):
        continuous_slots(snaps, 1)
