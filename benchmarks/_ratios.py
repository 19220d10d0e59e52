"""The table every benchmark prints: a measurement per row, its baseline and new value, their ratio."""


def print_ratios(rows, new_label: str, footer: str, ratio_digits: int = 2) -> None:
    """``rows`` of ``(measurement, baseline text, new text, ratio)``; ``footer`` says how they were measured."""
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'baseline':>9}  {new_label:>9}  {'ratio':>6}")
    for name, a, b, ratio in rows:
        print(f"{name:<{width}}  {a:>9}  {b:>9}  {ratio:>{ratio_digits + 3}.{ratio_digits}f}x")
    print(footer)
