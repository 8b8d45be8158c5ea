"""The Model Registry side of a sweep: the best adapter per model x dataset logged as a pyfunc model
("models from code": base model + adapter folder) and registered, and loading it back offline.

    registered = register_best(client, tracking_uri, parent_run_id, trials, summary_df)
    model, tok = load_registered("models:/sparta-smollm2-135m-movie-reviews@champion")

Each registered model's alias `champion` names its best version over all sweeps: a new version takes it only
if its val metric strictly beats the champion's (ties keep the champion).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
from mlflow import MlflowClient

from pipelines.mlflow_store import resolve_tracking_uri, safe_name, scoped_tracking_uri
from pipelines.sweeps import summary as summ

log = logging.getLogger(__name__)

ADAPTER_ARTIFACT = "adapter"            # where a trial's adapter folder lies in its run's artifacts
ANALYSIS_ARTIFACT = "analysis"          # and its analyses' CSV + PNG files (beside the adapter in the checkpoint)
CHAMPION = "champion"                   # the alias of a registered model's best version so far


@dataclass
class RegisteredAdapter:
    """One adapter put into the Model Registry by `SweepTracker.finish`."""

    name: str
    version: str
    model: str
    dataset: str
    method: str
    trial_key: str
    run_id: str | None
    champion: bool = False                  # whether this version took the `champion` alias
    previous_champion: str | None = None    # the version that held it before, if any

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def champion_uri(self) -> str:
        """The registered model's champion, whichever version holds it now."""
        return champion_uri(self.name)


def register_best(client: MlflowClient, tracking_uri: str, parent_run_id: str, trials: list[dict], df,
                  prefix: str = "sparta") -> list[RegisteredAdapter]:
    """Register the best trial's adapter per model x dataset (`summary.best_trials`) under
    `<prefix>-<model>-<dataset>`, logged in the sweep's parent run; `df` is the sweep's summary table."""
    best = summ.best_trials(trials)
    if not best:
        return []
    done = []
    with tempfile.TemporaryDirectory() as tmp, scoped_tracking_uri(tracking_uri), \
            mlflow.start_run(run_id=parent_run_id, nested=mlflow.active_run() is not None):
        # Resuming the parent run: log_model links the model to the active run. Leaving this block
        # ends the run (FINISHED); the tracker sets the final status right after.
        code = Path(tmp) / "sparta_adapter_model.py"   # "models from code": a script, not a pickle
        code.write_text(_MODEL_CODE)
        for (model, dataset), trial in best.items():
            adapter = _fetch_adapter(client, trial, Path(tmp) / safe_name(f"{model}-{dataset}"))
            if adapter is None:
                log.warning("best trial %s of %s x %s has no adapter; nothing registered",
                            trial["params"].get("trial_key"), model, dataset)
                continue
            row = df[(df["model"] == str(model)) & (df["dataset"] == str(dataset))
                     & (df["method"] == str(trial["params"]["method"]))].iloc[0]
            done.append(_register(client, parent_run_id, trial, adapter, code, row, prefix))
    return done


def _fetch_adapter(client: MlflowClient, trial: dict, dst: Path) -> Path | None:
    """The trial's adapter as recorded in its child run (the system of record), else its local folder."""
    run_id = trial.get("run_id")
    if run_id and client.list_artifacts(run_id, ADAPTER_ARTIFACT):
        dst.mkdir(parents=True, exist_ok=True)
        return Path(client.download_artifacts(run_id, ADAPTER_ARTIFACT, str(dst)))
    local = trial.get("adapter_dir")
    return Path(local) if local and Path(local).is_dir() else None


