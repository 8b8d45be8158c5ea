"""Parsing the comma lists that benchmark and evaluation options take ("1024,2048", "off,tuned")."""
from __future__ import annotations

import typer


def names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def numbers(text: str, kind: type, option: str) -> tuple:
    """A comma list of `kind` (int or float); typer.BadParameter on `option` otherwise."""
    try:
        values = tuple(kind(v) for v in names(text))
    except ValueError:
        what = {int: "integers", float: "numbers"}.get(kind, f"{kind.__name__}s")
        raise typer.BadParameter(f"give a comma list of {what}, got {text!r}", param_hint=option) from None
    if not values:
        raise typer.BadParameter("give at least one value", param_hint=option)
    return values


def ints(text: str, option: str) -> tuple[int, ...]:
    return numbers(text, int, option)
