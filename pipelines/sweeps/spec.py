"""The sweep spec: one YAML file (methods x models x datasets x seeds x hyper-parameters), validated
before anything heavy starts, and expanded into the flat per-trial configs the training loop takes.

    spec = load_spec("examples/sweep-tiny.yaml")     # SpecError (a ValueError) names the bad field
    for trial in spec.trials():                      # flat dicts of plain values, with a trial_key
        cfg = spec.trial_config(trial)               # + train / deepspeed settings for one trial

Importing this module pulls in only pydantic and PyYAML. The registries the names are checked
against (adapters.METHODS, workers.data.assets, workers.data.datasets) are imported on the first validation;
they import torch and transformers (a few seconds, once per process) but no model is ever loaded:
model names are checked with workers.data.assets.check_model_name and folders by their config.json.
"""
from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import random
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from pipelines.spec_fields import (FieldError, Section, SpecError, check_model, choices, field_path, read_yaml,
                                   resolve_path, validation_errors)
from workers.training.deepspeed_setup import check_deepspeed

# The Beyond-LoRA analyses a trial can run (workers.training.analysis.ANALYSES; a test keeps them equal).
Analysis = Literal["gap", "bounds", "spectrum", "intruders", "landscape"]
# The hyper-parameters a search may vary, in the order they appear in trials and trial keys.
HYPERPARAMS = ("lr", "rank", "alpha", "chain_segments", "lora_plus_ratio", "weight_decay")
DATA_SUFFIXES = (".csv", ".jsonl", ".parquet")
# What a trial reports that a search may optimise or a Pareto front may trade off (workers.training.loop's
# reports: val_/test_ scores per task, losses, cost).
OBJECTIVE_METRICS = ("val_accuracy", "val_mcc", "val_f1", "val_loss", "test_accuracy", "test_mcc", "test_f1",
                     "test_loss", "train_loss", "gen_gap", "gap", "samples_per_s", "wall_s", "peak_mem_mib",
                     "trainable_params")
# What `datasets.Dataset(Dict).save_to_disk` writes into a folder.
_HF_SAVED_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")


# -- registries (imported on first use: they import torch and transformers) -----------------------
@functools.cache
def _methods() -> tuple[str, ...]:
    from adapters import METHODS
    return tuple(METHODS)


@functools.cache
def _tasks() -> tuple[str, ...]:
    from workers.data.datasets import TASKS
    return tuple(TASKS)


def _missing_asset(name: str) -> str | None:
    from workers.data.datasets import missing_asset
    return missing_asset(name)


def _check_method(name: str) -> str:
    if name not in _methods():
        raise ValueError(f"unknown method {name!r}; valid: {choices(_methods())}")
    return name


def _unique(values: list, what: str) -> list:
    if not values:
        raise ValueError(f"empty list: give at least one {what}")
    seen = set()
    for i, v in enumerate(values):
        key = json.dumps(v, sort_keys=True, default=str)
        if key in seen:
            raise FieldError((i,), f"duplicate {what} {v!r}")
        seen.add(key)
    return values


def _changed(section: BaseModel, names: tuple[str, ...]) -> list[str]:
    """The fields among `names` that differ from their defaults. (Not model_fields_set: a dumped
    spec spells every default out, and must validate again to the same spec.)"""
    fields = type(section).model_fields
    return [n for n in names if getattr(section, n) != fields[n].get_default(call_default_factory=True)]


