"""How a sweep hands its trials to Ray Tune, per `search.algorithm`.

- grid and random: every trial is known before the sweep starts (`SweepSpec.trials()`, seeded), so Tune
  gets them as one `tune.grid_search` over the trials' configs; their keys never depend on Tune.
- optuna: `CellSearch`, a Tune `Searcher`, keeps one `ray.tune.search.optuna.OptunaSearch` (TPE, seeded) per
  (model, dataset, method, seed) cell over that method's Tune search space (`SearchSpec.tune_space`), and
  asks the cells in turn until each has `num_samples` trials; every finished trial's objectives go back to
  its own cell's study. One study per cell keeps methods (whose spaces and scales differ) from steering
  each other's search, and every cell gets its share of the trials.

Each trial's Tune config is {"trial": entry}, `entry` holding its MLflow params, training config, run name,
storage and resources (`trial_entry`).
"""
from __future__ import annotations

import pickle

from ray import tune
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch


def train_run_name(trial_key: str) -> str:
    """The trial's Ray Train run: its folder under the sweep's `trials/` (checkpoints), the same on a restart."""
    from workers.data.assets import path_safe

    return "trial-" + path_safe(trial_key)


def trial_entry(spec, trial: dict, storage, extra_train: dict | None = None) -> dict:
    """What one trial's Tune trainable receives: its params (for MLflow), training config, resources."""
    train = {**spec.trial_config(trial), **(extra_train or {})}
    resources = {f"resources.{k}": v for k, v in spec.resources.model_dump().items()}
    # the child run's params: the trial's own values, then the shared training settings and resources
    params = {**trial, **{f"train.{k}": v for k, v in train.items() if k not in trial}, **resources,
              "search.algorithm": spec.search.algorithm}
    return {"params": params, "train": train,
            "run_name": train_run_name(trial["trial_key"]),
            "storage_path": str(storage / "trials"), "resources": spec.resources.model_dump(),
            "max_failures": spec.max_failures}


def grid_space(spec, storage, extra_train: dict | None = None) -> dict:
    """Grid and random: one grid entry per trial of the spec."""
    return {"trial": tune.grid_search([trial_entry(spec, t, storage, extra_train) for t in spec.trials()])}


class CellSearch(Searcher):
    """Optuna per (model, dataset, method, seed) cell; see the module docstring."""

    def __init__(self, spec, storage, extra_train: dict | None = None):
        import optuna

        objectives = spec.objective_list
        metric = [o.metric for o in objectives] if len(objectives) > 1 else objectives[0].metric
        mode = [o.mode for o in objectives] if len(objectives) > 1 else objectives[0].mode
        super().__init__(metric=None, mode=None)   # per-cell studies hold the objectives
        self.spec, self.storage, self.extra_train = spec, storage, extra_train
        self.cells = spec.cells()
        self.searches = [spec.search.for_method(c["method"]) for c in self.cells]
        self.studies = []
        for search in self.searches:
            # The same seed in every cell: the startup draws (random until TPE has results) are paired
            # across models, datasets, methods and seeds, as grid and random draws are.
            sampler = optuna.samplers.TPESampler(seed=search.seed)
            self.studies.append(OptunaSearch(space=OptunaSearch.convert_search_space(search.tune_space()),
                                             metric=metric, mode=mode, sampler=sampler))
        self.issued = [0] * len(self.cells)
        self.owner: dict[str, int] = {}   # Tune trial id -> cell index

    def suggest(self, trial_id: str):
        cell = min(range(len(self.cells)), key=lambda i: (self.issued[i], i))   # the cells take turns
        if self.issued[cell] >= self.searches[cell].num_samples:
            return Searcher.FINISHED
        values = self.studies[cell].suggest(trial_id)
        if values is None or values == Searcher.FINISHED:
            return values
        label, values = self.searches[cell].point(values, self.issued[cell])
        self.issued[cell] += 1
        self.owner[trial_id] = cell
        trial = self.spec.trial(self.cells[cell], label, values)
        return {"trial": trial_entry(self.spec, trial, self.storage, self.extra_train)}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.owner and all(o.metric in result for o in self.spec.objective_list):
            self.studies[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.owner:
            self.studies[self.owner[trial_id]].on_trial_complete(trial_id, result, error)

    # Tune saves the searcher with its experiment state: a resumed sweep continues every study.
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


def tune_search(spec, storage, extra_train: dict | None = None) -> tuple[dict, dict]:
    """(param_space, TuneConfig keyword arguments) for the spec's search algorithm."""
    if spec.search.algorithm == "optuna":
        search = ConcurrencyLimiter(CellSearch(spec, storage, extra_train), max_concurrent=spec.max_concurrent)
        return {}, {"search_alg": search, "num_samples": spec.n_trials}
    return grid_space(spec, storage, extra_train), {}
