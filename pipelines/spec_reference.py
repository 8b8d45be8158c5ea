"""The field reference of the sweep and serve specs, generated from their pydantic models.

Types, defaults, bounds and Literal choices are read from the models at run time; only the one-line
descriptions below are written by hand. A field without a description, or a description of a field no
model has, makes the generator raise, so the reference cannot drift from the code silently.

    python -m pipelines.spec_reference            # print both references
    python -m pipelines.spec_reference --write    # rewrite them in docs/sweeps.md and docs/serving.md (make docs)
    python -m pipelines.spec_reference --check    # exit 1 if those files are stale
"""
from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import annotated_types as at
import pandas as pd
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pipelines import PROJECT_ROOT
from pipelines.serving.spec import ServeSpec
from pipelines.sweeps.spec import OBJECTIVE_METRICS, SweepSpec
from pipelines.tables import markdown

SWEEP_FIELDS = {
    "experiment": "MLflow experiment of the sweep: a parent run and one child run per trial",
    "models": "models to fine-tune: packaged aliases (docs/assets.md), `random:<arch>-tiny` (unit tests) or Hugging "
              "Face model folders with a `config.json`; trial keys use the alias or the folder's name",
    "datasets": "built-in task names, or mappings for your own tables (`datasets[].*`)",
    "datasets[].name": "a built-in task (a plain string sets only this), or a table's name in trial keys (default: "
                       "the `path` file's stem or the `train` file's folder; no `/`, not a built-in name)",
    "datasets[].path": "one table: a `.csv`, `.jsonl` or `.parquet` file or a `save_to_disk` folder; rows are cut "
                       "80/10/10 unless `split` names a column; not with `train`",
    "datasets[].train": "instead of `path`: the training split's file or saved folder",
    "datasets[].validation": "with `train`: the validation split (default: 10% of the shuffled training rows)",
    "datasets[].test": "with `train`: the test split (default: 10% of the shuffled training rows)",
    "datasets[].text": "the column holding the input text",
    "datasets[].label": "the column holding the class; its distinct values, sorted, are the label names",
    "datasets[].split": "with `path`: the column whose values (`train`; `validation`, `val`, `valid` or `dev`; "
                        "`test`) assign rows to splits",
    "methods": "adaptation methods to compare (docs/adapters.md)",
    "seeds": "run seeds: the head's init, the adapter's random draws, the data order (the split stays fixed)",
    "search": "hyper-parameters, each a scalar, a list (a grid: every value runs) or a sampling spec "
              "`{loguniform: [low, high]}`, `{uniform: [low, high]}`, `{choice: [...]}`",
    "search.lr": "learning rate (for `lora_plus`, of A and the head): numbers > 0",
    "search.rank": "adapter rank r, every method but `full`: integers >= 1 (scalar, list or `choice`)",
    "search.alpha": "scale s = alpha / rank: numbers > 0, or `null` for 2 x rank",
    "search.chain_segments": "segments of the chained methods `cola`, `rac`, `c3la`, `r_c3la`: integers >= 1 "
                             "(scalar, list or `choice`)",
    "search.lora_plus_ratio": "lr(B) / lr(A) of `lora_plus`: numbers > 0",
    "search.weight_decay": "AdamW weight decay of the head and of `full` (adapter factors never decay): numbers >= 0",
    "search.algorithm": "`grid`: lists expanded whole, sampled values drawn per grid point; `random`: lists are "
                        "choices too, `num_samples` draws per model x dataset x method x seed; `optuna`: Optuna's "
                        "TPE picks `num_samples` trials per model x dataset x method x seed from the results so far "
                        "(the `objectives`)",
    "search.num_samples": "grid: draws of the sampled parameters per grid point (> 1 needs a sampled parameter); "
                          "random, optuna: trials per model x dataset x method x seed",
    "search.seed": "seeds the sampling: grid point i draws from `random.Random(\"sparta-search:<seed>:<i>\")`; "
                   "random from `...:<seed>:random`; optuna's TPE sampler",
    "search.by_method": "per-method values over the shared ones, e.g. `{full: {lr: 5e-5}, lora_plus: {lr: 2e-4}}`: "
                        "each a scalar, a grid or a sampling spec, as above; only methods of this sweep",
    "train": "the training loop's settings",
    "train.epochs": "training length in epochs: give exactly one of `epochs` and `steps`",
    "train.steps": "training length in optimizer steps: give exactly one of `epochs` and `steps`",
    "train.batch_size": "examples per step per worker (DeepSpeed's `train_micro_batch_size_per_gpu`)",
    "train.max_length": "tokens per example, after truncation",
    "train.eval_every": "evaluate (validation and test), report and checkpoint every this many steps and at the "
                        "end; `null`: at the end only",
    "train.precision": "the training precision; `auto`: bf16 where the trial's worker runs it natively (CUDA, CPUs "
                       "with AMX / AVX-512 BF16), else fp32",
    "train.framing": "`classification`: a head on the model; `generation` (causal LMs): the model writes the label "
                     "after the input; `auto`: generation for causal LMs, classification for encoders",
    "train.eval_examples": "evaluate on at most this many validation and this many test examples; `null`: all",
    "deepspeed": "the DeepSpeed engine of every trial",
    "deepspeed.zero_stage": "ZeRO stage 0, 1 or 2 (stage 3 would partition the frozen weights chain steps merge "
                            "into)",
    "deepspeed.offload": "`cpu`: optimizer state on the CPU (needs `zero_stage` >= 1)",
    "deepspeed.bf16": "`null` follows `train.precision`; a value contradicting it, or any value with "
                      "`precision: auto`, is an error",
    "deepspeed.config": "a full DeepSpeed config merged over the generated one, its values winning; not with "
                        "`zero_stage`/`offload`/`bf16`; no `optimizer` section, no fp16, stage <= 2",
    "resources": "what one trial reserves on Ray",
    "resources.workers_per_trial": "Ray Train workers, i.e. DeepSpeed ranks, per trial",
    "resources.gpus_per_worker": "GPUs per worker (fractions allowed)",
    "resources.cpus_per_worker": "CPUs per worker; the worker trains with that many torch threads, rounded (at "
                                 "least 1: 1.9 gives 2, where Ray's `OMP_NUM_THREADS` would give 1)",
    "scheduler": "Tune's trial scheduler",
    "scheduler.type": "`fifo`: every trial runs to the end; `asha`: early stopping (needs `train.eval_every`)",
    "scheduler.metric": "asha only: the reported metric it compares trials on",
    "scheduler.mode": "asha only: whether that metric is maximised or minimised",
    "scheduler.grace_period": "asha only: evaluations a trial makes before it may be stopped",
    "scheduler.reduction_factor": "asha only: the fraction of trials kept at each rung is 1 / this",
    "scheduler.max_t": "asha only: evaluations of a full trial; `null`: ceil(steps / eval_every) (training by "
                       "`epochs` needs it set)",
    "max_concurrent": "trials running at once",
    "objectives": "what `search.algorithm: optuna` optimises, e.g. `[{metric: val_accuracy, mode: max}, {metric: "
                  "peak_mem_mib, mode: min}]` (two or more: multi-objective), and the summary's Pareto front "
                  "(`summary/pareto.csv`, `.md`, `.png`); `null`: the scheduler's metric and mode, no front",
    "objectives[].metric": "a metric every trial reports: " + ", ".join(f"`{m}`" for m in OBJECTIVE_METRICS),
    "objectives[].mode": "`max` or `min`",
    "max_failures": "retries of a failed trial before it counts as failed: a dead worker (Ray Train's `FailureConfig`) or a dead trial, e.g. its node lost (Tune's)",
    "analysis": "the Beyond-LoRA analyses of every trial, on its worker (docs/analysis.md): `gap` (test minus "
                "train loss, both in eval mode, at every evaluation), `bounds`, `spectrum`, `intruders`, "
                "`landscape` (at the end, logged as `analysis/...` metrics and CSV + PNG artifacts)",
    "analysis_settings": "how those analyses run; the landscape's 2 x (points + points_2d^2) loss evaluations "
                         "dominate their cost",
    "analysis_settings.intruder_k": "top singular vectors of each fine-tuned matrix checked for intruders",
    "analysis_settings.landscape_points": "points of the 1-D loss slices on [-1, 1] (odd: the centre is the "
                                          "trained weights)",
    "analysis_settings.landscape_points_2d": "points per axis of the 2-D loss slices (odd)",
    "analysis_settings.sigma": "the bound's sub-Gaussian parameter sigma",
    "analysis_settings.bits": "bits per weight q in the bound; `null`: the adapter's dtype",
}