# -- the sections ----------------------------------------------------------------------------------
class DatasetSpec(Section):
    """One dataset: a built-in task (`name` only, or the plain string) or a local table."""

    name: str | None = None
    path: str | None = None
    train: str | None = None
    validation: str | None = None
    test: str | None = None
    text: str = "text"
    label: str = "label"
    split: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @property
    def builtin(self) -> bool:
        return self.path is None and self.train is None

    @field_validator("path", "train", "validation", "test")
    @classmethod
    def _exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        path = resolve_path(value, info)
        if path.is_dir():
            if not any((path / m).is_file() for m in _HF_SAVED_MARKERS):
                raise ValueError(f"{path} is a folder but not a saved Hugging Face dataset (none of "
                                 f"{choices(_HF_SAVED_MARKERS)} in it)")
        elif not path.is_file():
            raise ValueError(f"no such file or folder: {path}")
        elif path.suffix.lower() not in DATA_SUFFIXES:
            raise ValueError(f"unsupported file type {path.suffix!r} ({path}); valid: "
                             f"{choices(DATA_SUFFIXES)} files or a saved Hugging Face dataset folder")
        return str(path)

    @model_validator(mode="after")
    def _shape(self) -> DatasetSpec:
        files = [f for f in ("validation", "test") if getattr(self, f) is not None]
        if self.builtin:
            if self.name is None:
                raise FieldError((), f"give a built-in name ({choices(_tasks())}) or a `path` or `train` file")
            if self.name not in _tasks():
                raise FieldError((), f"unknown dataset {self.name!r}; valid: {choices(_tasks())}, or a "
                              "mapping with `path` (CSV/JSONL/Parquet file or saved HF dataset "
                              "folder) and `text`/`label` columns")
            extra = _changed(self, ("validation", "test", "text", "label", "split"))
            if extra:
                raise FieldError((extra[0],), f"only for a dataset from files; {self.name!r} is built in")
            missing = _missing_asset(self.name)
            if missing:   # before any trial starts, not in each trial's worker
                raise FieldError((), missing)
            return self
        if self.path is not None and self.train is not None:
            raise FieldError(("train",), "give either `path` (one table, optionally with a `split` column) or "
                                  "`train` (with optional `validation`/`test` files), not both")
        if self.path is not None and files:
            raise FieldError((files[0],), "separate split files go with `train`, not with `path`")
        if self.train is not None and self.split is not None:
            raise FieldError(("split",), "a `split` column goes with `path`, not with separate `train` files")
        if self.name is None:   # the label in trial keys: the table's file name, or the train file's folder
            source = Path(self.path) if self.path is not None else Path(self.train).parent
            object.__setattr__(self, "name", source.stem if self.path is not None else source.name)
        if self.name in _tasks():
            raise FieldError(("name",), f"{self.name!r} is a built-in dataset; give this table another `name`")
        return self

    def reference(self) -> str | dict:
        """What a trial config carries: the built-in name, or a plain dict of absolute paths and columns."""
        if self.builtin:
            return self.name
        return self.model_dump()


def _check_dataset_name(ds: DatasetSpec) -> DatasetSpec:
    if "/" in ds.name:
        raise FieldError(("name",), f"dataset name {ds.name!r} must not contain '/' (it is part of trial keys)")
    return ds


class _Param:
    """The values one hyper-parameter may take: its type and lower bound."""

    def __init__(self, kind: type, low: float, inclusive: bool, nullable: bool = False):
        self.kind, self.low, self.inclusive, self.nullable = kind, low, inclusive, nullable

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        bound = f"{'>=' if self.inclusive else '>'} {self.low:g}"
        return f"{what} {bound}" + (" or null" if self.nullable else "")

    def value(self, v: Any, path: tuple = ()) -> Any:
        if v is None and self.nullable:
            return None
        ok_type = isinstance(v, int) if self.kind is int else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok_type or not math.isfinite(v):
            raise FieldError(path, f"expected {self.describe()}, got {v!r}")
        if not (v >= self.low if self.inclusive else v > self.low):
            raise FieldError(path, f"expected {self.describe()}, got {v!r}")
        return self.kind(v)

    def space(self, v: Any) -> list | dict:
        """Normalise one search field: a scalar -> [scalar] (a one-point grid); a list -> a grid; a
        {loguniform|uniform: [low, high]} or {choice: [...]} mapping -> a sampled parameter."""
        if isinstance(v, list):
            if not v:
                raise FieldError((), "empty list: give at least one value")
            values = [self.value(x, (i,)) for i, x in enumerate(v)]
            for i, x in enumerate(values):
                if x in values[:i]:
                    raise FieldError((i,), f"duplicate grid value {x!r}")
            return values
        if not isinstance(v, dict):
            try:
                return [self.value(v)]
            except FieldError as e:
                raise FieldError((), f"{e}; or a list of such values (a grid), or "
                              f"{{{choices(SAMPLERS)}: ...}} to sample") from None
        if len(v) != 1 or next(iter(v)) not in SAMPLERS:
            raise FieldError((), f"a sampling spec is one of {{{choices(SAMPLERS)}: ...}}, got {v!r}")
        (sampler, args), = v.items()
        if sampler == "choice":
            if not isinstance(args, list) or not args:
                raise FieldError((sampler,), "choice needs a non-empty list of values")
            return {sampler: [self.value(x, (sampler, i)) for i, x in enumerate(args)]}
        if self.kind is int:
            raise FieldError((sampler,), f"{sampler} draws real numbers; for an integer parameter use a list "
                                  "(grid) or {choice: [...]}")
        if not isinstance(args, list) or len(args) != 2:
            raise FieldError((sampler,), f"{sampler} needs [low, high], got {args!r}")
        low, high = (self.value(x, (sampler, i)) for i, x in enumerate(args))
        if low is None or high is None or not low < high:
            raise FieldError((sampler,), f"{sampler} needs low < high, got {args!r}")
        if sampler == "loguniform" and low <= 0:
            raise FieldError((sampler, 0), "loguniform needs low > 0")
        return {sampler: [low, high]}


