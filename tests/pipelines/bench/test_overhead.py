"""`sparta bench overhead`: the one-trial spec it runs in Ray is exactly the trial it runs directly."""
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.bench.overhead import one_trial_spec
from pipelines.cli import app
from pipelines.sweeps.spec import SweepSpec, load_spec

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("name", ["sweep-tiny.yaml", "sweep-small.yaml", "sweep-run.yaml"])
def test_one_trial_spec_runs_the_same_trial(name):
    spec = load_spec(ROOT / "examples" / name)
    for trial in spec.trials():
        one = SweepSpec.model_validate(one_trial_spec(spec, trial), context={"base_dir": ROOT / "examples"})
        (only,) = one.trials()
        assert only == trial
        assert one.trial_config(only) == spec.trial_config(trial)
        assert one.experiment == f"{spec.experiment}-overhead"


def test_unknown_trial_is_refused_before_anything_runs(tmp_path):
    result = CliRunner().invoke(app, ["bench", "overhead", str(ROOT / "examples" / "sweep-tiny.yaml"),
                                      "--trial", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "'nope' is not a trial" in result.output and "minilm-l6/movie-reviews-binary/lora/seed0" in result.output
    assert not any(tmp_path.iterdir())


def test_the_phases_of_a_sweep_add_up_to_its_wall_time():
    from types import SimpleNamespace

    from pipelines.bench.overhead import PHASES, phase_table, sweep_phases

    times = {"started": 1000.0, "ray_ready": 1012.0, "fit_done": 1100.0, "finished": 1104.0}
    rec = SimpleNamespace(started_at=1013.5, loop_started_at=1030.0, ended_at=1095.0, logged_s=2.5,
                          final={"wall_s": 60.0, "ray_report_s": 1.25})
    p = sweep_phases(times, rec)
    assert list(p) == list(PHASES)
    assert p == {"mlflow_and_ray_start": 12.0, "tune_schedules": 1.5, "startup": 16.5, "loop": 60.0,
                 "ray_report": 1.25, "after_loop": 5.0, "mlflow_trial": 2.5, "end": 6.5}
    assert sum(v for k, v in p.items() if k != "ray_report") == times["finished"] - times["started"]
    table = phase_table({"phases": p, "direct": {"process_s": 70.0, "loop_s": 58.0}})
    rows = table.set_index("phase")
    assert rows.loc["total", "sweep s"] == "104.0" and rows.loc["total", "direct s"] == "70.0"
    assert rows.loc[PHASES["startup"], "direct s"] == "12.0" and rows.loc[PHASES["loop"], "direct s"] == "58.0"
    assert rows.loc[PHASES["ray_report"], "direct s"] == ""   # the direct run reports to no one
