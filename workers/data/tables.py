"""Classification tasks from the user's own tables: CSV, JSONL, Parquet (pyarrow), or a folder saved by
Hugging Face `datasets` (`save_to_disk`), with a text and a label column.

Splits come from separate files (`train`, `validation`, `test`), from a `split` column of one table,
or from the folders of a saved DatasetDict; a split that is not given is carved out of the training
rows (10% each, after a seeded shuffle), so every task has train/validation/test.
"""
from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa

from workers.data.datasets import SPLIT_FRACTIONS, Example, TaskData

SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation",
               "dev": "validation", "test": "test"}


def read_table(path: str | Path) -> dict[str, pa.Table]:
    """The table(s) at `path` by split name: {"all": table} for a file or a saved Dataset, one entry per
    split for a saved DatasetDict."""
    path = Path(path)
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        saved = load_from_disk(str(path))
        parts = saved.items() if isinstance(saved, DatasetDict) else [("all", saved)]
        return {name: ds.with_format("arrow")[:] for name, ds in parts}
    suffix = path.suffix.lower()
    if suffix == ".csv":
        from pyarrow import csv
        return {"all": csv.read_csv(path)}
    if suffix == ".jsonl":
        from pyarrow import json as pa_json
        return {"all": pa_json.read_json(path)}
    if suffix == ".parquet":
        from pyarrow import parquet
        return {"all": parquet.read_table(path)}
    raise ValueError(f"unsupported table {path}: valid are .csv, .jsonl, .parquet files or a saved dataset folder")


def _column(table: pa.Table, name: str, role: str, source: str) -> list:
    if name not in table.column_names:
        raise ValueError(f"{source}: no {role} column {name!r}; its columns: {', '.join(table.column_names)} "
                         f"(set the dataset's `{role}` field)")
    return table.column(name).to_pylist()


def _rows(table: pa.Table, ref: dict, source: str) -> list[tuple[str, object]]:
    texts = _column(table, ref["text"], "text", source)
    labels = _column(table, ref["label"], "label", source)
    rows = [(t, y) for t, y in zip(texts, labels) if t is not None and y is not None]
    if any(not isinstance(t, str) for t, _ in rows):
        raise ValueError(f"{source}: text column {ref['text']!r} must hold strings")
    return rows


def _label_names(rows: list[tuple[str, object]]) -> list[str]:
    values = {y for _, y in rows}
    if all(isinstance(v, (int, bool)) for v in values):
        return [str(v) for v in sorted(values)]
    return sorted(str(v) for v in values)


def load_table_task(ref: dict, seed: int = 0, max_examples: int | None = None) -> TaskData:
    """A TaskData from a dataset reference of the sweep spec (`DatasetSpec.reference()`: name, path or
    train/validation/test, text, label, split). Labels are the column's distinct values (sorted; numbers
    numerically) as names; the seeded shuffle and cut mirror the built-in tasks."""
    splits: dict[str, list] = {}
    if ref.get("path"):
        for part, table in read_table(ref["path"]).items():
            source = ref["path"] if part == "all" else f"{ref['path']} [{part}]"
            if ref.get("split"):
                names = _column(table, ref["split"], "split", source)
                for row, split in zip(_rows(table, ref, source), names):
                    if str(split).lower() not in SPLIT_NAMES:
                        raise ValueError(f"{source}: split value {split!r} in column {ref['split']!r}; valid: "
                                         f"{', '.join(SPLIT_NAMES)}")
                    splits.setdefault(SPLIT_NAMES[str(split).lower()], []).append(row)
            else:
                key = "train" if part == "all" else SPLIT_NAMES.get(part.lower(), part)
                splits.setdefault(key, []).extend(_rows(table, ref, source))
    else:
        for key in ("train", "validation", "test"):
            if ref.get(key):
                (table,) = read_table(ref[key]).values()
                splits[key] = _rows(table, ref, ref[key])
    if not splits.get("train"):
        raise ValueError(f"dataset {ref.get('name')!r}: no training rows")
    names = _label_names([r for rows in splits.values() for r in rows])
    index = {name: i for i, name in enumerate(names)}
    examples = {k: [Example(t, index[str(y)]) for t, y in rows] for k, rows in splits.items()}

    rng = random.Random(seed)
    for rows in examples.values():
        rng.shuffle(rows)
    train = examples["train"]
    if max_examples is not None:
        train = train[:max_examples]
    n_cut = int(len(train) * SPLIT_FRACTIONS[1])
    for key in ("validation", "test"):   # missing splits come out of the training rows
        if key not in examples:
            examples[key], train = train[:n_cut], train[n_cut:]
    if not examples["validation"] or not examples["test"] or not train:
        raise ValueError(f"dataset {ref.get('name')!r}: too few rows to split ({len(examples['train'])} "
                         "training rows); give validation and test files or more rows")
    return TaskData(ref.get("name") or "table", names, train, examples["validation"], examples["test"])
