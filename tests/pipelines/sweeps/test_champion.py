"""The `champion` alias hand-off: four small sweeps (no Ray) register a version each per model x dataset; the
alias moves only to a strictly better val metric, in the metric's direction, and resolves for loading,
serving and `sparta sweep results`."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from typer.testing import CliRunner

import adapters
from pipelines.cli import app as cli
from pipelines.serving import deploy as sv
from pipelines.serving.spec import ServeSpec
from pipelines.sweeps import registry, tracking
from tests.pipelines.sweeps.test_tracking import MODEL, OVERRIDES, tiny_base, logits_of, make_adapter, trial_params

EXPERIMENT = "sparta-champion"
ACC, PPL = "movie-reviews", "wiki"   # accuracy: higher is better; perplexity: lower is better
ACC_NAME, PPL_NAME = "sparta-random-llama-tiny-movie-reviews", "sparta-random-llama-tiny-wiki"
# One trial per dataset and sweep: sweep -> (val accuracy, val perplexity). Worse, tie, better by turns; a
# registry that ranked perplexity upwards would crown sweep 2's 25.0.
SWEEPS = [(0.70, 20.0), (0.65, 25.0), (0.70, 15.0), (0.80, 15.0)]
# After each sweep: the version holding `champion` for (accuracy, perplexity).
CHAMPIONS = [("1", "1"), ("1", "1"), ("1", "3"), ("4", "3")]


def _trial(dataset: str, sweep: int, val: float, root: Path) -> dict:
    metric = "accuracy" if dataset == ACC else "perplexity"
    params = trial_params("cla", sweep) | {"dataset": dataset, "trial_key": f"cla-{dataset}-s{sweep}"}
    final = {"step": 3, "metric": metric, f"val_{metric}": val, f"test_{metric}": val, "val_loss": 0.5}
    folder = make_adapter("cla", sweep, root / f"sweep{sweep}" / dataset)   # the seed tells the adapters apart
    return {"params": params, "history": [final], "final": final, "adapter_dir": folder}


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    root = tmp_path_factory.mktemp("champion")
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    client = MlflowClient(uri)
    out = {"uri": uri, "client": client, "registered": [], "aliases": [], "parents": [], "adapters": []}
    for i, (acc, ppl) in enumerate(SWEEPS):
        trials = [_trial(ACC, i, acc, root), _trial(PPL, i, ppl, root)]
        with tracking.SweepTracker(EXPERIMENT, uri) as tracker:
            out["parents"].append(tracker.start(None, {"sweep": i}))
            for t in trials:
                tracker.log_trial(t["params"], t["history"], t["final"], t["adapter_dir"])
            result = tracker.finish()
        out["registered"].append({r.dataset: r for r in result.registered})
        out["aliases"].append(tuple(str(client.get_model_version_by_alias(n, "champion").version)
                                    for n in (ACC_NAME, PPL_NAME)))
        out["adapters"].append({t["params"]["dataset"]: t["adapter_dir"] for t in trials})
    return out


def test_the_alias_moves_only_to_a_strictly_better_version(sweeps):
    assert sweeps["aliases"] == CHAMPIONS
    for i, regs in enumerate(sweeps["registered"]):
        assert {d: r.version for d, r in regs.items()} == {ACC: str(i + 1), PPL: str(i + 1)}   # always registered
        before = CHAMPIONS[i - 1] if i else (None, None)
        for j, dataset in enumerate((ACC, PPL)):
            reg = regs[dataset]
            assert reg.champion == (CHAMPIONS[i][j] == reg.version), (i, dataset)
            assert reg.previous_champion == before[j], (i, dataset)
    assert sweeps["registered"][0][ACC].champion_uri == f"models:/{ACC_NAME}@champion"


def test_versions_carry_what_the_comparison_reads(sweeps):
    client = sweeps["client"]
    acc = client.get_model_version(ACC_NAME, "2").tags
    ppl = client.get_model_version(PPL_NAME, "3").tags
    assert (acc["metric"], acc["mode"], float(acc["val_accuracy"])) == ("accuracy", "max", 0.65)
    assert (ppl["metric"], ppl["mode"], float(ppl["val_perplexity"])) == ("perplexity", "min", 15.0)
    assert client.get_model_version(ACC_NAME, "4").aliases == ["champion"]
    assert client.get_model_version(ACC_NAME, "1").aliases == []


def test_champion_uri_loads_and_serves_the_champion(sweeps):
    acc_uri = sweeps["registered"][0][ACC].champion_uri
    model, _ = registry.load_registered(acc_uri, sweeps["uri"])
    got = logits_of(model)
    for i, expected in ((3, True), (0, False)):   # version 4 holds the alias now, not version 1
        direct = tiny_base()
        adapters.load(direct, sweeps["adapters"][i][ACC])
        assert torch.equal(got, logits_of(direct)) is expected, i
    # a serve spec's `model: models:/NAME@champion` resolves through MLflow to version 3's adapter
    spec = ServeSpec.model_validate({"model": registry.champion_uri(PPL_NAME), "tracking_uri": sweeps["uri"],
                                     "max_context": 256, "max_new_tokens": 16, "dtype": "float32"})
    resolved = sv.resolve_model(spec)
    assert resolved.model == MODEL and resolved.model_overrides == OVERRIDES
    weights = "adapter_model.safetensors"
    assert Path(resolved.adapter, weights).read_bytes() == Path(sweeps["adapters"][2][PPL], weights).read_bytes()
    assert Path(resolved.adapter, weights).read_bytes() != Path(sweeps["adapters"][3][PPL], weights).read_bytes()


def test_results_name_the_champion_versions(sweeps):
    args = ["sweep", "results", EXPERIMENT, "--tracking-uri", sweeps["uri"]]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"models:/{ACC_NAME}@champion -> version 4 (cla, cla-{ACC}-s3, val accuracy 0.8; this sweep)" in lines
    assert (f"models:/{PPL_NAME}@champion -> version 3 (cla, cla-{PPL}-s2, val perplexity 15.0; "
            f"sweep run {sweeps['parents'][2]})") in lines
    csv = CliRunner().invoke(cli, [*args, "--format", "csv"])
    assert csv.exit_code == 0 and "@champion" not in csv.output
    earlier = tracking.sweep_champions(EXPERIMENT, sweeps["uri"], sweeps["parents"][0])
    assert [(mv.name, str(mv.version)) for mv in earlier] == [(ACC_NAME, "4"), (PPL_NAME, "3")]   # who holds it now


def test_no_champion_yet_and_errors_that_are_not_a_missing_alias(sweeps):
    client = sweeps["client"]
    client.create_registered_model("bare")
    assert registry.current_champion(client, "bare") is None
    with pytest.raises(MlflowException, match="not found|does not exist|not exist"):
        registry.current_champion(client, "no-such-model")


def test_another_metric_is_not_compared(sweeps, caplog):
    client = sweeps["client"]
    held = client.get_model_version(ACC_NAME, "4").tags
    other = dict(held, metric="f1", mode="max", val_f1="0.99")
    with caplog.at_level("WARNING", logger="pipelines.sweeps.registry"):
        assert registry._beats(other, held, "x/9", f"{ACC_NAME}/4") is False
    assert "not compared" in caplog.text
    assert registry._beats(dict(held, val_accuracy="0.81"), held, "x/9", "y/4") is True
    assert registry._beats(dict(held, val_accuracy="0.8"), held, "x/9", "y/4") is False   # a tie keeps the champion
    old = {k: v for k, v in held.items() if k != "mode"}   # a version registered before the mode tag
    assert registry._beats(dict(held, val_accuracy="0.81"), old, "x/9", "y/4") is True
