"""pipelines.sweeps.pareto: the front on points whose front is known, and the files a sweep writes."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.sweeps.pareto import pareto_mask, pareto_table, write_pareto


def test_the_front_of_known_points():
    # accuracy up, memory down: (0.9, 300) and (0.8, 100) and (0.85, 200) trade off; (0.7, 300) loses to all
    # three, (0.8, 150) to (0.8, 100) (equal accuracy, more memory), (0.9, 300) twice: both on the front
    points = np.array([[0.9, 300], [0.8, 100], [0.85, 200], [0.7, 300], [0.8, 150], [0.9, 300]], dtype=float)
    assert pareto_mask(points, ["max", "min"]).tolist() == [True, True, True, False, False, True]
    # both up: only the largest accuracy at the largest memory survives among these
    assert pareto_mask(points, ["max", "max"]).tolist() == [True, False, False, False, False, True]
    assert pareto_mask(points[:, :1], ["min"]).tolist() == [False, False, False, True, False, False]
    with pytest.raises(ValueError, match="unknown mode 'up'; valid: max, min"):
        pareto_mask(points, ["up", "min"])


def trial(key, method, acc, mem, status="FINISHED"):
    return {"params": {"trial_key": key, "method": method}, "final": {"val_accuracy": acc, "peak_mem_mib": mem},
            "status": status}


def test_the_table_keeps_finished_trials_front_first_and_writes_its_files(tmp_path):
    objectives = [("val_accuracy", "max"), ("peak_mem_mib", "min")]
    trials = [trial("a", "lora", 0.80, 100.0), trial("b", "cla", 0.90, 300.0), trial("c", "lora", 0.70, 300.0),
              trial("d", "cla", 0.95, 50.0, status="FAILED"), trial("e", "cla", float("nan"), 10.0),
              trial("f", "cla", 0.85, 120.0)]
    df = pareto_table(trials, objectives)
    assert df["trial_key"].tolist() == ["b", "f", "a", "c"]     # failed and NaN left out; front by accuracy
    assert df["pareto"].tolist() == [True, True, True, False]
    paths = write_pareto(df, objectives, tmp_path)
    assert set(paths) == {"csv", "md", "png"} and paths["png"].stat().st_size > 5000
    text = paths["md"].read_text()
    assert text.startswith("Pareto front over val_accuracy (max), peak_mem_mib (min): 3 of 4 trials")
    (tmp_path / "one").mkdir()
    one = write_pareto(pareto_table(trials, objectives[:1]), objectives[:1], tmp_path / "one")
    assert "png" not in one   # one objective: no plane to draw
