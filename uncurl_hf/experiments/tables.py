"""Plain-text tables for the experiments and benchmarks (one formatter, so every printed table looks alike)."""

from __future__ import annotations


def text_table(rows: list[list[str]], left: int = 3) -> str:
    """Header + rule + rows; the first ``left`` columns left-aligned (names), the rest right-aligned (numbers)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    text = ["  ".join(v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
            for row in rows]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)
