"""What every benchmark shares: a target checked on a run (`Verdict`) and how a list of them is shown."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipelines import tables


class ConfigError(ValueError):
    """A bad benchmark setting; `field` names the config field (the CLI turns it into an option name)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


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


def write_report(out: Path, stem: str, rows: list[dict], markdown: str, record: dict) -> dict[str, Path]:
    """A benchmark's files: <stem>.csv (its rows), .md (its tables and notes) and .json (`record`: config,
    machine, raw samples)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"{stem}.{k}" for k in ("csv", "md", "json")}
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    paths["md"].write_text(markdown + "\n")
    paths["json"].write_text(json.dumps(record, indent=1))
    return paths
