"""Evaluation results in kvpress's layout (NVIDIA/kvpress, evaluation/evaluate.py), so that sparta's runs can be
read beside kvpress's own: one folder per run named like kvpress's, holding

    predictions.csv   one row per example: the dataset's columns (no `context`), `predicted_answer`,
                      `compression_ratio`; lists and dicts as JSON
    metrics.json      what the benchmark's kvpress scorer returns (LongBench: the task score, 0..100;
                      LongBench-E: score per length bucket; RULER: {task: {"string_match": score}})
    config.yaml       kvpress's EvaluationConfig fields, and sparta's own (the ART setting) under `sparta:`

kvpress has no ART: a configuration with ART off gets exactly kvpress's folder name, one with ART on the
same name with `__art_<setting>` appended. A folder that exists is overwritten (kvpress adds `/1`, `/2`).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# sparta's KV policies (attention.hf.POLICIES) by their kvpress PRESS_REGISTRY names; others keep their name.
PRESS_NAMES = {"dense": "no_press", "streaming": "streaming_llm", "snapkv": "snapkv", "pyramidkv": "pyramidkv",
               "knorm": "knorm"}
FILES = ("predictions.csv", "metrics.json", "config.yaml")


def press_name(policy: str) -> str:
    return PRESS_NAMES.get(policy, policy)


@dataclass(frozen=True)
class KvpressRun:
    """One kvpress run: a dataset (and its data_dir: a LongBench task, a RULER length) on a model with a KV
    policy removing `ratio` of the prefill KV, decoded with the ART setting `art` ("off" or a preset)."""

    dataset: str
    data_dir: str | None
    model: str
    policy: str
    ratio: float
    art: str
    max_new_tokens: int | None = None
    max_context_length: int | None = None
    device: str | None = None
    seed: int = 0

    @property
    def folder_name(self) -> str:
        """kvpress's get_results_dir name ("__"-joined, empty parts left out), plus the ART setting."""
        parts = [self.dataset, self.data_dir or "", self.model.replace("/", "--"), press_name(self.policy),
                 f"{self.ratio:.2f}"]
        if self.max_context_length is not None:
            parts.append(f"max_context{self.max_context_length}")
        if self.art != "off":
            parts.append(f"art_{self.art}")
        return "__".join(p for p in parts if p)

    def config(self) -> dict[str, Any]:
        """config.yaml: every field of kvpress's EvaluationConfig (its defaults where sparta has no
        counterpart), then `sparta:` with the ART setting and the policy's sparta name."""
        return {"dataset": self.dataset, "data_dir": self.data_dir, "model": self.model, "device": self.device,
                "press_name": press_name(self.policy), "compression_ratio": float(self.ratio),
                "key_channel_compression_ratio": None, "fraction": 1.0, "max_new_tokens": self.max_new_tokens,
                "max_context_length": self.max_context_length, "query_aware": False, "needle_depth": None,
                "compression_interval": None, "target_size": None, "hidden_states_buffer_size": None,
                "output_dir": None, "log_level": "INFO", "model_kwargs": {}, "press_init_command": None,
                "seed": self.seed, "fp8": False,
                "sparta": {"art": self.art, "kv_policy": self.policy, "kv_ratio": float(self.ratio)}}


def _cell(value) -> Any:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, tuple, dict)) else value


def write_run(root: Path, run: KvpressRun, predictions: list[dict], metrics: Any) -> Path:
    """root/<run.folder_name>/ with predictions.csv (columns in the order of the first row's keys),
    metrics.json and config.yaml; the folder."""
    if not predictions:
        raise ValueError(f"{run.folder_name}: no predictions to write")
    folder = Path(root) / run.folder_name
    folder.mkdir(parents=True, exist_ok=True)
    columns = [c for c in predictions[0] if c != "context"]
    with (folder / "predictions.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows({c: _cell(row.get(c)) for c in columns} for row in predictions)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "config.yaml").write_text(yaml.safe_dump(run.config(), sort_keys=False, default_flow_style=False,
                                                       indent=2, allow_unicode=True), encoding="utf-8")
    return folder


def read_run(folder: Path) -> tuple[dict, list[dict], Any]:
    """(config, prediction rows as strings, metrics) of a run folder, kvpress's or sparta's."""
    folder = Path(folder)
    config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    with (folder / "predictions.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return config, rows, json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