SAMPLERS = ("loguniform", "uniform", "choice")
_PARAMS = {
    "lr": _Param(float, 0, inclusive=False),
    "rank": _Param(int, 1, inclusive=True),
    "alpha": _Param(float, 0, inclusive=False, nullable=True),
    "chain_segments": _Param(int, 1, inclusive=True),
    "lora_plus_ratio": _Param(float, 0, inclusive=False),
    "weight_decay": _Param(float, 0, inclusive=True),
}


def _draw(rng: random.Random, space: dict) -> Any:
    (sampler, args), = space.items()
    if sampler == "choice":
        return rng.choice(args)
    low, high = args
    if sampler == "uniform":
        v = rng.uniform(low, high)
    else:
        v = math.exp(rng.uniform(math.log(low), math.log(high)))
    return min(max(v, low), high)   # exp(log(x)) can round just past the bounds


def _fmt(v: Any) -> str:
    """Compact, stable text for trial keys: 1e-4, 0.01, 16, 3.2e-4."""
    if v is None:
        return "auto"
    if isinstance(v, float):
        if v != 0 and not 1e-2 <= abs(v) < 1e4:
            mantissa, exp = f"{v:.4e}".split("e")
            mantissa = mantissa.rstrip("0").rstrip(".")
            return f"{mantissa}e{int(exp)}"
        return f"{v:.5g}"
    return str(v)


