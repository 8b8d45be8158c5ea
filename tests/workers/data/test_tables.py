"""Training tables from the user's files: every format reads to the same task; splits, labels, errors."""
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers.data.tables import load_table_task, read_table

ROWS = [{"review": f"review number {i}", "stars": [1, 3, 5][i % 3],
         "fold": "train" if i < 30 else ("val" if i < 35 else "test")} for i in range(40)]


def ref(**kw):
    return {"name": "reviews", "path": None, "train": None, "validation": None, "test": None,
            "text": "review", "label": "stars", "split": None, **kw}


def write_all(tmp_path):
    table = pa.Table.from_pylist(ROWS)
    csv = tmp_path / "t.csv"
    csv.write_text("review,stars,fold\n" + "".join(f"{r['review']},{r['stars']},{r['fold']}\n" for r in ROWS))
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    parquet = tmp_path / "t.parquet"
    pq.write_table(table, parquet)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(saved))
    return {"csv": csv, "jsonl": jsonl, "parquet": parquet, "saved": saved}


def test_every_format_reads_the_same_rows(tmp_path):
    files = write_all(tmp_path)
    tables = {k: read_table(p)["all"] for k, p in files.items()}
    for name, table in tables.items():
        assert table.column("review").to_pylist() == [r["review"] for r in ROWS], name
        assert table.column("stars").to_pylist() == [r["stars"] for r in ROWS], name
    tasks = {k: load_table_task(ref(path=str(p), split="fold"), seed=3) for k, p in files.items()}
    first = tasks["csv"]
    assert first.label_names == ["1", "3", "5"]   # numbers sort numerically, become names
    assert (len(first.train), len(first.validation), len(first.test)) == (30, 5, 5)
    for task in tasks.values():
        assert task == first


def test_split_column_places_rows_and_labels_index_names(tmp_path):
    task = load_table_task(ref(path=str(write_all(tmp_path)["jsonl"]), split="fold"))
    by_text = {r["review"]: r for r in ROWS}
    for split, want in (("train", "train"), ("validation", "val"), ("test", "test")):
        for ex in getattr(task, split):
            assert by_text[ex.text]["fold"] == want
            assert task.label_names[ex.label] == str(by_text[ex.text]["stars"])


def test_without_splits_validation_and_test_are_cut_from_train(tmp_path):
    path = str(write_all(tmp_path)["parquet"])
    a, b = load_table_task(ref(path=path), seed=0), load_table_task(ref(path=path), seed=0)
    assert (len(a.train), len(a.validation), len(a.test)) == (32, 4, 4)
    assert a == b   # seeded: the same split every time
    texts = [e.text for e in a.train + a.validation + a.test]
    assert sorted(texts) == sorted(r["review"] for r in ROWS)   # each row in exactly one split
    assert load_table_task(ref(path=path), seed=1).validation != a.validation


def test_separate_files_and_a_saved_dataset_dict(tmp_path):
    train, val = tmp_path / "train.csv", tmp_path / "val.csv"
    train.write_text("review,stars\n" + "".join(f"t{i},{'good' if i % 2 else 'bad'}\n" for i in range(20)))
    val.write_text("review,stars\nv0,good\nv1,bad\nv2,meh\n")
    task = load_table_task(ref(train=str(train), validation=str(val)))
    assert task.label_names == ["bad", "good", "meh"]
    assert sorted(e.text for e in task.validation) == ["v0", "v1", "v2"]
    assert len(task.test) == 2 and len(task.train) == 18   # test carved out of train

    folder = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:30]),
                          "validation": datasets.Dataset.from_list(ROWS[30:35]),
                          "test": datasets.Dataset.from_list(ROWS[35:])}).save_to_disk(str(folder))
    task = load_table_task(ref(path=str(folder)))
    assert sorted(e.text for e in task.test) == sorted(r["review"] for r in ROWS[35:])


@pytest.mark.parametrize("changes, message", [
    ({"text": "body"}, "no text column 'body'; its columns: review, stars, fold"),
    ({"label": "score"}, "no label column 'score'"),
    ({"split": "part"}, "no split column 'part'"),
])
def test_missing_columns_are_named_with_the_available_ones(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_table_task(ref(path=str(write_all(tmp_path)["csv"]), **changes))


def test_unknown_split_values_and_tiny_tables_are_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("review,stars,fold\na,1,train\nb,2,holdout\n")
    with pytest.raises(ValueError, match="split value 'holdout'.*valid: train, validation, val"):
        load_table_task(ref(path=str(bad), split="fold"))
    tiny = tmp_path / "tiny.csv"
    tiny.write_text("review,stars\na,1\nb,2\n")
    with pytest.raises(ValueError, match="too few rows"):
        load_table_task(ref(path=str(tiny)))