SERVE_FIELDS = {
    "model": "what to serve (a causal LM): `models:/NAME/VERSION`, `models:/NAME@ALIAS`, `runs:/RUN_ID/PATH`, a "
             "packaged alias, `random:<arch>-tiny` or a Hugging Face model folder",
    "name": "the served model id (requests' `model`) and the Serve application's name; default: from `model`",
    "route_prefix": "the application's HTTP route prefix: starts with `/`, ends without one unless it is `/`",
    "adapter": "a sparta adapter folder (with `adapter_config.json`) merged into the model; not with a registry URI",
    "adapters": "adapters served unmerged beside the base, each picked by a request's `model`, decoded together in "
                "one batch: a string (its `uri`) or `{uri, name}`; `model` must then be a base model",
    "adapters[].uri": "`models:/NAME/VERSION`, `models:/NAME@ALIAS`, `runs:/RUN_ID/adapter` or a sparta adapter "
                      "folder, adapting `model` with the same `model_overrides`",
    "adapters[].name": "the `model` requests give; `null`: from the uri (NAME/VERSION, NAME@ALIAS, run-ID, the "
                       "folder's name)",
    "merge": "`true`: fold the one adapter listed into the base (fastest; served under its name, no other "
             "adapters)",
    "max_adapters": "adapters loaded at once per replica; loading one more evicts the least recently used idle one",
    "runtime_adapters": "`POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (vLLM's routes) on",
    "tokenizer": "`bytes`, a packaged alias or a folder with a Hugging Face tokenizer; `null`: the model's own",
    "model_overrides": "model config fields to override when loading, e.g. `max_position_embeddings` of a random "
                       "model",
    "tracking_uri": "MLflow store for registry URIs and the metrics run; `null`: `$MLFLOW_TRACKING_URI` or "
                    "`./mlruns`",
    "dtype": "the dtype the replica runs the model in; `auto`: bfloat16 on CUDA and on CPUs with AMX / AVX-512 "
             "BF16, float32 elsewhere",
    "device": "where the replica runs the model; `auto`: CUDA when there is a GPU, else the CPU",
    "kv": "the KV policy of every request that does not send its own `kv`",
    "kv.policy": "prefill presses from kvpress and `h2o`, or `quest` at decode; `dense`: keep the whole KV",
    "kv.ratio": "the fraction of the KV the policy removes; 0: no press at all",
    "art": "the default ART setting: `off`, a preset with optional `+field=value` overrides (`tuned+tau=3e-3`), or a "
           "mapping of ARTConfig fields with an optional `preset`",
    "max_context": "prompt plus completion tokens per request; at most the model's positions",
    "max_new_tokens": "the largest `max_tokens` a request may ask for, and the budget of one that asks none",
    "replicas": "a fixed number of replicas, or a mapping `{min, max, target_ongoing_requests}` to autoscale",
    "replicas.min": "autoscaling: the fewest replicas (and the number started)",
    "replicas.max": "autoscaling: the most replicas",
    "replicas.target_ongoing_requests": "autoscaling: the ongoing requests per replica Serve scales towards",
    "scheduler": "how a replica schedules requests (continuous batching by default)",
    "scheduler.kind": "`continuous`: iteration-level scheduling over a KV pool (requests join and leave the running "
                      "decode batch every step, prompts prefilled in chunks); `static`: `@serve.batch` batches, each "
                      "decoded to its longest budget (for comparison)",
    "scheduler.kv_cache_tokens": "the KV pool per replica in positions, in slots of `max_context` (one per running "
                                 "sequence); default 8 slots",
    "scheduler.max_prefill_tokens": "prompt tokens prefilled per step (chunked prefill; running sequences decode "
                                    "in the same step)",
    "scheduler.max_queued": "requests waiting for a free slot; beyond that a request gets 503 with `Retry-After`",
    "sampling": "sampling defaults for requests that leave these parameters out",
    "sampling.temperature": "0 is greedy; OpenAI's default is 1",
    "sampling.top_p": "nucleus sampling: the smallest set of tokens whose probability reaches `top_p`",
    "sampling.top_k": "only the `top_k` most likely tokens (0: off)",
    "batching": "the static scheduler's batching (`@serve.batch`): requests that arrive together decode together",
    "batching.max_batch_size": "the most requests decoded together",
    "batching.wait_timeout_s": "how long a batch's first request waits for others, in seconds",
    "max_ongoing_requests": "requests Serve hands one replica at once (more wait in Serve's queue); default: the "
                            "continuous scheduler's slots + `max_queued` + 1, static: 32 (at least "
                            "`batching.max_batch_size`)",
    "cpus_per_replica": "CPUs Ray reserves per replica (also the replica's torch threads)",
    "gpus_per_replica": "GPUs Ray reserves per replica; `null`: 1 with `device: cuda`, else 0",
    "host": "the address the Serve HTTP proxy binds",
    "port": "the port the Serve HTTP proxy binds",
    "api_key": "when set, `/v1` routes need `Authorization: Bearer <key>`",
    "api_key_env": "the environment variable that holds the key when `api_key` is unset",
    "metrics_interval_s": "seconds between each replica's reports to the deployment's MLflow run; 0: no MLflow run",
    "metrics_experiment": "the MLflow experiment of the deployment's metrics run",
}