class SearchSpec(Section):
    """Hyper-parameters: each a scalar, a list or a sampling spec, and how trials choose among them:
    - grid: every list is expanded whole; `num_samples` draws of the sampled ones per grid point, from an
      RNG seeded by `seed` and the grid point;
    - random: lists are choices too; `num_samples` draws of everything that varies, per (model, dataset,
      method, seed), seeded by `seed`;
    - optuna: Optuna's TPE (through ray.tune.search.optuna) picks `num_samples` trials per (model, dataset,
      method, seed) from the results so far, lists as categorical, seeded by `seed`."""

    algorithm: Literal["grid", "random", "optuna"] = "grid"

    lr: Any = 1e-3
    rank: Any = 16
    alpha: Any = None        # null: 2 * rank (the paper's default)
    chain_segments: Any = 3
    lora_plus_ratio: Any = 16.0
    weight_decay: Any = 0.0
    num_samples: int = Field(1, ge=1)
    seed: int = 0
    # Per-method values over the ones above, e.g. {full: {lr: 5e-5}}: methods differ in the rates they train at.
    by_method: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator(*HYPERPARAMS)
    @classmethod
    def _space(cls, v: Any, info: ValidationInfo) -> list | dict:
        return _PARAMS[info.field_name].space(v)

    @field_validator("by_method")
    @classmethod
    def _overrides(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for method, values in v.items():
            try:
                _check_method(method)
            except ValueError as e:
                raise FieldError((method,), str(e)) from None
            if not isinstance(values, dict) or not values:
                raise FieldError((method,), f"expected a mapping of hyper-parameters ({choices(HYPERPARAMS)}) "
                                            f"to values, got {values!r}")
            for param in values:
                if param not in HYPERPARAMS:
                    raise FieldError((method, param), f"unknown hyper-parameter; valid: {choices(HYPERPARAMS)}")
        return v

    def for_method(self, method: str) -> SearchSpec:
        """The search one method's trials run: its `by_method` values over the shared ones."""
        overrides = self.by_method.get(method)
        if not overrides:
            return self
        base = {p: getattr(self, p) for p in HYPERPARAMS}
        try:
            return SearchSpec.model_validate({**base, **overrides, "num_samples": self.num_samples,
                                              "seed": self.seed, "algorithm": self.algorithm})
        except ValidationError as e:   # a bad value: name it under by_method.<method>
            loc, msg = validation_errors(e, lambda _: SearchSpec)[0]
            raise FieldError(("by_method", method, *loc), msg) from None

    @model_validator(mode="after")
    def _samples_need_sampled(self) -> SearchSpec:
        if self.algorithm != "grid":
            if not self.varying():
                raise FieldError(("algorithm",), f"{self.algorithm} needs a parameter to search: a list or "
                                 f"{{{choices(SAMPLERS)}: ...}}")
        elif self.num_samples > 1 and not self.sampled():
            raise FieldError(("num_samples",), "num_samples > 1 needs at least one sampled parameter "
                                        f"({{{choices(SAMPLERS)}: ...}}); a grid is expanded whole")
        labels = set()
        for label, _ in self.points() if self.algorithm != "optuna" else ():
            if label in labels:   # grid values that differ only past the 5 digits trial keys show
                raise FieldError((), f"two grid points give the same trial key part {label!r}; make the "
                              "values differ in their first 5 digits")
            labels.add(label)
        for method in self.by_method:
            self.for_method(method)
        return self

    def grid(self) -> dict[str, list]:
        return {p: getattr(self, p) for p in HYPERPARAMS if isinstance(getattr(self, p), list)}

    def sampled(self) -> dict[str, dict]:
        return {p: getattr(self, p) for p in HYPERPARAMS if isinstance(getattr(self, p), dict)}

    def varying(self) -> list[str]:
        """The hyper-parameters that take more than one value, in HYPERPARAMS order."""
        grid, sampled = self.grid(), self.sampled()
        return [p for p in HYPERPARAMS if p in sampled or len(grid.get(p, ())) > 1]

    def constants(self) -> dict[str, Any]:
        """The hyper-parameters that take one value (alpha may be null: 2 * rank)."""
        return {p: getattr(self, p)[0] for p in HYPERPARAMS if p not in self.varying()}

    def tune_space(self) -> dict[str, Any]:
        """The varying hyper-parameters as a Ray Tune search space: tune.loguniform / uniform / choice for
        the sampled ones; lists as tune.grid_search (grid) or tune.choice (random, optuna)."""
        from ray import tune

        out = {}
        for p in self.varying():
            space = getattr(self, p)
            if isinstance(space, list):
                out[p] = tune.grid_search(space) if self.algorithm == "grid" else tune.choice(space)
            else:
                (sampler, args), = space.items()
                out[p] = tune.choice(args) if sampler == "choice" else getattr(tune, sampler)(*args)
        return out

    def point(self, values: dict[str, Any], sample: int | None = None) -> tuple[str, dict]:
        """(label, values) for one choice of the varying hyper-parameters (`values`, others constant): the
        label names what varies ("lr=1e-4,rank=8", and ",sample=k" for the k-th draw), the values hold
        every hyper-parameter (alpha resolved to 2 * rank if null)."""
        values = {**self.constants(), **values}
        values = {p: values[p] for p in HYPERPARAMS}
        # Labels show values as written (alpha null -> "auto"), so that [8, null] stay apart.
        label = ",".join(f"{p}={_fmt(values[p])}" for p in self.varying())
        if values["alpha"] is None:
            values["alpha"] = float(2 * values["rank"])
        if sample is not None:
            label += ("," if label else "") + f"sample={sample}"
        return label, values

    def points(self) -> list[tuple[str, dict]]:
        """(label, values) for every trial of one (model, dataset, method, seed), as `point` makes them:
        grid points x samples (grid), or `num_samples` draws (random). Optuna's are chosen as results come."""
        if self.algorithm == "optuna":
            raise ValueError("optuna chooses its trials from the results so far: there is no list in advance")
        grid, sampled = self.grid(), self.sampled()
        if self.algorithm == "random":   # lists are choices: every draw from one RNG per (model, ..., seed) cell
            rng = random.Random(f"sparta-search:{self.seed}:random")
            spaces = {p: {"choice": getattr(self, p)} if p in grid else sampled[p] for p in self.varying()}
            return [self.point({p: _draw(rng, sp) for p, sp in spaces.items()}, k) for k in range(self.num_samples)]
        out = []
        for index, combo in enumerate(itertools.product(*grid.values())):
            # One RNG per grid point: adding samples keeps the earlier draws; every model, dataset,
            # method and seed sees the same draws, so the comparison across them is paired.
            rng = random.Random(f"sparta-search:{self.seed}:{index}")
            for k in range(self.num_samples):
                values = dict(zip(grid, combo))
                values.update({p: _draw(rng, space) for p, space in sampled.items()})
                out.append(self.point(values, k if self.num_samples > 1 else None))
        return out

    @property
    def trials_per_cell(self) -> int:
        """Trials per (model, dataset, method, seed)."""
        if self.algorithm != "grid":
            return self.num_samples
        return math.prod(len(v) for v in self.grid().values()) * self.num_samples


class TrainSpec(Section):
    epochs: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(128, ge=8)
    eval_every: int | None = Field(None, ge=1)
    # auto: bf16 where a trial's worker runs it natively (CUDA, AMX / AVX-512 BF16 CPUs), fp32 elsewhere
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    framing: Literal["auto", "classification", "generation"] = "auto"
    eval_examples: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _epochs_or_steps(self) -> TrainSpec:
        if (self.epochs is None) == (self.steps is None):
            both = self.epochs is not None
            raise FieldError(("epochs",),
                      "give exactly one of train.epochs and train.steps" + (", not both" if both else ""))
        return self


class DeepSpeedSpec(Section):
    zero_stage: int = 0
    offload: Literal["none", "cpu"] = "none"
    bf16: bool | None = None          # null: follows train.precision
    config: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> DeepSpeedSpec:
        if self.config is not None:
            mixed = _changed(self, ("zero_stage", "offload", "bf16"))
            if mixed:
                raise FieldError((mixed[0],), "give either `config` (a full DeepSpeed config) or "
                                       "zero_stage/offload/bf16, not both")
        elif self.offload == "cpu" and self.zero_stage == 0:
            raise FieldError(("offload",), "offload: cpu needs zero_stage 1, 2 or 3")
        return self


class ResourcesSpec(Section):
    workers_per_trial: int = Field(1, ge=1)
    gpus_per_worker: float = Field(0, ge=0)
    cpus_per_worker: float = Field(1, gt=0)


class SchedulerSpec(Section):
    type: Literal["fifo", "asha"] = "fifo"
    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2, gt=1)
    # grace_period and max_t count evaluations (Tune's training_iteration), as the trials report them.
    max_t: int | None = Field(None, ge=1)   # null: the number of evaluations a trial makes

    @model_validator(mode="after")
    def _asha_fields(self) -> SchedulerSpec:
        if self.type == "fifo":
            extra = _changed(self, ("metric", "mode", "grace_period", "reduction_factor", "max_t"))
            if extra:
                raise FieldError((extra[0],), "only for type: asha")
        elif self.max_t is not None and self.max_t < self.grace_period:
            raise FieldError(("max_t",), f"max_t ({self.max_t}) must be >= grace_period ({self.grace_period})")
        return self


