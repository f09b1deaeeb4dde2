"""The end-of-stage summary table every stage and the reward trainer print (main process only)."""

from __future__ import annotations

from typing import Any


def print_summary(title: str, summary: dict[str, Any]) -> None:
    """The end-of-stage table (main process only)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in summary.items():
        if isinstance(value, float):
            text = "n/a" if value != value else f"{value:.4g}"  # NaN: nothing the reward could judge
        else:
            text = str(value)
        table.add_row(key, text)
    Console().print(table)
