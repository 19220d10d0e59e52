"""The course map: every notebook, its seed question and what it teaches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Lesson:
    number: str
    stem: str
    seed: str
    title: str

    @property
    def filename(self) -> str:
        return f"{self.number}_{self.stem}.ipynb"


LESSONS = (
    Lesson("00", "welcome", "-", "Welcome: the launcher, the course map, exercises"),
    Lesson("01", "why_distribute", "Q1", "Why distribute: memory maths, the tiny LM, latency vs throughput"),
    Lesson("02", "parallel_strategies", "Q2", "Data, tensor and pipeline parallelism side by side"),
    Lesson("03", "communication", "Q3", "Collectives from send/recv, sync vs async, a measured cost model"),
    Lesson("04", "cluster_architecture", "Q4", "torchrun, rendezvous, placement, sharded loading"),
    Lesson("05", "consistency", "Q5", "Model versions across replicas and shards"),
    Lesson("06", "load_balancing", "Q6", "Router policies on a workload trace and on real workers"),
    Lesson("07", "fault_tolerance", "Q7", "Heartbeats, retries, re-dispatch: lose no request"),
    Lesson("08", "security", "Q8", "Authenticated tensors, access control, PII, tenant isolation"),
    Lesson("09", "compression", "Q9", "Pruning, quantisation, distillation, measured"),
    Lesson("10", "caching", "Q10", "Model cache, KV cache, paged blocks, prefix cache"),
    Lesson("11", "data_parallel", "code 1", "The seed's DataParallel, why it fails, the correct one"),
    Lesson("12", "tensor_parallel", "code 2", "Column-, row- and vocab-parallel layers"),
    Lesson("13", "pipeline_parallel", "code 3", "Stages, micro-batches, GPipe and 1F1B, bubbles"),
    Lesson("14", "capstone", "example", "The seed's full example fixed; the tiny LM on a TP x PP x DP mesh"),
    Lesson("15", "serving_engine", "beyond Q6/Q10",
           "Continuous batching, paged KV, chunked prefill, preemption, prefix caching"),
    Lesson("16", "speculative_decoding", "beyond", "Speculative decoding: a draft proposes, the target verifies"),
    Lesson("17", "disaggregation", "beyond Q4/Q6", "Prefill/decode disaggregation: KV shipped, interference, goodput"),
)


def course_map_markdown(from_folder: str = "notebooks") -> str:
    """A Markdown table of the course, linking each notebook that exists (relative to ``from_folder``)."""
    rows = ["| # | seed | lesson | exercises |", "|---|---|---|---|"]
    for lesson in LESSONS:
        def link(folder: str, text: str) -> str:
            if not (ROOT / folder / lesson.filename).exists():
                return "in preparation"
            prefix = "" if folder == from_folder else f"../{folder}/"
            return f"[{text}]({prefix}{lesson.filename})"
        rows.append(f"| {lesson.number} | {lesson.seed} | {link('notebooks', lesson.title)} "
                    f"| {link('exercises', 'exercises')} |")
    return "\n".join(rows)