class AnalysisSettingsSpec(Section):
    """How the analyses of `analysis:` run (workers.training.analysis.AnalysisSettings; a test keeps the
    fields equal). The landscape's loss evaluations dominate their cost: 2 x (points + points_2d^2)."""

    intruder_k: int = Field(10, ge=1)
    landscape_points: int = Field(11, ge=3)
    landscape_points_2d: int = Field(7, ge=3)
    sigma: float = Field(1.0, gt=0)
    bits: int | None = Field(None, ge=1)

    @field_validator("landscape_points", "landscape_points_2d")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"expected an odd number (the grid's centre is the trained weights), got {v}")
        return v


class ObjectiveSpec(Section):
    """One objective: a metric the trials report and whether higher or lower is better."""

    metric: str
    mode: Literal["max", "min"]

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in OBJECTIVE_METRICS:
            raise ValueError(f"unknown metric {v!r}; valid: {choices(OBJECTIVE_METRICS)}")
        return v


# -- the spec --------------------------------------------------------------------------------------
class SweepSpec(Section):
    """A whole sweep. Build it with `load_spec(path)` or `SweepSpec.model_validate(dict)`."""

    experiment: str = Field(min_length=1)
    models: list[Annotated[str, AfterValidator(check_model)]]
    datasets: list[Annotated[DatasetSpec, AfterValidator(_check_dataset_name)]]
    methods: list[Annotated[str, AfterValidator(_check_method)]]
    seeds: list[int] = Field(default_factory=lambda: [0])
    search: SearchSpec = Field(default_factory=SearchSpec)
    train: TrainSpec
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    max_concurrent: int = Field(1, ge=1)
    max_failures: int = Field(1, ge=0)
    # What search.algorithm optuna optimises (several: multi-objective) and the summary's Pareto front trades
    # off; none: the scheduler's metric and mode (val_accuracy, max by default), and no front.
    objectives: list[ObjectiveSpec] | None = None
    analysis: list[Analysis] = Field(default_factory=list)
    analysis_settings: AnalysisSettingsSpec = Field(default_factory=AnalysisSettingsSpec)

    @field_validator("models", "methods", "seeds")
    @classmethod
    def _nonempty_unique(cls, values: list, info: ValidationInfo) -> list:
        return _unique(values, info.field_name.rstrip("s"))

    @field_validator("analysis")
    @classmethod
    def _analyses_unique(cls, values: list) -> list:
        return _unique(values, "analysis") if values else values

    @field_validator("models")
    @classmethod
    def _labels_unique(cls, models: list[str]) -> list[str]:
        labels = [model_label(m) for m in models]
        for i, label in enumerate(labels):
            if label in labels[:i]:
                raise FieldError((i,), f"two models share the label {label!r} used in trial keys "
                                "(folder names must differ)")
        return models

    @field_validator("datasets")
    @classmethod
    def _datasets_unique(cls, datasets: list[DatasetSpec]) -> list[DatasetSpec]:
        if not datasets:
            raise ValueError("empty list: give at least one dataset")
        names = [d.name for d in datasets]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise FieldError((i, "name"), f"duplicate dataset name {name!r}")
        return datasets

    @model_validator(mode="after")
    def _cross_checks(self) -> SweepSpec:
        for method in self.search.by_method:
            if method not in self.methods:
                raise FieldError(("search", "by_method", method), f"{method!r} is not one of this sweep's "
                                 f"methods ({choices(self.methods)})", root=True)
        if self.train.framing == "generation":
            from workers.data import assets

            for i, model in enumerate(self.models):
                if assets.model_kind(model) != "causal":
                    raise FieldError(("train", "framing"), f"generation needs a causal LM, but models[{i}] "
                              f"{model_label(model)!r} is an encoder; use classification or auto", root=True)
        ds = self.deepspeed
        if ds.config is None and ds.bf16 is not None and self.train.precision == "auto":
            raise FieldError(("deepspeed", "bf16"), "train.precision auto sets bf16 per worker; leave deepspeed.bf16 "
                             "unset, or set train.precision to fp32 or bf16", root=True)
        if ds.config is None and ds.bf16 is not None and ds.bf16 != (self.train.precision == "bf16"):
            raise FieldError(("deepspeed", "bf16"), f"bf16: {str(ds.bf16).lower()} contradicts train.precision "
                      f"{self.train.precision!r}; leave deepspeed.bf16 unset to follow it", root=True)
        try:   # what the training loop will refuse, refused now (stage 3, an optimizer section, fp16, ...)
            check_deepspeed(self.deepspeed_config(), self.train.batch_size, self.train.precision)
        except ValueError as e:
            field = ("deepspeed", "config") if ds.config is not None else ("deepspeed", "zero_stage")
            raise FieldError(field, str(e), root=True) from None
        if self.objectives is not None:
            if not self.objectives:
                raise FieldError(("objectives",), "empty list: give at least one {metric, mode} or leave it out",
                                 root=True)
            names = [o.metric for o in self.objectives]
            for i, name in enumerate(names):
                if name in names[:i]:
                    raise FieldError(("objectives", i, "metric"), f"duplicate objective {name!r}", root=True)
        sch = self.scheduler
        if sch.type == "asha":
            if self.train.eval_every is None:
                raise FieldError(("train", "eval_every"), "the asha scheduler needs intermediate results: set "
                          "train.eval_every (steps); without it a trial reports once, at the end", root=True)
            evals = self._evaluations()
            if sch.max_t is None:
                if evals is None:
                    raise FieldError(("scheduler", "max_t"), "training by epochs, the number of evaluations a "
                                     "trial makes is unknown before its data loads: set scheduler.max_t (in "
                                     "evaluations) or train by train.steps", root=True)
                object.__setattr__(sch, "max_t", evals)
            if sch.max_t < sch.grace_period:
                raise FieldError(("scheduler", "grace_period"), f"grace_period ({sch.grace_period}) exceeds the "
                          f"{sch.max_t} evaluations a trial makes", root=True)
        return self

    @classmethod
    def model_validate(cls, obj: Any, *, strict: bool | None = None, from_attributes: bool | None = None,
                       context: dict | None = None, **kwargs) -> SweepSpec:
        """Validate a dict; raise SpecError naming every bad field. `context={"base_dir": folder}`
        resolves relative paths (load_spec passes the spec file's folder)."""
        try:
            return super().model_validate(obj, strict=strict, from_attributes=from_attributes,
                                          context=context, **kwargs)
        except ValidationError as e:
            raise SpecError(_describe(e), (context or {}).get("source")) from None

    # -- expansion --------------------------------------------------------------------------------
    def _evaluations(self) -> int | None:
        """How many times a trial reports (Tune's training_iteration): every eval_every steps and at
        the end. None when training by epochs with eval_every (the steps per epoch are unknown here)."""
        t = self.train
        if t.eval_every is None:
            return 1
        return math.ceil(t.steps / t.eval_every) if t.steps is not None else None

    def cells(self) -> list[dict]:
        """models x datasets x methods x seeds, in that nesting order: what each trial holds besides its
        hyper-parameters ({model, dataset, method, seed})."""
        return [{"model": model, "dataset": dataset.name, "method": method, "seed": seed}
                for model, dataset, method, seed in itertools.product(self.models, self.datasets, self.methods,
                                                                      self.seeds)]

    @staticmethod
    def trial(cell: dict, label: str, values: dict) -> dict:
        """One trial: its cell, every hyper-parameter, and a stable trial_key naming both."""
        key = f"{model_label(cell['model'])}/{cell['dataset']}/{cell['method']}/seed{cell['seed']}"
        return {**cell, **values, "trial_key": key + (f"/{label}" if label else "")}

    @property
    def n_trials(self) -> int:
        return sum(self.search.for_method(c["method"]).trials_per_cell for c in self.cells())

    @property
    def objective_list(self) -> list[ObjectiveSpec]:
        """The objectives, or the scheduler's metric and mode as the one objective."""
        return self.objectives or [ObjectiveSpec(metric=self.scheduler.metric, mode=self.scheduler.mode)]

    def trials(self) -> list[dict]:
        """models x datasets x methods x seeds x (grid points x num_samples, or num_samples draws), in that
        nesting order (grid and random; optuna's trials are chosen as results come, `n_trials` counts them).
        Each trial: model, dataset, method, seed, every hyper-parameter, and a stable trial_key."""
        points = {m: self.search.for_method(m).points() for m in self.methods}
        return [self.trial(cell, label, values) for cell in self.cells() for label, values in points[cell["method"]]]

    def trial_config(self, trial: dict) -> dict:
        """Everything one trial needs, as a plain dict: the trial's own values, the dataset reference
        (a built-in name, or a dict of absolute paths and columns), the train settings, the framing
        resolved for this model, and the full DeepSpeed config."""
        missing = [k for k in ("model", "dataset", "method", "seed", *HYPERPARAMS) if k not in trial]
        if missing:
            raise ValueError(f"not a trial of this spec: missing {choices(missing)}")
        by_name = {d.name: d for d in self.datasets}
        if trial["dataset"] not in by_name:
            raise ValueError(f"unknown dataset {trial['dataset']!r}; this spec has {choices(by_name)}")
        t = self.train
        return {
            "model": trial["model"],
            "dataset": by_name[trial["dataset"]].reference(),
            "method": trial["method"],
            "seed": trial["seed"],
            **{p: trial[p] for p in HYPERPARAMS},
            "trial_key": trial.get("trial_key"),
            "epochs": t.epochs,
            "steps": t.steps,
            "batch_size": t.batch_size,
            "max_length": t.max_length,
            "eval_every": t.eval_every,
            "eval_examples": t.eval_examples,
            "precision": t.precision,
            "framing": self.framing(trial["model"]),
            "deepspeed": self.deepspeed_config(),
            "analysis": list(self.analysis),
            "analysis_settings": self.analysis_settings.model_dump(),
        }

    def framing(self, model: str) -> Literal["classification", "generation"]:
        """train.framing, with auto resolved: generation for causal LMs, classification for encoders."""
        if self.train.framing != "auto":
            return self.train.framing
        from workers.data import assets

        return "generation" if assets.model_kind(model) == "causal" else "classification"

    def deepspeed_config(self) -> dict:
        """The DeepSpeed config of every trial (a fresh dict). The training loop builds its own torch
        optimizer, hence zero_allow_untested_optimizer (and, with CPU offload, not forcing DeepSpeed's
        CPU Adam). `deepspeed.config`, when given, is merged over this, its values winning."""
        ds = self.deepspeed
        stage = 0 if ds.config is not None else ds.zero_stage
        zero: dict[str, Any] = {"stage": stage}
        out: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": self.train.batch_size,
            "gradient_accumulation_steps": 1,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
        }
        if self.train.precision != "auto":   # auto: the loop sets bf16 for the device its worker has
            out["bf16"] = {"enabled": self.train.precision == "bf16"}
        if ds.config is not None:
            return _deep_merge(out, ds.config)
        if ds.offload == "cpu":
            zero["offload_optimizer"] = {"device": "cpu"}
            out["zero_force_ds_cpu_optimizer"] = False
        return out