def _register(client: MlflowClient, parent_run_id: str, trial: dict, adapter: Path, code: Path, row,
              prefix: str) -> RegisteredAdapter:
    params, final = trial["params"], trial["final"]
    metric = summ.metric_name(trial)
    model, dataset, method = str(params["model"]), str(params["dataset"]), str(params["method"])
    name = registered_model_name(model, dataset, prefix)
    config = adapter_model_config(params, adapter)
    info = mlflow.pyfunc.log_model(
        name=safe_name(f"adapter-{model}-{dataset}"), python_model=str(code),
        artifacts={"adapter": str(adapter)}, model_config=config,
        pip_requirements=pip_requirements(),   # explicit: no import-time inference, no network
        params={"base_model": model, "method": method, "trial_key": str(params.get("trial_key"))})
    val = final.get(f"val_{metric}")
    tags = {"base_model": model, "dataset": dataset, "method": method, "task": config["task"],
            "trial_key": str(params.get("trial_key")), "seed": str(params.get("seed")),
            "metric": metric, "mode": metric_mode(metric), f"val_{metric}": str(val),
            f"val_{metric}_mean": str(row["val_mean"]), f"test_{metric}_mean": str(row["test_mean"]),
            "n_seeds": str(row["n_seeds"]), "sweep_run_id": parent_run_id,
            "trial_run_id": str(trial.get("run_id"))}
    with contextlib.redirect_stderr(io.StringIO()):   # MLflow prints "Successfully registered ..." there
        mv = mlflow.register_model(info.model_uri, name, tags=tags)
    MlflowClient().update_registered_model(
        name, description=f"Best sparta adapter for {model} on {dataset}: highest mean-over-seeds val "
                          f"{metric} of a sweep; base model + adapter folder, loadable with "
                          f"pipelines.sweeps.registry.load_registered. Alias {CHAMPION!r}: the version with "
                          f"the best val {metric} over all sweeps.")
    if trial.get("run_id"):
        client.set_tag(trial["run_id"], "sparta.registered_model", f"{name}/{mv.version}")
    crowned, previous = claim_champion(client, name, str(mv.version), tags)
    return RegisteredAdapter(name, str(mv.version), model, dataset, method,
                             str(params.get("trial_key")), trial.get("run_id"), crowned, previous)


# -- the champion alias ----------------------------------------------------------------------------
def champion_uri(name: str) -> str:
    return f"models:/{name}@{CHAMPION}"


def metric_mode(metric: str) -> str:
    """"max" or "min": the direction the sweep's summary ranks `metric` in."""
    return "max" if summ.higher_is_better(metric) else "min"


def current_champion(client: MlflowClient, name: str):
    """The version holding `champion` (a ModelVersion), or None when no version holds it yet."""
    # The registered model's alias map, not get_model_version_by_alias: a missing alias is then plain
    # data, where the lookup raises a generic INVALID_PARAMETER_VALUE shared with other errors.
    version = client.get_registered_model(name).aliases.get(CHAMPION)
    return None if version is None else client.get_model_version(name, str(version))


def claim_champion(client: MlflowClient, name: str, version: str, tags: dict[str, str]) -> tuple[bool, str | None]:
    """Give `version` (registered with `tags`) the `champion` alias if there is no champion yet or it
    strictly beats the champion's val metric; (whether it did, the champion's version before)."""
    held = current_champion(client, name)
    previous = None if held is None else str(held.version)
    if held is not None and not _beats(tags, held.tags, f"{name}/{version}", f"{name}/{previous}"):
        return False, previous
    client.set_registered_model_alias(name, CHAMPION, version)
    return True, previous


def _beats(new: dict[str, str], old: dict[str, str], new_label: str, old_label: str) -> bool:
    """Is the version tagged `new` strictly better than the one tagged `old` on their val metric?"""
    metric = new["metric"]
    mode = new.get("mode") or metric_mode(metric)
    old_metric = old.get("metric")
    old_mode = old.get("mode") or (metric_mode(old_metric) if old_metric else None)
    if (old_metric, old_mode) != (metric, mode):
        # Another metric (or a version not registered by a sweep): not comparable; moving the alias is
        # then a person's call (MlflowClient.set_registered_model_alias).
        log.warning("%s is not compared with champion %s: val %s (%s) vs %s (%s); champion kept", new_label,
                    old_label, metric, mode, old_metric or "no metric", old_mode or "-")
        return False
    a, b = summ.to_float(new.get(f"val_{metric}")), summ.to_float(old.get(f"val_{metric}"))
    if math.isnan(b):
        return not math.isnan(a)   # a measured value beats a champion without one
    return a > b if mode == "max" else a < b


# -- the registry's model --------------------------------------------------------------------------
def registered_model_name(model: str, dataset: str, prefix: str = "sparta") -> str:
    """`sparta-<model>-<dataset>`, with a folder path reduced to its last part and characters the
    registry refuses ("/", ":") or that read badly in URIs replaced by "-"."""
    base = Path(model).name if ("/" in model or os.sep in model) else model
    return safe_name(f"{prefix}-{base}-{dataset}")


