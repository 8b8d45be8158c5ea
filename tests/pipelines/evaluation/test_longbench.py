"""`sparta eval longbench`: LongBench's metrics on hand-computed values; argument checks before any model
loads; an in-process run on a tiny random model into MLflow (the same prompts for every configuration,
scores recomputed from the answers, changed answers, kvpress-layout folders), LongBench-E's buckets; and,
slow, the real SmolLM2-135M end to end."""
from __future__ import annotations

import csv
import json

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.evaluation import kvpress_layout
from pipelines.evaluation import longbench as ev

TINY = ["--model", "random:llama-tiny", "--model-override", "max_position_embeddings=1024", "--dtype", "float32"]


def flat(text: str) -> str:
    """The CLI's output without rich's box and line wraps."""
    return " ".join(text.replace("│", " ").split())


# -- metrics ---------------------------------------------------------------------------------------
def test_qa_f1_is_squad_token_f1_after_normalisation():
    assert ev.normalize_answer("The Cat, sat!  on a MAT.") == "cat sat on mat"
    # "cat sat" vs "cat sat down": 2 common tokens, precision 2/2, recall 2/3 -> 2 * 1 * 2/3 / (5/3) = 0.8
    assert ev.qa_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert ev.qa_f1("Paris", "paris.") == 1.0 and ev.qa_f1("London", "Paris") == 0.0 and ev.qa_f1("", "Paris") == 0.0
    assert ev.qa_f1("cat cat", "cat") == pytest.approx(2 / 3)   # counts, not sets: precision 1/2, recall 1


def test_rouge_l_is_the_lcs_f_measure():
    # LCS of "the cat sat on the mat" and "the cat is on the mat" is "the cat on the mat": 5 of 6 tokens each way
    assert ev.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert ev.rouge_l("cat", "The cat sat") == pytest.approx(0.5)   # precision 1, recall 1/3, lower-cased
    assert ev.rouge_l("", "the cat") == 0.0


def test_classification_shares_credit_among_the_classes_named():
    classes = ["Animal", "Food", "City", "Other location", "location"]
    assert ev.classification("Food", "Food", classes) == 1.0
    assert ev.classification("Food or Animal", "Food", classes) == 0.5
    assert ev.classification("Animal", "Food", classes) == 0.0
    # "location" is part of the reference's own name: it does not dilute the credit
    assert ev.classification("Other location", "Other location", classes) == 1.0
    assert ev.classification("City, Other location", "Other location", classes) == 0.5


def test_retrieval_and_count_score_the_share_of_right_numbers():
    assert ev.retrieval("Paragraph 12", "Paragraph 12") == 1.0
    assert ev.retrieval("Paragraph 3 or Paragraph 12", "Paragraph 12") == 0.5
    assert ev.retrieval("I do not know", "Paragraph 12") == 0.0
    with pytest.raises(ValueError, match="must name 'Paragraph N'"):
        ev.retrieval("1", "12")
    assert ev.count("There are 7 unique paragraphs out of 9", "7") == 0.5 and ev.count("7", "7") == 1.0
    assert ev.count("seven", "7") == 0.0


def test_code_similarity_scores_the_first_code_line():
    # Indel distance of "x = 1" and "x = 2" is 2 (one deletion, one insertion) over 10 characters: 1 - 2/10
    assert ev.code_similarity("# set x\nx = 1\ny = 2", "x = 2") == pytest.approx(0.8)
    assert ev.code_similarity("\n```python\n    return a - b\n```", "    return a - b") == 1.0
    assert ev.code_similarity("// only a comment", "x = 2") == 0.0


def test_example_scores_take_the_best_reference_and_first_lines_where_longbench_does():
    assert ev.example_score("hotpotqa", "the cat sat", ["dog", "a cat sat down"]) == pytest.approx(0.8)
    # hotpotqa reads the whole answer: "paris london is big" vs "paris" = 2 * 1/4 * 1 / (5/4) = 0.4
    assert ev.example_score("hotpotqa", "\nParis\nLondon is big", ["Paris"]) == pytest.approx(0.4)
    assert ev.example_score("triviaqa", "\nParis\nLondon is big", ["Paris"]) == 1.0   # first line only
    assert ev.example_score("trec", "Food\nAnimal", ["Food"], ["Animal", "Food"]) == 1.0
    assert ev.example_score("passage_retrieval_en", "Paragraph 4", ["Paragraph 4"]) == 1.0
    with pytest.raises(ValueError, match="Chinese LongBench task 'lsht' is not supported"):
        ev.example_score("lsht", "x", ["y"])
    assert set(ev.METRICS) == set(ev.lb.TASKS)


def test_task_scores_are_percentages_and_longbench_e_buckets_by_length():
    assert ev.task_score([1.0, 0.5, 0.0]) == 50.0 and ev.task_score([1 / 3]) == 33.33
    assert ev.bucket_scores([1.0, 0.0, 0.5, 1.0], [100, 5000, 9000, 3999]) == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 50.0}
    assert ev.bucket_scores([1.0], [100]) == {"0-4k": 100.0, "4-8k": None, "8k+": None}


