"""Tables that stay readable at 80 columns, the width of CI logs and pipes: ids are printed whole, never cut to
``suppor…``, and the least important columns are left out (and named) when the console is too narrow.

Entry point: :func:`print_table` (columns as :class:`Col`); :func:`fit_table` builds the table without printing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table


@dataclass(frozen=True)
class Col:
    """One column. ``drop``: 0 keeps it at any width; otherwise columns go in increasing ``drop`` order (1 first)
    while the table does not fit. ``whole``: an id, a ref or an alias, printed on one line, never cut. ``want``:
    the width the column keeps (up to its widest cell) before a droppable column is left out."""

    header: str
    drop: int = 0
    whole: bool = False
    want: int = 0
    justify: str = "left"


def _build(
    title: str | None, cols: Sequence[Col], rows: Sequence[Sequence[Any]], keep: list[int], caption: str | None
) -> Table:
    t = Table(title=title, caption=caption, caption_justify="left")
    for i in keep:
        c = cols[i]
        # fold: a long word (a path, a digest) wraps onto the next line instead of ending in "…"
        t.add_column(c.header, no_wrap=c.whole, overflow="fold", justify=c.justify)  # type: ignore[arg-type]
    for row in rows:
        t.add_row(*[row[i] for i in keep])
    return t


def _min_width(console: Console, cols: Sequence[Col], rows: Sequence[Sequence[Any]], keep: list[int]) -> int:
    """The narrowest the table can be: ``whole`` columns at their widest cell, the others at their longest word."""
    widths = []
    for i in keep:
        cells = [cols[i].header, *(row[i] for row in rows)]
        m = [
            Measurement.get(console, console.options, console.render_str(c) if isinstance(c, str) else c) for c in cells
        ]
        widest = max(x.maximum for x in m)
        widths.append(widest if cols[i].whole else max(max(x.minimum for x in m), min(cols[i].want, widest)))
    return sum(widths) + (len(keep) + 1) + 2 * len(keep)  # the box's vertical lines + one space of padding each side


def fits_unwrapped(console: Console, cols: Sequence[Col], rows: Sequence[Sequence[Any]]) -> bool:
    """Whether every cell fits on one line at ``console.width``."""
    whole = [Col(c.header, whole=True) for c in cols]
    return _min_width(console, whole, rows, list(range(len(cols)))) <= console.width


def fit_table(
    console: Console, title: str | None, cols: Sequence[Col], rows: Sequence[Sequence[Any]], caption: str | None = None
) -> tuple[Table, list[str]]:
    """The table at ``console.width`` and the headers of the columns left out to get there."""
    keep = list(range(len(cols)))
    left_out: list[str] = []
    droppable = sorted((c.drop, i) for i, c in enumerate(cols) if c.drop > 0)
    while droppable and _min_width(console, cols, rows, keep) > console.width:
        _, i = droppable.pop(0)
        keep.remove(i)
        left_out.append(cols[i].header)
    return _build(title, cols, rows, keep, caption), left_out


def print_table(
    console: Console,
    title: str | None,
    cols: Sequence[Col],
    rows: Sequence[Sequence[Any]],
    *,
    caption: str | None = None,
    more: str = "--json",
) -> None:
    """Print the fitted table; when columns were left out, one line names them and ``more`` (what shows them)."""
    table, left_out = fit_table(console, title, cols, rows, caption)
    console.print(table)
    if left_out:
        console.print(
            f"[dim]not shown at {console.width} columns: {', '.join(left_out)}; {more} shows them[/]", highlight=False
        )