def _methods() -> list[str]:
    from adapters import METHODS
    return list(METHODS)


def _tasks() -> list[str]:
    from workers.data.datasets import TASKS
    return list(TASKS)


def _models() -> list[str]:
    from workers.data.assets import model_choices
    return list(model_choices())


def _policies() -> list[str]:
    from attention.hf import POLICIES
    return list(POLICIES)


def _art() -> list[str]:
    from attention.config import PRESETS
    return ["off", *PRESETS]


# Names the specs check against a registry rather than a Literal: listed from the registry itself.
SWEEP_NAMES: dict[str, Callable[[], list[str]]] = {"models": _models, "datasets[].name": _tasks, "methods": _methods}
SERVE_NAMES: dict[str, Callable[[], list[str]]] = {"model": _models, "kv.policy": _policies, "art": _art}


@dataclass(frozen=True)
class Spec:
    """One generated reference: its root model, hand-written descriptions, registry names and target file."""

    name: str
    model: type[BaseModel]
    descriptions: dict[str, str]
    names: dict[str, Callable[[], list[str]]]
    doc: str   # relative to the project root


SPECS = {
    "sweep": Spec("sweep", SweepSpec, SWEEP_FIELDS, SWEEP_NAMES, "docs/sweeps.md"),
    "serve": Spec("serve", ServeSpec, SERVE_FIELDS, SERVE_NAMES, "docs/serving.md"),
}


