"""Offline task data. The built-in tasks are BIG-bench tasks read from the bigbench sdist tarball
(`make assets` downloads it; installing bigbench would pull tensorflow): only the task.json files of
the built-in tasks are extracted, once, into the cache."""
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
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)   # train / validation / test


@dataclass(frozen=True)
class Example:
    text: str
    label: int   # index into TaskData.label_names


@dataclass(frozen=True)
class TaskData:
    """A classification task with fixed train/validation/test splits."""

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
    path: str                    # task folder under benchmark_tasks/
    labels: tuple[str, ...]      # target_scores keys; the position is the class id
    source: str = ""             # where the examples come from, for reports


TASKS: dict[str, BigBenchTask] = {
    # 8,215 English reviews (hotels, medicine, products, school), whole texts.
    "multiemo": BigBenchTask("multiemo/all_text_en", ("negative", "neutral", "positive", "ambivalent"),
                             "MultiEmo, English reviews"),
    # Positive vs negative only (neutral and ambivalent dropped): the stand-in for SST-2.
    "multiemo-binary": BigBenchTask("multiemo/all_text_en", ("negative", "positive"),
                                    "MultiEmo, English reviews, polar only"),
    "strategyqa": BigBenchTask("strategyqa", ("No", "Yes"), "StrategyQA yes/no questions"),
    # Wikipedia passage + claim; the label says whether the passage supports, refutes or neither.
    "vitaminc": BigBenchTask("vitaminc_fact_verification", ("False", "True", "Neither"),
                             "VitaminC fact verification"),
}


# -- extraction ------------------------------------------------------------------------------------
def _sdist() -> Path:
    path = cache_dir() / "downloads" / BIGBENCH_SDIST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `make assets` (it downloads the bigbench sdist "
                                "with `pip download --no-deps --no-binary :all: bigbench==1.0.0`)")
    return path


def _cached(task_path: str) -> Path:
    return cache_dir() / "bigbench" / task_path / "task.json"


def _write_atomic(path: Path, data: bytes) -> None:
    # Concurrent workers may extract the same task: each writes its own temp file and renames it.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)   # mkstemp makes it owner-only; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def bigbench_task_json(task_path: str) -> Path:
    """The cached task.json of `task_path` (a folder under benchmark_tasks/). The first call extracts
    it together with those of every built-in task: one pass over the 358 MB tarball (~7 s) for all."""
    out = _cached(task_path)
    if out.is_file():
        return out
    wanted = {f"{_TASKS_IN_SDIST}/{p}/task.json": _cached(p)
              for p in {task_path, *(t.path for t in TASKS.values())} if not _cached(p).is_file()}
    sdist = _sdist()
    with tarfile.open(sdist, mode="r|gz") as tar:   # streaming: members are read in archive order
        for member in tar:
            if member.name in wanted:
                _write_atomic(wanted.pop(member.name), tar.extractfile(member).read())
                if not wanted:
                    break
    if not out.is_file():
        raise FileNotFoundError(f"{_TASKS_IN_SDIST}/{task_path}/task.json is not in {sdist}")
    return out


# -- examples and splits ---------------------------------------------------------------------------
def _label_of(example: dict) -> str | None:
    """The single correct answer: the target_scores key scored 1, else a plain string target."""
    scores = example.get("target_scores")
    if scores:
        winners = [k for k, v in scores.items() if v == 1]
        return winners[0] if len(winners) == 1 else None
    target = example.get("target")
    return target if isinstance(target, str) else None


def _examples(task: BigBenchTask) -> list[Example]:
    raw = json.loads(bigbench_task_json(task.path).read_text(encoding="utf-8"))["examples"]
    labelled: dict[str, set[str]] = {}
    for ex in raw:
        label = _label_of(ex)
        if label is not None:
            labelled.setdefault(ex["input"].strip(), set()).add(label)
    # A text seen twice must not land in two splits: keep it once, or drop it if its labels disagree.
    return [Example(text, task.labels.index(label))
            for text, labels in labelled.items() if len(labels) == 1
            for label in labels if label in task.labels]


def _cut(examples: list[Example]) -> tuple[list[Example], list[Example], list[Example]]:
    """80/10/10: validation and test get floor(n/10) each, train the rest."""
    n_val = n_test = int(len(examples) * SPLIT_FRACTIONS[1])
    n_train = len(examples) - n_val - n_test
    return examples[:n_train], examples[n_train:n_train + n_val], examples[n_train + n_val:]


def load_task(name: str, seed: int = 0, max_examples: int | None = None) -> TaskData:
    """A built-in task with deterministic splits: the examples (deduplicated, in file order) are
    shuffled with `seed` and cut 80/10/10. `max_examples` keeps the first n of the shuffled examples
    before the cut, a fast stand-in for tests; the same seed always gives the same splits."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    task = TASKS[name]
    examples = _examples(task)
    random.Random(seed).shuffle(examples)
    if max_examples is not None:
        examples = examples[:max_examples]
    train, validation, test = _cut(examples)
    return TaskData(name, list(task.labels), train, validation, test)
