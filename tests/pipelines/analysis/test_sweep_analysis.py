"""The analyses in the pipeline, end to end on a local Ray and a real MLflow store: a tiny sweep with
`analysis:` logs every metric and artifact on each trial's run, and `sparta analyze` (a real process) runs them
again afterwards on the stored adapters and logs the report to the sweep's run."""
import math
import re

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from adapters.analysis import EPS_GRID, bound_terms
from pipelines.sweeps.driver import run_sweep
from pipelines.sweeps.spec import load_spec
from tests.helpers import REPO, markdown_rows, sparta

pytestmark = pytest.mark.slow

ANALYSES = ["gap", "bounds", "spectrum", "intruders", "landscape"]
FILES = {"spectrum.csv", "spectrum.png", "intruders.csv", "intruders.png"} | {
    f"landscape-{variant}-{dims}.{ext}" for variant in ("adapter", "merged") for dims in ("1d", "2d")
    for ext in ("csv", "png")}
# MiniLM adapts q and v (384 -> 384) in each of its 6 layers
MINILM_QV = [(384, 384)] * 12


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analysis-sweep")
    spec = yaml.safe_load((REPO / "examples" / "sweep-tiny.yaml").read_text())
    spec.update(experiment="analysis-tiny", methods=["lora", "cla", "c3la"], seeds=[0], max_concurrent=3,
                resources={"cpus_per_worker": 0.6}, analysis=ANALYSES,
                analysis_settings={"landscape_points": 3, "landscape_points_2d": 3, "intruder_k": 6})
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        out = run_sweep(load_spec(path), path, tracking_uri=uri, storage_root=tmp / "sweeps")
        import ray

        ray.shutdown()
    return out, uri, tmp


def trial_runs(client, parent):
    return client.search_runs([client.get_run(parent).info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent}'")


def test_a_sweep_with_analysis_logs_every_metric_and_file(swept):
    out, uri, _ = swept
    client = MlflowClient(uri)
    runs = trial_runs(client, out.parent_run_id)
    assert sorted(r.data.params["method"] for r in runs) == ["c3la", "cla", "lora"]
    train_examples = 8033   # movie-reviews-binary's training split
    for run in runs:
        m, method = run.data.metrics, run.data.params["method"]
        # the gap at every evaluation, from the fixed training slice measured like the test loss
        history = client.get_metric_history(run.info.run_id, "gap")
        assert [h.step for h in history] == [2, 4]
        assert m["final/gap"] == pytest.approx(m["final/test_loss"] - m["final/train_eval_loss"])
        bound = bound_terms(method, MINILM_QV, rank=8, chain_segments=3, n_examples=train_examples,
                            bits=32 if run.data.tags["sparta.precision"] == "fp32" else 16)
        assert m["final/analysis/bound_term"] == pytest.approx(bound.term)
        assert 1 <= m["final/analysis/effective_rank_mean"] <= (24 if method == "c3la" else 8)
        counts = [m[f"final/analysis/intruders_eps{e:g}"] for e in EPS_GRID]
        assert counts == sorted(counts) and 0 <= counts[0] and counts[-1] <= 6   # the spec's intruder_k
        for key in ("landscape_adapter_sharpness", "landscape_merged_sharpness", "landscape_merged_2d_sharpness"):
            assert math.isfinite(m[f"final/analysis/{key}"]) and m[f"final/analysis/{key}"] >= 0
        files = {f.path.split("/", 1)[1] for f in client.list_artifacts(run.info.run_id, "analysis")}
        assert files == FILES
        # the spec's analysis_settings reached the worker: 3 points per axis
        line = pd.read_csv(client.download_artifacts(run.info.run_id, "analysis/landscape-merged-1d.csv"))
        grid = pd.read_csv(client.download_artifacts(run.info.run_id, "analysis/landscape-adapter-2d.csv"))
        assert line["alpha"].tolist() == [-1.0, 0.0, 1.0] and len(grid) == 9
    # the summary gains the analyses' columns, one value per method (one seed each)
    table = out.summary.set_index("method")
    for col in ("gap_mean", "bound_term", "intruders_mean", "effective_rank_mean", "sharpness_mean"):
        assert table[col].notna().all(), col
    # S = 12 x 384 (cla) < 12 x 768 (lora) < 3 segments x 12 x 384 (c3la)
    assert table.loc["cla", "bound_term"] < table.loc["lora", "bound_term"] < table.loc["c3la", "bound_term"]
    summary_md = client.download_artifacts(out.parent_run_id, "summary/summary.md")
    assert "bound" in open(summary_md).read()


def test_sparta_analyze_reruns_the_analyses_and_logs_the_report(swept):
    out, uri, tmp = swept
    result = sparta("analyze", "analysis-tiny", "--tracking-uri", uri, "--examples", "16", "--landscape-points", "5",
                    "--landscape-points-2d", "3", "--out", str(tmp / "report"), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(uri)
    report = {f.path for f in client.list_artifacts(out.parent_run_id, "analysis-report")}
    assert {"analysis-report/report.md", "analysis-report/trials.csv", "analysis-report/bound-vs-gap.png",
            "analysis-report/intruders.png", "analysis-report/landscapes.png"} <= report
    text = (tmp / "report" / "report.md").read_text()
    assert "Spearman ρ" in text and "over 3 methods" in text
    rows = {r[0]: r for r in markdown_rows(text) if r and r[0] in ("lora", "cla", "c3la")}
    assert set(rows) == {"lora", "cla", "c3la"}
    for run in trial_runs(client, out.parent_run_id):   # the rerun's values replaced the trial's final ones
        m = run.data.metrics
        assert m["final/analysis/gap"] == pytest.approx(m["final/analysis/test_loss"]
                                                        - m["final/analysis/train_eval_loss"])
        assert {"spectrum.csv", "landscape-merged-1d.csv"} <= {
            f.path.split("/", 1)[1] for f in client.list_artifacts(run.info.run_id, "analysis")}


def test_analyze_by_run_id_with_bounds_only_reads_the_rest_from_the_trials_runs(swept):
    out, uri, tmp = swept
    folder = tmp / "bounds-only"
    result = sparta("analyze", out.parent_run_id, "--tracking-uri", uri, "--analyses", "bounds", "--out", str(folder))
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"report.md", "trials.csv", "bound-vs-gap.png", "intruders.png", "landscapes.png"} <= {
        p.name for p in folder.iterdir()}
    trials = pd.read_csv(folder / "trials.csv")
    assert len(trials) == 3 and trials["gap"].notna().all() and trials["intruders_eps0.5"].notna().all()


def test_bad_targets_and_analyses_are_clear_errors(swept):
    _, uri, _ = swept
    bad = sparta("analyze", "no-such-experiment", "--tracking-uri", uri)
    assert bad.returncode == 2 and "neither an MLflow experiment nor a run id" in bad.stderr
    bad = sparta("analyze", "analysis-tiny", "--tracking-uri", uri, "--analyses", "gap,hessian")
    unboxed = " ".join(re.sub(r"[│╭╮╰╯─]", " ", bad.stderr).split())   # typer's error panel wraps the line
    assert bad.returncode == 2 and "unknown analysis 'hessian'; valid: gap, bounds" in unboxed
