"""Tables as people read them, from one pandas DataFrame of display strings: GitHub markdown (pandas'
to_markdown), plain text for logs, and a rich table for the terminal. Every report writer goes through
these, so a column looks the same in the terminal, the README and an MLflow artifact."""
from __future__ import annotations

import pandas as pd
from rich.table import Table


def _aligns(df: pd.DataFrame, left: set[str] | None) -> list[str]:
    left = set(df.columns[:1]) if left is None else left
    return ["left" if c in left else "right" for c in df.columns]


def markdown(df: pd.DataFrame, left: set[str] | None = None) -> str:
    """A GitHub markdown table; `left` names the left-aligned columns (default: the first)."""
    cells = df.astype(str).map(lambda s: s.replace("|", "\\|"))
    return cells.to_markdown(index=False, colalign=_aligns(df, left), disable_numparse=True)


def text(df: pd.DataFrame, left: set[str] | None = None) -> str:
    """A fixed-width plain-text table (for logs and `--format table`), aligned as `markdown`."""
    return df.astype(str).to_markdown(index=False, tablefmt="simple", colalign=_aligns(df, left),
                                      disable_numparse=True)


def rich_table(df: pd.DataFrame, title: str | None = None, caption: str | None = None,
               left: set[str] | None = None, sections: list[int] | None = None) -> Table:
    """A rich table of the same cells; `sections`: row indices after which a rule is drawn."""
    table = Table(title=title, caption=caption)
    for c, align in zip(df.columns, _aligns(df, left)):
        table.add_column(str(c), justify=align)
    ends = set(sections or ())
    for i, row in enumerate(df.astype(str).itertuples(index=False)):
        table.add_row(*row, end_section=i in ends)
    return table
