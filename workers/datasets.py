"""Offline task data. The built-in tasks are BIG-bench tasks read from the bigbench sdist tarball
(`make assets` downloads it; installing bigbench would pull tensorflow): only the task.json files used
are extracted, once, into the cache."""
from __future__ import annotations

import json
import os
import random
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from workers.assets import cache_dir

BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
_TASKS_IN_SDIST = "bigbench-1.0.0/bigbench/benchmark_tasks"


@dataclass(frozen=True)
class Example:
    text: str
    label: int


@dataclass(frozen=True)
class TaskData:
    """A classification task with fixed, seeded train/validation/test splits (80/10/10)."""

    name: str
    label_names: list[str]
    train: list[Example] = field(repr=False)
    validation: list[Example] = field(repr=False)
    test: list[Example] = field(repr=False)
    kind: str = "classification"

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass(frozen=True)
class BigBenchTask:
    path: str                     # task folder inside benchmark_tasks/
    labels: tuple[str, ...]       # label order (index = class id); target_scores keys
    keep: tuple[str, ...] | None = None   # drop examples whose label is not listed


TASKS: dict[str, BigBenchTask] = {
    # English hotel/medicine/... reviews (the paper's SST-2 stand-in is the binary variant).
    "multiemo": BigBenchTask("multiemo/all_text_en", ("negative", "neutral", "positive", "ambivalent")),
    "multiemo-binary": BigBenchTask("multiemo/all_text_en", ("negative", "positive"),
                                    keep=("negative", "positive")),
    "strategyqa": BigBenchTask("strategyqa", ("No", "Yes")),
    "vitaminc": BigBenchTask("vitaminc_fact_verification", ("False", "True", "Neither")),
}


def bigbench_task_json(task_path: str) -> Path:
    """The task.json of `task_path`, extracted from the sdist into the cache on first use."""
    out = cache_dir() / "bigbench" / task_path / "task.json"
    if out.is_file():
        return out
    sdist = cache_dir() / "downloads" / BIGBENCH_SDIST
    if not sdist.is_file():
        raise FileNotFoundError(f"{sdist} is missing: run `make assets` (it downloads the bigbench "
                                "sdist with `pip download --no-deps --no-binary :all: bigbench==1.0.0`)")
    member = f"{_TASKS_IN_SDIST}/{task_path}/task.json"
    with tarfile.open(sdist) as tar:
        try:
            data = tar.extractfile(member).read()
        except KeyError:
            raise FileNotFoundError(f"{member} is not in {sdist}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, out)   # atomic: concurrent workers never read half a file
    return out


def _label_of(example: dict, labels: tuple[str, ...]) -> str | None:
    winners = [k for k, v in example.get("target_scores", {}).items() if v == 1]
    return winners[0] if len(winners) == 1 and winners[0] in labels else None


def load_task(name: str, seed: int = 0, max_examples: int | None = None) -> TaskData:
    """A built-in task with deterministic 80/10/10 splits (a seeded shuffle of the examples)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    task = TASKS[name]
    raw = json.loads(bigbench_task_json(task.path).read_text())["examples"]
    keep = set(task.keep or task.labels)
    examples = []
    for ex in raw:
        label = _label_of(ex, task.labels)
        if label is not None and label in keep:
            examples.append(Example(ex["input"].strip(), task.labels.index(label)))
    random.Random(seed).shuffle(examples)
    if max_examples is not None:
        examples = examples[:max_examples]
    n_val = n_test = len(examples) // 10
    n_train = len(examples) - n_val - n_test
    return TaskData(name, list(task.labels), examples[:n_train], examples[n_train:n_train + n_val],
                    examples[n_train + n_val:])
