"""Markdown tables, the one helper that :mod:`kd_tune.report.report` and :mod:`kd_tune.report.best_alpha` share: a leaf
(pandas only), so neither of them imports the other back."""

from __future__ import annotations

import pandas as pd


def markdown_table(df: pd.DataFrame) -> str:
    cells = [[str(c) for c in df.columns]] + [[str(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    lines.insert(1, "| " + " | ".join("---" for _ in df.columns) + " |")
    return "\n".join(lines)
