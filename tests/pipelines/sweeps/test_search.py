"""search.algorithm: grid (today's trials and keys), random (seeded draws, lists as choices) and optuna
(`pipelines.sweeps.search.CellSearch`: one seeded Optuna study per model x dataset x method x seed cell,
driven here without Ray: Tune calls suggest / on_trial_complete the same way); spec errors."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipelines.spec_fields import SpecError
from pipelines.sweeps.search import CellSearch, grid_space, tune_search
from pipelines.sweeps.spec import OBJECTIVE_METRICS, SweepSpec, load_spec

TINY = Path(__file__).resolve().parents[3] / "examples" / "sweep-tiny.yaml"


def spec(search: dict, **changes) -> SweepSpec:
    base = load_spec(TINY).model_dump(mode="json")
    base.update(search=search, **changes)
    return SweepSpec.model_validate(base)


def test_grid_keeps_the_trial_keys_and_draws_of_before():
    """The keys and sampled values the grid expansion gave before search.algorithm existed (sparta 03c036e)."""
    s = spec({"lr": {"loguniform": [1e-4, 1e-2]}, "rank": [4, 8], "alpha": [None, 32.0], "num_samples": 2,
              "seed": 3, "by_method": {"cla": {"rank": 2, "weight_decay": [0.0, 0.1]}}})
    trials = s.trials()
    assert len(trials) == s.n_trials == 32   # lora: 2 x 2 x 2 samples, cla: 2 x 2 x 2, x 2 seeds
    got = [(t["trial_key"], t["lr"], t["alpha"]) for t in trials]
    prefix = "minilm-l6/movie-reviews-binary"
    assert got[:3] == [(f"{prefix}/lora/seed0/lr=9.8607e-4,rank=4,alpha=auto,sample=0", 0.0009860670040274138, 8.0),
                       (f"{prefix}/lora/seed0/lr=8.5471e-3,rank=4,alpha=auto,sample=1", 0.008547077039055846, 8.0),
                       (f"{prefix}/lora/seed0/lr=5.1125e-3,rank=4,alpha=32,sample=0", 0.005112497534862243, 32.0)]
    cla = [g for g in got if "/cla/" in g[0]]
    assert cla[0] == (f"{prefix}/cla/seed0/lr=9.8607e-4,alpha=auto,weight_decay=0,sample=0", 0.0009860670040274138, 4.0)
    assert [t["trial_key"] for t in spec({"lr": [1e-3, 3e-3]}).trials()][:2] == [
        f"{prefix}/lora/seed0/lr=1e-3", f"{prefix}/lora/seed0/lr=3e-3"]
    space = grid_space(s, Path("/tmp/x"))["trial"]["grid_search"]
    assert [e["params"]["trial_key"] for e in space] == [t["trial_key"] for t in trials]
    assert {e["params"]["search.algorithm"] for e in space} == {"grid"}


def test_random_draws_lists_as_choices_seeded_and_paired_across_cells():
    search = {"algorithm": "random", "lr": {"loguniform": [1e-4, 1e-2]}, "rank": [4, 8, 16], "num_samples": 6,
              "seed": 1}
    s = spec(search)
    trials = s.trials()
    assert len(trials) == s.n_trials == 6 * 4   # num_samples per cell, 4 cells (2 methods x 2 seeds)
    cells = {}
    for t in trials:
        cells.setdefault((t["method"], t["seed"]), []).append((t["lr"], t["rank"]))
        assert 1e-4 <= t["lr"] <= 1e-2 and t["rank"] in (4, 8, 16) and t["alpha"] == 2.0 * t["rank"]
    draws = list(cells.values())
    assert all(d == draws[0] for d in draws)              # every cell sees the same draws: paired
    assert len({r for _, r in draws[0]}) > 1              # the list is sampled, not expanded
    assert trials[0]["trial_key"].endswith(f",rank={trials[0]['rank']},sample=0") and "/lr=" in trials[0]["trial_key"]
    assert [t["lr"] for t in spec(search).trials()] == [t["lr"] for t in trials]            # reproducible
    assert [t["lr"] for t in spec({**search, "seed": 2}).trials()] != [t["lr"] for t in trials]


def test_the_tune_search_space_uses_tunes_domains():
    from ray.tune.search.sample import Categorical, Float, LogUniform

    s = spec({"algorithm": "optuna", "lr": {"loguniform": [1e-4, 1e-2]}, "rank": [4, 8],
              "weight_decay": {"uniform": [0.0, 0.1]}, "num_samples": 2})
    space = s.search.tune_space()
    assert set(space) == {"lr", "rank", "weight_decay"}     # constants are not searched
    assert isinstance(space["lr"], Float) and isinstance(space["lr"].get_sampler(), LogUniform)
    assert (space["lr"].lower, space["lr"].upper) == (1e-4, 1e-2)
    assert isinstance(space["rank"], Categorical) and space["rank"].categories == [4, 8]
    grid = spec({"lr": [1e-3, 2e-3], "rank": 8}).search.tune_space()
    assert grid == {"lr": {"grid_search": [1e-3, 2e-3]}}


def run_cells(search: CellSearch, results=lambda i, cfg: {"val_accuracy": 0.5}) -> list[dict]:
    """Drive the searcher as Tune does, one trial at a time: suggest, then complete with `results`."""
    out = []
    while True:
        cfg = search.suggest(f"t{len(out)}")
        if cfg == CellSearch.FINISHED:
            return out
        out.append(cfg["trial"])
        search.on_trial_complete(f"t{len(out) - 1}", {**results(len(out) - 1, cfg), "training_iteration": 1})


def test_optuna_cells_take_turns_and_are_seeded(tmp_path):
    search = {"algorithm": "optuna", "lr": {"loguniform": [1e-4, 1e-2]}, "rank": [4, 8], "num_samples": 3,
              "seed": 5}
    s = spec(search)
    entries = run_cells(CellSearch(s, tmp_path))
    assert len(entries) == s.n_trials == 12
    cells = [(e["params"]["method"], e["params"]["seed"]) for e in entries]
    assert cells[:4] == [("lora", 0), ("lora", 1), ("cla", 0), ("cla", 1)] and cells[4:8] == cells[:4]
    keys = [e["params"]["trial_key"] for e in entries]
    assert len(set(keys)) == 12 and keys[0].endswith(",sample=0") and keys[4].endswith(",sample=1")
    for e in entries:
        p = e["params"]
        assert 1e-4 <= p["lr"] <= 1e-2 and p["rank"] in (4, 8) and p["search.algorithm"] == "optuna"
        assert e["train"]["lr"] == p["lr"] and e["train"]["trial_key"] == p["trial_key"]
    again = run_cells(CellSearch(spec(search), tmp_path))
    assert [e["params"]["trial_key"] for e in again] == keys                       # the seed fixes the draws
    other = run_cells(CellSearch(spec({**search, "seed": 6}), tmp_path))
    assert [e["params"]["lr"] for e in other] != [e["params"]["lr"] for e in entries]


def test_optuna_learns_from_each_cells_own_results(tmp_path):
    """Every finished trial is told to its own cell's study, with the objectives it reported; after its
    startup draws, TPE moves towards what scored well."""
    s = spec({"algorithm": "optuna", "lr": {"loguniform": [1e-4, 1e-2]}, "num_samples": 30, "seed": 0},
             methods=["lora"], seeds=[0])
    search = CellSearch(s, tmp_path)
    score = lambda i, cfg: {"val_accuracy": -abs(math.log10(cfg["trial"]["params"]["lr"]) + 3.5)}  # noqa: E731
    entries = run_cells(search, score)
    study = search.studies[0]._ot_study
    assert len(study.trials) == 30 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert study.best_value == max(score(0, {"trial": e})["val_accuracy"] for e in entries)
    late = [abs(math.log10(e["params"]["lr"]) + 3.5) for e in entries[20:]]
    early = [abs(math.log10(e["params"]["lr"]) + 3.5) for e in entries[:10]]   # TPE's random startup
    assert sum(late) / len(late) < sum(early) / len(early) / 2


def test_a_restored_searcher_continues_every_study(tmp_path):
    """Tune saves the searcher with its state; a resumed sweep's searcher picks up where it stopped: the
    same trials issued, the same studies (their told results), the next draws those of the seed."""
    s = spec({"algorithm": "optuna", "lr": {"loguniform": [1e-4, 1e-2]}, "num_samples": 4, "seed": 3},
             methods=["lora"], seeds=[0])
    first = CellSearch(s, tmp_path)
    issued = [first.suggest(f"t{i}")["trial"]["params"]["trial_key"] for i in range(2)]
    first.on_trial_complete("t0", {"val_accuracy": 0.6, "training_iteration": 1})
    first.save(str(tmp_path / "searcher.pkl"))
    resumed = CellSearch(s, tmp_path)
    resumed.restore(str(tmp_path / "searcher.pkl"))
    assert resumed.issued == [2] and set(resumed.owner) == {"t0", "t1"}
    assert [t.values for t in resumed.studies[0]._ot_study.trials if t.values] == [[0.6]]
    resumed.on_trial_complete("t1", {"val_accuracy": 0.7, "training_iteration": 1})   # the one still running
    later = [resumed.suggest(f"t{i}")["trial"]["params"]["trial_key"] for i in (2, 3)]
    fresh = CellSearch(s, tmp_path)
    assert issued + later == [fresh.suggest(f"x{i}")["trial"]["params"]["trial_key"] for i in range(4)]
    assert resumed.suggest("t4") == CellSearch.FINISHED


def test_two_objectives_make_a_multi_objective_study(tmp_path):
    s = spec({"algorithm": "optuna", "lr": {"loguniform": [1e-4, 1e-2]}, "num_samples": 2},
             objectives=[{"metric": "val_accuracy", "mode": "max"}, {"metric": "peak_mem_mib", "mode": "min"}],
             methods=["lora"], seeds=[0])
    search = CellSearch(s, tmp_path)
    run_cells(search, lambda i, cfg: {"val_accuracy": 0.5 + i / 10, "peak_mem_mib": 100.0 - i})
    study = search.studies[0]._ot_study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert [t.values for t in study.trials] == [[0.5, 100.0], [0.6, 99.0]]
    space, config = tune_search(s, tmp_path)
    assert space == {} and config["num_samples"] == 2 and config["search_alg"].max_concurrent == s.max_concurrent


@pytest.mark.parametrize("cpus,threads", [(0.45, 1), (1, 1), (1.9, 2), (4, 4)])
def test_a_trials_workers_train_on_threads_matching_their_reservation(cpus, threads, tmp_path):
    from pipelines.sweeps.driver import worker_config
    from workers.training.trial import THREADS_KEY

    s = spec({"lr": 1e-3}, resources={"cpus_per_worker": cpus})
    (entry, *_) = grid_space(s, tmp_path)["trial"]["grid_search"]
    got = worker_config(entry)
    assert got[THREADS_KEY] == threads and {k: v for k, v in got.items() if k != THREADS_KEY} == entry["train"]


@pytest.mark.parametrize("changes,field,message", [
    ({"search": {"algorithm": "bayes"}}, "search.algorithm", "'grid', 'random' or 'optuna'"),
    ({"search": {"algorithm": "optuna"}}, "search.algorithm", "optuna needs a parameter to search"),
    ({"search": {"algorithm": "random", "lr": 1e-3}}, "search.algorithm", "random needs a parameter to search"),
    ({"objectives": [{"metric": "val_acc", "mode": "max"}]}, "objectives[0].metric",
     "unknown metric 'val_acc'; valid: " + ", ".join(OBJECTIVE_METRICS)),
    ({"objectives": [{"metric": "val_loss", "mode": "down"}]}, "objectives[0].mode", "'max' or 'min'"),
    ({"objectives": [{"metric": "val_loss", "mode": "min"}, {"metric": "val_loss", "mode": "min"}]},
     "objectives[1].metric", "duplicate objective 'val_loss'"),
    ({"objectives": []}, "objectives", "give at least one"),
])
def test_bad_search_settings_are_spec_errors_naming_the_choices(changes, field, message):
    base = load_spec(TINY).model_dump(mode="json")
    base.update(changes)
    with pytest.raises(SpecError) as err:
        SweepSpec.model_validate(base)
    assert f"{field}: " in str(err.value) and message in str(err.value)
