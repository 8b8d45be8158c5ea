"""kvpress's evaluation layout: folder names as kvpress's get_results_dir makes them (ART appended), the
three files read back (every EvaluationConfig field, no context column, lists as JSON), and NIAH's
RULER-style folders per configuration x length with RULER's string_match_all."""
from __future__ import annotations

import json

import pytest

from pipelines.evaluation import kvpress_layout as kv
from pipelines.evaluation import niah

# kvpress evaluation/evaluate.py EvaluationConfig, in its order
KVPRESS_FIELDS = ["dataset", "data_dir", "model", "device", "press_name", "compression_ratio",
                  "key_channel_compression_ratio", "fraction", "max_new_tokens", "max_context_length", "query_aware",
                  "needle_depth", "compression_interval", "target_size", "hidden_states_buffer_size", "output_dir",
                  "log_level", "model_kwargs", "press_init_command", "seed", "fp8"]


def test_folder_names_are_kvpress_names_with_art_appended():
    run = kv.KvpressRun("longbench", "hotpotqa", "meta-llama/Meta-Llama-3.1-8B-Instruct", "dense", 0.0, "off")
    assert run.folder_name == "longbench__hotpotqa__meta-llama--Meta-Llama-3.1-8B-Instruct__no_press__0.00"
    run = kv.KvpressRun("ruler", "4096", "smollm2-135m", "snapkv", 0.5, "certified+eps=0.01", max_context_length=8000)
    assert run.folder_name == "ruler__4096__smollm2-135m__snapkv__0.50__max_context8000__art_certified+eps=0.01"
    assert kv.KvpressRun("loogle", None, "m", "streaming", 0.25, "off").folder_name == "loogle__m__streaming_llm__0.25"
    assert kv.press_name("h2o") == "h2o"   # not in kvpress's registry: our name


def test_write_run_files_read_back(tmp_path):
    run = kv.KvpressRun("longbench", "trec", "smollm2-135m", "snapkv", 0.5, "tuned", max_new_tokens=64,
                        max_context_length=3500, device="cpu")
    predictions = [{"_id": "a", "context": "long text", "question": "What is a fox?\nType:", "answers": ["Animal"],
                    "all_classes": ["Animal", "Food"], "predicted_answer": "Animal, \"quoted\"",
                    "compression_ratio": 0.5},
                   {"_id": "b", "context": "more", "question": "Où?", "answers": ["Food", "Meal"], "all_classes": None,
                    "predicted_answer": "line one\nline two", "compression_ratio": 0.5}]
    folder = kv.write_run(tmp_path, run, predictions, 42.5)
    assert folder == tmp_path / run.folder_name and sorted(p.name for p in folder.iterdir()) == sorted(kv.FILES)
    config, rows, metrics = kv.read_run(folder)
    assert list(config) == KVPRESS_FIELDS + ["sparta"]
    assert (config["dataset"], config["data_dir"], config["model"], config["device"]) == ("longbench", "trec",
                                                                                         "smollm2-135m", "cpu")
    assert (config["press_name"], config["compression_ratio"]) == ("snapkv", 0.5)
    assert (config["max_new_tokens"], config["max_context_length"]) == (64, 3500)
    assert config["fraction"] == 1.0 and config["query_aware"] is False and config["model_kwargs"] == {}
    assert config["sparta"] == {"art": "tuned", "kv_policy": "snapkv", "kv_ratio": 0.5}
    assert list(rows[0]) == ["_id", "question", "answers", "all_classes", "predicted_answer", "compression_ratio"]
    assert [r["predicted_answer"] for r in rows] == ["Animal, \"quoted\"", "line one\nline two"]
    assert [json.loads(r["answers"]) for r in rows] == [["Animal"], ["Food", "Meal"]]
    assert rows[1]["question"] == "Où?" and rows[1]["all_classes"] == "" and rows[0]["compression_ratio"] == "0.5"
    assert metrics == 42.5
    kv.write_run(tmp_path, run, predictions[:1], {"0-4k": 10.0, "4-8k": None})   # overwritten in place
    assert len(kv.read_run(folder)[1]) == 1 and kv.read_run(folder)[2] == {"0-4k": 10.0, "4-8k": None}
    with pytest.raises(ValueError, match="no predictions"):
        kv.write_run(tmp_path, run, [], 0.0)


def _row(conf: niah.RunConfig, variant: str, length: int, found: int, expected: int, answer: str) -> niah.Row:
    values = ",".join(str(1000000 + i) for i in range(expected))
    return niah.Row(conf.label, conf.policy, conf.art, variant, length, 0.5, 0, found == expected, found, expected, 5,
                    "off" if conf.art == "off" else "stability", answer, values, f"sha-{variant}-{length}")


def test_niah_writes_a_ruler_folder_per_configuration_and_length(tmp_path):
    cfg = niah.NiahConfig(model="random:llama-tiny", lengths=(600, 800), depths=(0.5,),
                          variants=("single", "multivalue"), art=("off", "tuned"), max_tokens=12, seed=3, device="cpu")
    confs = cfg.configs()
    rows = [_row(c, v, n, f, e, f"answer {c.art} {v} {n}") for c in confs
            for v, n, f, e in (("single", 600, 1, 1), ("multivalue", 600, 2, 4), ("single", 800, 0, 1),
                               ("multivalue", 800, 4, 4))]
    report = niah.NiahReport(cfg, confs, rows, [], {"model": cfg.model})
    folders = niah.write_kvpress(report, tmp_path)
    assert sorted(f.name for f in folders) == sorted(f"ruler__{n}__random:llama-tiny__no_press__0.00{art}"
                                                     for n in (600, 800) for art in ("", "__art_tuned"))
    config, preds, metrics = kv.read_run(tmp_path / "ruler__600__random:llama-tiny__no_press__0.00__art_tuned")
    assert (config["dataset"], config["data_dir"], config["max_new_tokens"], config["seed"], config["device"]) == (
        "ruler", "600", 12, 3, "cpu")
    assert config["sparta"]["art"] == "tuned"
    # RULER's string_match_all: the share of expected values found, x 100 (2 of 4 -> 50)
    assert metrics == {"niah_single": {"string_match": 100.0}, "niah_multivalue": {"string_match": 50.0}}
    assert kv.read_run(tmp_path / "ruler__800__random:llama-tiny__no_press__0.00")[2] == {
        "niah_single": {"string_match": 0.0}, "niah_multivalue": {"string_match": 100.0}}
    assert [p["task"] for p in preds] == ["niah_single", "niah_multivalue"]
    assert [p["predicted_answer"] for p in preds] == ["answer tuned single 600", "answer tuned multivalue 600"]
    assert json.loads(preds[1]["answer"]) == ["1000000", "1000001", "1000002", "1000003"]