class SpecReferenceError(ValueError):
    """The descriptions and the models disagree: a field without a description, or a stale description."""


# -- reading the models ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    path: str
    type: str
    default: str
    constraints: str


def _strip(ann: Any) -> Any:
    while typing.get_origin(ann) is typing.Annotated:
        ann = typing.get_args(ann)[0]
    return ann


def _members(ann: Any) -> list[Any]:
    """The members of a union (X | Y, Optional[X]), or [ann] itself."""
    ann = _strip(ann)
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return [_strip(a) for a in typing.get_args(ann)]
    return [ann]


def _section(ann: Any) -> tuple[type[BaseModel], str] | None:
    """The spec section a field holds, and the path suffix of its fields ("." or "[]." for a list)."""
    for member in _members(ann):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member, "."
        if typing.get_origin(member) is list:
            inner = _strip(typing.get_args(member)[0])
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner, "[]."
    return None


def _type_name(ann: Any) -> str:
    names = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null", Any: "any"}
    parts = []
    for member in _members(ann):
        origin = typing.get_origin(member)
        if member in names:
            parts.append(names[member])
        elif origin is typing.Literal:
            parts.append("string" if all(isinstance(v, str) for v in typing.get_args(member)) else "literal")
        elif origin is list:
            parts.append(f"list of {_type_name(typing.get_args(member)[0])}")
        elif origin is dict or member is dict or (isinstance(member, type) and issubclass(member, BaseModel)):
            parts.append("mapping")
        else:
            parts.append(getattr(member, "__name__", str(member)))
    return " or ".join(dict.fromkeys(parts))


def _value(v: Any) -> str:
    if isinstance(v, BaseModel):
        return "(its defaults)"
    if isinstance(v, str):
        return f"`{v}`" if v else '`""`'
    return f"`{json.dumps(v)}`"


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    return _value(info.get_default(call_default_factory=True))


def _constraints(info: FieldInfo, names: Callable[[], list[str]] | None) -> str:
    out = []
    symbols = {at.Ge: (">=", "ge"), at.Gt: (">", "gt"), at.Le: ("<=", "le"), at.Lt: ("<", "lt")}
    for m in info.metadata:
        for kind, (symbol, attr) in symbols.items():
            if isinstance(m, kind):
                out.append(f"{symbol} {getattr(m, attr)}")
        if isinstance(m, at.MinLen):
            out.append(f"length >= {m.min_length}")
        if isinstance(m, at.MaxLen):
            out.append(f"length <= {m.max_length}")
    for member in _members(info.annotation):
        if typing.get_origin(member) is typing.Literal:
            out.append("one of " + ", ".join(f"`{v}`" for v in typing.get_args(member)))
    if names is not None:
        out.append("built-in names: " + ", ".join(f"`{n}`" for n in names()))
    return "; ".join(out) or "-"


