"""Write a class's verdicts: ``grades.csv`` (one row per student) and ``grades.md`` (the same
table, then each student's hints for what was not correct)."""

from __future__ import annotations

import csv
from pathlib import Path

from .classroom import POINTS, Verdict

MARKS = {"correct": "✅", "incorrect": "❌", "not attempted": "⬜", "error": "⚠️"}


def table(verdicts: list[Verdict]) -> tuple[list[str], dict[str, dict[str, Verdict]]]:
    """Exercise ids in course order, and ``{student: {exercise id: verdict}}``."""
    exercises, rows = [], {}
    for v in verdicts:
        if v.exercise not in exercises:
            exercises.append(v.exercise)
        rows.setdefault(v.student, {})[v.exercise] = v
    return exercises, rows


def write_csv(verdicts: list[Verdict], path: Path) -> None:
    exercises, rows = table(verdicts)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["student", *exercises, "points", "max_points"])
        for student, row in rows.items():
            out.writerow([student, *(row[e].status for e in exercises),
                          sum(v.points for v in row.values()), POINTS * len(exercises)])


def write_markdown(verdicts: list[Verdict], path: Path) -> None:
    exercises, rows = table(verdicts)
    most = POINTS * len(exercises)
    lines = ["# Grades", "",
             f"{len(rows)} students, {len(exercises)} exercises, {POINTS} point each. "
             + " ".join(f"{m} {s}" for s, m in MARKS.items()), "",
             "| student | " + " | ".join(f"`{e}`" for e in exercises) + " | points |",
             "|---|" + "---|" * len(exercises) + "---:|"]
    for student, row in rows.items():
        total = sum(v.points for v in row.values())
        lines.append(f"| {student} | " + " | ".join(MARKS[row[e].status] for e in exercises)
                     + f" | {total} / {most} |")
    lines += ["", "## What was not correct", ""]
    if all(v.status == "correct" for v in verdicts):
        lines.append("Nothing: every answer is correct.")
    for student, row in rows.items():
        wrong = [v for v in row.values() if v.status != "correct"]
        if wrong:
            lines.append(f"### {student}")
            lines += [f"- `{v.exercise}` {v.status}: {v.message}".replace("\n", " ") for v in wrong]
            lines.append("")
    path.write_text("\n".join(lines).rstrip() + "\n")


def write(verdicts: list[Verdict], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "grades.csv", out_dir / "grades.md"
    write_csv(verdicts, csv_path)
    write_markdown(verdicts, md_path)
    return csv_path, md_path
