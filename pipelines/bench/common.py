"""What every benchmark shares: a target checked on a run (`Verdict`) and how a list of them is shown."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from pipelines import tables


@dataclass
class Verdict:
    """One benchmark target, checked on a run."""

    target: str
    measured: str
    met: bool


def verdict_frame(verdicts: list[Verdict], color: bool = False) -> pd.DataFrame:
    yes, no = ("[green]yes[/]", "[red]no[/]") if color else ("yes", "no")
    return pd.DataFrame({"target": [v.target for v in verdicts], "measured": [v.measured for v in verdicts],
                         "met": [yes if v.met else no for v in verdicts]})


def verdicts_markdown(verdicts: list[Verdict]) -> str:
    return tables.markdown(verdict_frame(verdicts), {"target", "measured", "met"})


def verdicts_table(verdicts: list[Verdict], title: str):
    return tables.rich_table(verdict_frame(verdicts, color=True), title, left={"target", "measured", "met"})


def fmt(x, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)
