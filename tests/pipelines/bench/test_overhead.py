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