# -- the command -----------------------------------------------------------------------------------
def record(task: str, i: int, **changes) -> dict:
    out = {"input": f"Who wrote book {i}?", "context": f"Passage {i}: Book {i} was written by Ann Lee. " * (8 + 4 * i),
           "answers": ["Ann Lee"], "length": 100 + 4000 * i, "dataset": task, "language": "en", "all_classes": None,
           "_id": f"{task}-{i}"}
    return out | changes


@pytest.fixture
def longbench_dir(tmp_path):
    """hotpotqa and trec (v1) and hotpotqa_e, three examples each."""
    folder = tmp_path / "LongBench"
    folder.mkdir()
    rows = {"hotpotqa": [record("hotpotqa", i) for i in range(3)],
            "trec": [record("trec", i, input="What is a fox?\nType:", answers=["Animal"],
                            context="Question: What is a dog?\nType: Animal\n" * 6,
                            all_classes=["Animal", "Food", "City"]) for i in range(3)],
            "hotpotqa_e": [record("hotpotqa_e", i) for i in range(3)]}
    for name, lines in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("workers.data.assets.load_model", refuse)


@pytest.mark.parametrize("args, option, message", [
    (["--tasks", "hotpotqa,hotpot"], "--tasks", "unknown LongBench task 'hotpot'; valid: narrativeqa, qasper"),
    (["--tasks", "dureader"], "--tasks", "Chinese LongBench task 'dureader' is not supported"),
    (["--tasks", "musique", "--longbench-e"], "--tasks", "unknown LongBench-E task 'musique'"),
    (["--tasks", "qasper"], "--longbench", "does not exist; the folder has: hotpotqa, hotpotqa_e, trec"),
    (["--policies", "dense,snap"], "--policies", "unknown 'snap'; give one or more distinct of: dense"),
    (["--art", "off,fastest"], "--art", "unknown ART preset 'fastest'"),
    (["--limit", "0"], "--limit", "must be >= 1, got 0"),
    (["--model-override", "max_position_embeddings=256", "--max-length", "300"], "--max-length",
     "need 332 positions, but random:llama-tiny has 256"),   # 300 prompt tokens + hotpotqa's 32
])
def test_cli_refuses_bad_arguments_before_loading(no_model_load, longbench_dir, tmp_path, args, option, message):
    r = CliRunner().invoke(app, ["eval", "longbench", "--longbench", str(longbench_dir), *TINY, "--tasks", "hotpotqa",
                                 "--out", str(tmp_path / "out"), *args])
    assert r.exit_code == 2, r.output
    assert option in flat(r.output) and message in flat(r.output), r.output
    assert not (tmp_path / "out").exists()


def test_cli_names_a_missing_folder(no_model_load, tmp_path):
    r = CliRunner().invoke(app, ["eval", "longbench", "--longbench", str(tmp_path / "none"), *TINY])
    assert r.exit_code == 2, r.output
    assert "does not exist: download https://huggingface.co/datasets/THUDM/LongBench" in flat(r.output)


def _answers(out) -> list[dict]:
    return [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]