def pip_requirements() -> list[str]:
    """What a registered adapter needs, pinned to this environment (sparta itself included)."""
    reqs = []
    for dist in ("sparta", "mlflow", "torch", "transformers", "safetensors"):
        try:
            reqs.append(f"{dist}=={importlib.metadata.version(dist).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def _head_num_labels(adapter_dir: Path) -> int | None:
    """The adapter's task head size, if it carries a head (a classifier); None for a causal LM."""
    from safetensors import safe_open

    from adapters.handle import WEIGHTS_FILE

    with safe_open(str(adapter_dir / WEIGHTS_FILE), framework="numpy") as f:
        shapes = [f.get_slice(k).get_shape() for k in f.keys() if k.startswith("head.") and k.endswith(".weight")]
    rows = [s[0] for s in shapes if len(s) == 2]
    return min(rows) if rows else None   # the output projection: (num_labels, hidden)


def base_task(model: str) -> str:
    """The task a base model is loaded for when nothing says otherwise: encoders classify, causal LMs
    generate (workers.data.assets.model_kind, the rule the spec and the training loop use too)."""
    from workers.data.assets import model_kind

    return "causal_lm" if model_kind(model) == "causal" else "classification"


def adapter_model_config(params: dict, adapter_dir: str | os.PathLike) -> dict:
    """The pyfunc model config of a registered adapter: how to rebuild its base model offline.

    task: params["task"], else "classification" when the adapter carries a task head, else the base's
    kind; num_labels: params["num_labels"], else the head's size; model_overrides: params
    ["model_overrides"] (config fields given to workers.data.assets.load_model at training)."""
    adapter_dir = Path(adapter_dir)
    model = str(params["model"])
    head = _head_num_labels(adapter_dir)
    task = params.get("task") or ("classification" if head else base_task(model))
    num_labels = params.get("num_labels") or (head if task == "classification" else None)
    return {"base_model": model, "task": task, "num_labels": num_labels,
            "model_overrides": dict(params.get("model_overrides") or {}),
            "method": str(params.get("method")), "trial_key": str(params.get("trial_key"))}


class AdapterModel(mlflow.pyfunc.PythonModel):
    """A registered sparta adapter: artifact "adapter" is the adapter folder; the model config names the
    base model (alias, folder or random:<arch>-tiny), task, num_labels and config overrides.

    `unwrap_python_model()` gives this object: `.adapter_dir`, `.base_model`, `.task`, and `.load()`
    for (model, tokenizer). `predict` takes texts and returns labels (classification) or greedy
    continuations (causal LM, `max_new_tokens` from params, default 32).
    """

    def load_context(self, context) -> None:
        cfg = dict(context.model_config or {})
        self.adapter_dir = Path(context.artifacts["adapter"])
        self.base_model = cfg["base_model"]
        self.task = cfg["task"]
        self.num_labels = cfg.get("num_labels")
        self.model_overrides = dict(cfg.get("model_overrides") or {})
        self.method = cfg.get("method")
        self.trial_key = cfg.get("trial_key")
        self._cached = None

    def load(self, merge: bool = False, dtype=None):
        """(model, tokenizer): the base model loaded offline with the adapter applied (`merge=True`
        folds it into plain layers, as serving wants), in eval mode."""
        import adapters
        from workers.data.assets import load_model

        model, tok = load_model(self.base_model, task=self.task, num_labels=self.num_labels, dtype=dtype,
                                **self.model_overrides)
        handle = adapters.load(model, self.adapter_dir)
        if merge:
            model = handle.merge()
        return model.eval(), tok

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        import torch

        if self._cached is None:
            self._cached = self.load(merge=True)
        model, tok = self._cached
        if tok is None:
            raise ValueError(f"base model {self.base_model!r} has no tokenizer (a random tiny model): "
                             "predict needs one; use load() and feed token ids")
        texts = [str(t) for t in model_input]
        with torch.no_grad():
            if self.task == "classification":
                enc = tok(texts, return_tensors="pt", padding=True, truncation=True)
                ids = model(**enc).logits.argmax(-1).tolist()
                return [str(model.config.id2label.get(i, i)) for i in ids]
            tok.padding_side = "left"
            enc = tok(texts, return_tensors="pt", padding=True)
            out = model.generate(**enc, do_sample=False, pad_token_id=tok.pad_token_id,
                                 max_new_tokens=int((params or {}).get("max_new_tokens", 32)))
            return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


_MODEL_CODE = """from mlflow.models import set_model

from pipelines.sweeps.registry import AdapterModel

set_model(AdapterModel())
"""


def load_registered(uri: str, tracking_uri: str | None = None, *, merge: bool = False, dtype=None):
    """(model, tokenizer) of a registered adapter, e.g. "models:/sparta-smollm2-135m-movie-reviews/1": the
    base model loaded offline (workers.data.assets.load_model) with the adapter applied (adapters.load).
    Tokenizer is None for random tiny models."""
    with scoped_tracking_uri(resolve_tracking_uri(tracking_uri) if tracking_uri else None):
        pyfunc = mlflow.pyfunc.load_model(uri)
    inner = pyfunc.unwrap_python_model()
    if not isinstance(inner, AdapterModel):
        raise ValueError(f"{uri} is not a sparta adapter model (its python model is {type(inner).__name__})")
    return inner.load(merge=merge, dtype=dtype)


