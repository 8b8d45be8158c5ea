"""BIG-bench tasks read offline from the sdist: labels, deterministic disjoint splits."""
import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from workers.data.assets import cache_dir
from workers.data.datasets import TASKS, bigbench_task_json, load_task


def _texts(split):
    return {e.text for e in split}


def _counts(task):
    return [sum(e.label == i for e in task.train + task.validation + task.test) for i in range(task.num_labels)]


def test_multiemo_has_four_labels_and_clean_splits():
    t = load_task("multiemo")
    assert t.kind == "classification" and t.label_names == ["negative", "neutral", "positive", "ambivalent"]
    assert (len(t.train), len(t.validation), len(t.test)) == (6573, 821, 821)
    assert _counts(t) == [3112, 1217, 2286, 1600]
    tr, va, te = map(_texts, (t.train, t.validation, t.test))
    assert len(tr | va | te) == 8215   # disjoint, and no text repeats inside a split
    assert {e.label for e in t.train} == {0, 1, 2, 3}
    again = load_task("multiemo")
    assert (again.train, again.validation, again.test) == (t.train, t.validation, t.test)
    other = load_task("multiemo", seed=1)
    assert other.test != t.test and _texts(other.train) | _texts(other.test) | _texts(other.validation) == tr | va | te


def test_binary_multiemo_drops_neutral_and_ambivalent():
    t = load_task("multiemo-binary")
    assert t.label_names == ["negative", "positive"] and t.num_labels == 2
    assert (len(t.train), len(t.validation), len(t.test)) == (4320, 539, 539)
    assert _counts(t) == [3112, 2286]


@pytest.mark.parametrize("name,labels,counts", [
    ("strategyqa", ["No", "Yes"], [1219, 1070]),   # 2,290 in the file, one question listed twice
    ("vitaminc", ["False", "True", "Neither"], [20169, 27242, 7257]),
])
def test_other_tasks(name, labels, counts):
    t = load_task(name)
    assert t.label_names == labels and _counts(t) == counts
    n = sum(counts)
    assert (len(t.validation), len(t.test)) == (n // 10, n // 10)
    assert not (_texts(t.train) & _texts(t.test))


@pytest.mark.parametrize("name", list(TASKS))
def test_labels_match_the_task_file(name):
    """Each example's label is the target_scores key scored 1 in the original task.json."""
    raw = json.loads(bigbench_task_json(TASKS[name].path).read_text())["examples"]
    truth = {ex["input"].strip(): next(k for k, v in ex["target_scores"].items() if v == 1) for ex in raw}
    t = load_task(name, max_examples=300)
    assert all(t.label_names[e.label] == truth[e.text] for e in t.train + t.validation + t.test)


def test_max_examples_is_a_prefix_of_the_same_shuffle():
    small, full = load_task("strategyqa", max_examples=200, seed=3), load_task("strategyqa", seed=3)
    assert (len(small.train), len(small.validation), len(small.test)) == (160, 20, 20)
    assert small.train == full.train[:160]


def test_unknown_task_lists_the_choices():
    with pytest.raises(ValueError) as e:
        load_task("sst2")
    assert "'sst2'" in str(e.value) and all(n in str(e.value) for n in TASKS)


def test_missing_tarball_says_make_assets(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARTA_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make assets"):
        load_task("strategyqa")


def test_tasks_are_extracted_once_into_the_cache(tmp_path, monkeypatch):
    tarball = cache_dir() / "downloads" / "bigbench-1.0.0.tar.gz"
    monkeypatch.setenv("SPARTA_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / tarball.name).symlink_to(tarball)
    assert len(load_task("strategyqa").train) == 1833
    # One pass over the tarball extracted every built-in task; later loads never need it.
    shutil.rmtree(tmp_path / "downloads")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "bigbench/multiemo/all_text_en/task.json", "bigbench/strategyqa/task.json",
        "bigbench/vitaminc_fact_verification/task.json"]
    assert load_task("multiemo").num_labels == 4
