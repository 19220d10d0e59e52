"""The per-step time budget: its parts add up, each part follows its formula, the widget draws it."""

import pytest

from lessons_lib.sizing import (H100_SXM_HBM_BYTES_PER_S, INFINIBAND_NDR, LAYOUTS, LLAMA2_7B, LLAMA2_70B, NVLINK4,
                                PARTS, Layout, Link, budget_table, dp_against_tp, kv_cache_bytes, laptop_link,
                                loopback_alpha_beta, step_budget, weight_bytes)

pytestmark = pytest.mark.lesson01
TP8, TP4_PP2, TP16 = LAYOUTS


def test_links_carry_the_published_figures():
    assert NVLINK4.bytes_per_s == 450e9 and INFINIBAND_NDR.bytes_per_s == 50e9
    assert NVLINK4.all_reduce_s(1e6, 1) == 0
    # ring: base + 2(p-1) steps + 2(p-1)/p of the bytes
    assert NVLINK4.all_reduce_s(8e6, 8) == pytest.approx(6.6e-6 + 14 * 0.6e-6 + 14 / 8 * 8e6 / 450e9)
    assert INFINIBAND_NDR.send_s(0) == pytest.approx(6.6e-6 + 2.7e-6)


def test_tp8_decode_is_the_weight_floor_plus_160_all_reduces():
    b = step_budget(LLAMA2_70B, TP8, phase="decode", batch=1, context=4096)
    assert sum(b[p] for p in PARTS) == pytest.approx(b["total"])
    assert b["weights"] == pytest.approx(weight_bytes(LLAMA2_70B) / 8 / H100_SXM_HBM_BYTES_PER_S)
    # 8 KV heads on 8 GPUs: one head each
    assert b["kv_cache"] == pytest.approx(kv_cache_bytes(LLAMA2_70B, 1, 4096) / 8 / H100_SXM_HBM_BYTES_PER_S)
    assert b["tp_all_reduce"] == pytest.approx(160 * NVLINK4.all_reduce_s(8192 * 2, 8))
    assert b["compute"] == 0 and b["pp_hops"] == 0 and b["pp_bubble"] == 0


def test_a_pipeline_of_one_batch_pays_its_other_stages_as_bubble():
    tp8 = step_budget(LLAMA2_70B, TP8, phase="decode")
    pp = step_budget(LLAMA2_70B, TP4_PP2, phase="decode")
    assert pp["weights"] == pytest.approx(tp8["weights"])     # one stage: W / (4 x 2), as TP8 reads
    assert pp["pp_bubble"] == pytest.approx(pp["weights"] + pp["kv_cache"] + pp["tp_all_reduce"])
    assert pp["pp_hops"] == pytest.approx(NVLINK4.send_s(8192 * 2))
    assert pp["total"] > tp8["total"]
    # more micro-batches shrink the prefill bubble (each stage's slice of the work is smaller)
    one = step_budget(LLAMA2_70B, TP4_PP2, phase="prefill", batch=4, context=512)
    four = step_budget(LLAMA2_70B, TP4_PP2, phase="prefill", batch=4, context=512, micro_batches=4)
    assert four["pp_bubble"] < one["pp_bubble"] / 3


def test_two_node_tp16_is_slower_than_one_node_tp8_and_prefill_is_compute_bound():
    rows = budget_table(LLAMA2_70B, batch=1)
    tp8, _, tp16 = rows
    assert tp16["tpot"]["weights"] == pytest.approx(tp8["tpot"]["weights"] / 2)
    assert tp16["tpot"]["total"] > tp8["tpot"]["total"]
    assert tp8["ttft"]["compute"] > 0 and tp8["tpot"]["compute"] == 0
    assert tp8["tokens_per_s_per_gpu"] == pytest.approx(1 / tp8["tpot"]["total"] / 8)


def test_bad_layouts_and_arguments_are_refused():
    with pytest.raises(ValueError, match="tp"):
        step_budget(LLAMA2_70B, Layout("TP3", 3))
    with pytest.raises(ValueError, match="micro_batches"):
        step_budget(LLAMA2_70B, TP4_PP2, batch=2, micro_batches=3)
    with pytest.raises(ValueError, match="phase"):
        step_budget(LLAMA2_70B, TP8, phase="train")
    with pytest.raises(ValueError, match="bytes_per_s"):
        Link("broken", 0, 1e-6)
    with pytest.raises(ValueError, match="tp_link"):
        Layout("TP2", 2, 1, "nvlink")


def test_this_machine_fits_a_link_quickly():
    alpha, beta = loopback_alpha_beta(sizes=(1 << 10, 1 << 16), repeats=2)
    assert alpha >= 0 and beta > 0
    link = laptop_link(alpha, beta)
    assert link.bytes_per_s == pytest.approx(1 / beta)
    with pytest.raises(ValueError, match="sizes"):
        loopback_alpha_beta(sizes=(64, 64))


def test_the_calculator_draws_and_refuses_without_losing_its_picture():
    from lessons_lib.viz.budget import BudgetCalculator, budget_report

    report = budget_report(batch=2)
    assert [r["gpus"] for r in report["rows"]] == [8, 8, 16]
    calc = BudgetCalculator()
    calc.controls["micro_batches"].value = 4              # more micro-batches than the batch of 1
    assert "micro_batches" in calc.error and "micro_batches" in calc.caption.value
    assert calc.data["micro_batches"] == 1                  # the last good report stays
    bundle = calc._repr_mimebundle_()                         # the picture drawn once, reused
    assert "image/png" in bundle and "time-budget calculator" in bundle["text/plain"]


def test_tp_beats_dp_per_device_on_nvlink_and_loses_on_a_slow_link():
    slow = laptop_link(3e-4, 1e-9)                        # gloo between processes, roughly
    for batch in (2, 16, 64):
        fast = dp_against_tp(LLAMA2_7B, 2, batch)
        # memory-bound: TP reads each weight once for the whole batch, DP once per half-batch
        assert fast["tp"] > fast["dp"] and fast["tp_step_s"] < fast["dp_step_s"]
        assert dp_against_tp(LLAMA2_7B, 2, batch, link=slow)["tp"] < fast["dp"]
    with pytest.raises(ValueError, match="batch"):
        dp_against_tp(LLAMA2_7B, 2, 3)