def model_label(model: str) -> str:
    """The model's name in trial keys: the alias, or the folder's name for a path."""
    return Path(model).name if ("/" in model or "\\" in model) and not model.startswith("random:") else model


def _deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else copy.deepcopy(v)
    return out


# -- errors ----------------------------------------------------------------------------------------
def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The spec section (model class) a location points into, to list its valid fields."""
    import types
    import typing
    cls: Any = SweepSpec
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        ann = cls.model_fields[part].annotation
        while typing.get_origin(ann) in (list, Annotated, typing.Union, types.UnionType):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            ann = args[0]
        cls = ann
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _describe(e: ValidationError) -> list[tuple[str, str]]:
    return [(field_path(loc), msg) for loc, msg in validation_errors(e, _section_at)]


# -- YAML ------------------------------------------------------------------------------------------
def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec file; relative paths inside are taken from its folder."""
    path = Path(path)
    return SweepSpec.model_validate(read_yaml(path), context={"base_dir": path.parent, "source": str(path)})


__all__ = ["AnalysisSettingsSpec", "DatasetSpec", "DeepSpeedSpec", "HYPERPARAMS", "ResourcesSpec", "SchedulerSpec",
           "SearchSpec", "SpecError", "SweepSpec", "TrainSpec", "load_spec", "model_label"]