def test_in_process_run_scores_every_configuration_on_the_same_prompts(longbench_dir, tmp_path):
    uri, out = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "out"
    configs = ("dense/off", "dense/tuned+block_size=16", "snapkv/off", "snapkv/tuned+block_size=16")
    r = CliRunner().invoke(app, ["eval", "longbench", "--longbench", str(longbench_dir), *TINY,
                                 "--tasks", "hotpotqa,trec", "--policies", "dense,snapkv",
                                 "--art", "off,tuned+block_size=16",
                                 "--limit", "2", "--max-length", "300", "--max-new-tokens", "6", "--batch", "2",
                                 "--tracking-uri", uri, "--experiment", "lb-test", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert all(c in r.output for c in configs)
    answers = _answers(out)
    assert len(answers) == len(configs) * 4
    prompts: dict[tuple, set] = {}
    for a in answers:   # the same prompt for every configuration; the score recomputed from the answer
        prompts.setdefault((a["task"], a["id"]), set()).add(a["prompt_sha"])
        assert a["score"] == ev.example_score(a["task"], a["answer"], a["answers"], a["all_classes"])
        assert a["completion_tokens"] <= a["max_tokens"] == 6 and a["prompt_tokens"] <= 300
        assert a["art_mode"] == ("off" if a["art"] == "off" else "stability")
    assert set(prompts) == {(t, f"{t}-{i}") for t in ("hotpotqa", "trec") for i in range(2)}
    assert all(len(s) == 1 for s in prompts.values())
    by = {(a["config"], a["id"]): a for a in answers}
    for a in answers:   # changed: the text differs from the same policy's ART-off answer
        off = by[(f"{a['policy']}/off", a["id"])]
        assert a["changed"] == (None if a["art"] == "off" else a["answer"] != off["answer"])
    changed = [json.loads(line) for line in (out / "changed.jsonl").read_text().splitlines()]
    assert [(c["config"], c["id"]) for c in changed] == [(a["config"], a["id"]) for a in answers if a["changed"]]
    assert all(c["art_off_answer"] == by[(c["config"].split("/")[0] + "/off", c["id"])]["answer"] for c in changed)
    # scores.csv and MLflow: per task the mean x 100 of the answers' scores
    scores = {(row["config"], row["task"]): float(row["score"]) for row in csv.DictReader((out / "scores.csv").open())}
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("lb-test").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["sparta.eval"] == "longbench"
    m = run.data.metrics
    for c in configs:
        key = c.replace("+", "_").replace("=", "")
        for task in ("hotpotqa", "trec"):
            want = ev.task_score([a["score"] for a in answers if a["config"] == c and a["task"] == task])
            assert scores[(c, task)] == want == m[f"longbench/{key}/{task}"]
        average = (scores[(c, "hotpotqa")] + scores[(c, "trec")]) / 2
        assert m[f"longbench/{key}/average"] == pytest.approx(average, abs=0.01)
        assert m[f"tokens_per_s/{key}"] > 0
        if "tuned" in c:
            assert m[f"changed_vs_art_off/{key}"] == sum(a["changed"] for a in answers if a["config"] == c) / 4
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"scores.csv", "longbench.md", "answers.jsonl", "changed.jsonl", "longbench.json", "kvpress"} <= names
    # kvpress layout: one run folder per configuration x task, its metrics the task score
    folders = sorted(p.name for p in (out / "kvpress").iterdir())
    assert len(folders) == 8 and len({a.path for a in client.list_artifacts(run.info.run_id, "kvpress")}) == 8
    name = "longbench__trec__random:llama-tiny__snapkv__0.50__max_context300__art_tuned+block_size=16"
    assert name in folders and "longbench__hotpotqa__random:llama-tiny__no_press__0.00__max_context300" in folders
    config, rows, metric = kvpress_layout.read_run(out / "kvpress" / name)
    assert (config["dataset"], config["data_dir"], config["press_name"], config["compression_ratio"]) == (
        "longbench", "trec", "snapkv", 0.5)
    assert config["sparta"]["art"] == "tuned+block_size=16" and config["max_context_length"] == 300
    assert metric == scores[("snapkv/tuned+block_size=16", "trec")]
    mine = [a for a in answers if a["config"] == "snapkv/tuned+block_size=16" and a["task"] == "trec"]
    assert [row["predicted_answer"] for row in rows] == [a["answer"] for a in mine]
    assert [json.loads(row["answers"]) for row in rows] == [["Animal"]] * 2
    assert json.loads(rows[0]["all_classes"]) == ["Animal", "Food", "City"] and "context" not in rows[0]


def test_longbench_e_scores_per_length_bucket(longbench_dir, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["eval", "longbench", "--longbench", str(longbench_dir), *TINY, "--longbench-e",
                                 "--tasks", "hotpotqa", "--art", "off", "--max-length", "200", "--max-new-tokens", "4",
                                 "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--out", str(out)])
    assert r.exit_code == 0, r.output
    answers = _answers(out)
    assert [a["length"] for a in answers] == [100, 4100, 8100]   # one example in each bucket
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [(row["bucket"], row["examples"]) for row in rows] == [("all", "3"), ("0-4k", "1"), ("4-8k", "1"),
                                                                   ("8k+", "1")]
    for row, a in zip(rows[1:], answers):
        assert float(row["score"]) == round(100 * a["score"], 2)
    [folder] = (out / "kvpress").iterdir()
    assert folder.name == "longbench-e__hotpotqa_e__random:llama-tiny__no_press__0.00__max_context200"
    _, _, metric = kvpress_layout.read_run(folder)
    assert metric == {row["bucket"]: float(row["score"]) for row in rows[1:]}


@pytest.mark.slow
def test_smollm2_answers_longbench_with_and_without_art(tmp_path):
    """The packaged SmolLM2-135M with its chat template, two examples, ART off and tuned (about 25 s on 2 cores)."""
    folder = tmp_path / "LongBench"
    folder.mkdir()
    rows = [record("hotpotqa", 0, input="Which city is the capital of France?",
                   context="Passage 1:\nParis is the capital of France. " * 60, answers=["Paris"]),
            record("hotpotqa", 1)]
    (folder / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["eval", "longbench", "--longbench", str(folder), "--model", "smollm2-135m",
                                 "--tasks", "hotpotqa", "--art", "off,tuned", "--limit", "2", "--max-length", "256",
                                 "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--out", str(out)])
    assert r.exit_code == 0, r.output
    answers = _answers(out)
    assert [(a["config"], a["id"]) for a in answers] == [(c, f"hotpotqa-{i}") for c in ("dense/off", "dense/tuned")
                                                        for i in range(2)]
    assert answers[0]["truncated"] and answers[0]["prompt_tokens"] > 256   # 256 + the chat template
    assert all(a["answer"].strip() and 0 < a["completion_tokens"] <= 32 for a in answers)
    assert "paris" in answers[0]["answer"].lower() and answers[0]["score"] > 0   # an easy question, answered