def walk(model: type[BaseModel], names: dict[str, Callable[[], list[str]]] | None = None,
         prefix: str = "") -> Iterator[tuple[str, type[BaseModel], list[Row]]]:
    """(section path, section model, rows) for `model` and, depth first after it, every section it holds."""
    names = names or {}
    rows, nested = [], []
    for field, info in model.model_fields.items():
        path = prefix + field
        section = _section(info.annotation)
        type_name = _type_name(info.annotation)
        if section is not None:
            type_name += f" (`{path}{section[1]}*`)"
            nested.append((section[0], path + section[1]))
        rows.append(Row(path, type_name, _default(info), _constraints(info, names.get(path))))
    yield prefix, model, rows
    for cls, sub in nested:
        yield from walk(cls, names, sub)


# -- the reference ---------------------------------------------------------------------------------
def check_descriptions(model: type[BaseModel], descriptions: dict[str, str]) -> None:
    """Raise SpecReferenceError unless every field of `model` (and its sections) has a description and
    every description names a field."""
    paths = [row.path for _, _, rows in walk(model) for row in rows]
    missing = [p for p in paths if not descriptions.get(p, "").strip()]
    stale = [p for p in descriptions if p not in paths]
    problems = []
    if missing:
        problems.append(f"fields of {model.__name__} without a description: {', '.join(missing)}")
    if stale:
        problems.append(f"descriptions of fields {model.__name__} does not have: {', '.join(stale)}")
    if problems:
        raise SpecReferenceError("; ".join(problems) + " (edit the descriptions in pipelines/spec_reference.py, "
                                 "then run `make docs`)")


def reference(model: type[BaseModel], descriptions: dict[str, str],
              names: dict[str, Callable[[], list[str]]] | None = None) -> str:
    """The markdown reference of `model`: one table per section, field paths from the spec's root."""
    check_descriptions(model, descriptions)
    for path in names or {}:
        if path not in descriptions:
            raise SpecReferenceError(f"registry names for {path!r}, which {model.__name__} does not have")
    parts = []
    for prefix, cls, rows in walk(model, names):
        parts.append(f"#### {f'`{prefix}*`' if prefix else 'Top level'} (`{cls.__name__}`)")
        df = pd.DataFrame([{"field": f"`{r.path}`", "type": r.type, "default": r.default,
                            "constraints": r.constraints, "description": descriptions[r.path]} for r in rows])
        parts.append(markdown(df, left=set(df.columns)))
    return "\n\n".join(parts)


def markers(name: str) -> tuple[str, str]:
    return f"<!-- spec-reference:{name}:start -->", f"<!-- spec-reference:{name}:end -->"


def generated_block(spec: Spec) -> str:
    source = spec.model.__module__.replace(".", "/") + ".py"
    note = (f"<!-- generated from {source} by `make docs` "
            "(python -m pipelines.spec_reference --write); edit the descriptions in pipelines/spec_reference.py -->")
    start, end = markers(spec.name)
    return f"{start}\n{note}\n\n{reference(spec.model, spec.descriptions, spec.names)}\n\n{end}"


def render(text: str, spec: Spec) -> str:
    """`text` with the generated block between its markers replaced by a fresh one."""
    start, end = markers(spec.name)
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise SpecReferenceError(f"{spec.doc} lacks the markers {start} ... {end}")
    return text[:i] + generated_block(spec) + text[j + len(end):]


def stale(root: Path | None = None) -> list[str]:
    """The docs whose generated reference differs from the models'."""
    root = root or PROJECT_ROOT
    return [s.doc for s in SPECS.values() if (root / s.doc).read_text() != render((root / s.doc).read_text(), s)]


def write(root: Path | None = None) -> list[str]:
    """Rewrite the generated blocks; returns the docs that changed."""
    root = root or PROJECT_ROOT
    changed = []
    for s in SPECS.values():
        path = root / s.doc
        text = path.read_text()
        new = render(text, s)
        if new != text:
            path.write_text(new)
            changed.append(s.doc)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.spec_reference", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="rewrite the generated sections of the docs")
    group.add_argument("--check", action="store_true", help="exit 1 if the docs are stale")
    args = parser.parse_args(argv)
    if args.write:
        changed = write()
        print(f"rewrote {', '.join(changed)}" if changed else "the spec reference is up to date")
    elif args.check:
        out = stale()
        if out:
            print(f"stale spec reference in {', '.join(out)}: run `make docs`", file=sys.stderr)
            return 1
        print("the spec reference in " + ", ".join(s.doc for s in SPECS.values()) + " is up to date")
    else:
        for s in SPECS.values():
            print(generated_block(s) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
