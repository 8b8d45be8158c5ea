"""`sparta eval ...`: quality of served (or in-process) models with and without ART, recorded in MLflow."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from pipelines.cli.options import names, numbers

app = typer.Typer(help="Evaluate a model (served or in-process) with and without ART; results go to MLflow.",
                  no_args_is_help=True)

# NiahConfig field -> the option that sets it
_OPTIONS = {"model": "--model/--endpoint", "endpoint": "--endpoint", "lengths": "--lengths", "depths": "--depths",
            "variants": "--variants", "policies": "--policies", "policy_ratio": "--policy-ratio", "art": "--art",
            "samples": "--samples", "needles": "--needles", "haystack": "--haystack", "max_tokens": "--max-tokens",
            "batch": "--batch", "dtype": "--dtype", "tokenizer": "--tokenizer"}


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"give KEY=VALUE, got {pair!r}", param_hint="--model-override")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


@app.command("niah")
def niah(
    endpoint: Optional[str] = typer.Option(None, help="a sparta serve URL, e.g. http://127.0.0.1:8000"),
    model: Optional[str] = typer.Option(None, help="in-process instead: an alias, HF folder, random:<arch>-tiny, "
                                                   "models:/NAME/VERSION or runs:/ID/PATH"),
    tokenizer: Optional[str] = typer.Option(None, help="tokenizer that builds the prompts (default: the model's; "
                                                       "for an endpoint, the served model name when it is an alias)"),
    lengths: str = typer.Option("1024,2048,4096", help="comma list of prompt lengths in tokens (exact)"),
    depths: str = typer.Option("0.1,0.5,0.9", help="comma list of needle depths in [0, 1]"),
    variants: str = typer.Option("single,multikey,multivalue,multiquery", help="comma list of RULER variants"),
    policies: str = typer.Option("dense", help="comma list of KV policies (attention.hf.POLICIES)"),
    policy_ratio: float = typer.Option(0.5, help="fraction of the KV a non-dense policy removes"),
    art: str = typer.Option("off,tuned", help="comma list: off, on (the endpoint's own setting; tuned in-process) or "
                                              "ART presets with overrides, e.g. certified+eps=0.01; every policy runs "
                                              "with every setting"),
    samples: int = typer.Option(1, help="prompts per variant x length x depth cell"),
    needles: int = typer.Option(4, help="needles of the multi-needle variants"),
    haystack: str = typer.Option("essays", help="essays (Paul Graham) or noise (RULER's repeated sentences)"),
    max_tokens: Optional[int] = typer.Option(None, help="answer budget (default: per case, room for every value)"),
    batch: int = typer.Option(4, help="prompts decoded together (in-process) or sent at once (endpoint)"),
    seed: int = typer.Option(0, help="seeds keys, values and haystack offsets"),
    dtype: str = typer.Option("auto", help="in-process: auto (bfloat16 where the device runs it natively), "
                              "float32 or bfloat16"),
    device: str = typer.Option("auto", help="in-process: auto, cpu or cuda"),
    threads: Optional[int] = typer.Option(None, min=1, help="in-process: torch CPU threads"),
    model_override: List[str] = typer.Option([], "--model-override", help="in-process: model config KEY=VALUE "
                                                                          "(repeatable), e.g. max_position_embeddings=2048"),
    api_key: Optional[str] = typer.Option(None, help="endpoint API key (default: $SPARTA_API_KEY)"),
    experiment: str = typer.Option("sparta-eval", help="MLflow experiment"),
    run_name: Optional[str] = typer.Option(None, help="MLflow run name (default niah-<model>)"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri",
                                               help="default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db"),
    out: Path = typer.Option(Path("eval-results/niah"), help="folder for the CSV, markdown, answers and heatmaps"),
) -> None:
    """RULER-style needle-in-a-haystack accuracy of every KV policy x ART setting on the same prompts."""
    from pipelines.evaluation import niah as ev
    from pipelines.progress import bar, console as make_console

    try:
        cfg = ev.NiahConfig(model=model, endpoint=endpoint, tokenizer=tokenizer, model_overrides=_overrides(model_override),
                            lengths=numbers(lengths, int, "--lengths"), depths=numbers(depths, float, "--depths"),
                            variants=names(variants), policies=names(policies), policy_ratio=policy_ratio,
                            art=names(art), samples=samples, needles=needles, haystack=haystack,
                            max_tokens=max_tokens, batch=batch, seed=seed, dtype=dtype, device=device, threads=threads,
                            api_key=api_key or ev.default_api_key(), tracking_uri=tracking_uri)
    except ev.ConfigError as e:
        raise typer.BadParameter(e.message, param_hint=_OPTIONS.get(e.field, e.field)) from None
    console = make_console()
    try:
        with bar(console, "prompts", "building prompts") as update:
            report = ev.run(cfg, update)
    except ev.ConfigError as e:
        raise typer.BadParameter(e.message, param_hint=_OPTIONS.get(e.field, e.field)) from None
    except ev.EvalError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(1) from None
    run_id = ev.log_mlflow(report, out, experiment, run_name)
    ev.print_report(console, report)
    console.print(f"MLflow run {run_id} (experiment {experiment}); files: {out}/niah.csv, niah.md, answers.jsonl, "
                  "heatmap-*.png, kvpress/")


# LongBenchConfig field -> the option that sets it
_LONGBENCH_OPTIONS = {"data": "--longbench", "model": "--model", "tasks": "--tasks", "policies": "--policies",
                      "policy_ratio": "--policy-ratio", "art": "--art", "limit": "--limit",
                      "max_length": "--max-length", "max_new_tokens": "--max-new-tokens", "batch": "--batch",
                      "dtype": "--dtype", "device": "--device"}


@app.command("longbench")
def longbench(
    data: Path = typer.Option(..., "--longbench", help="folder with LongBench's <task>.jsonl files (the official "
                                                       "data.zip unpacked; docs/evaluation.md)"),
    model: str = typer.Option(..., help="an alias, HF folder, random:<arch>-tiny, models:/NAME/VERSION or "
                                        "runs:/ID/PATH"),
    tasks: Optional[str] = typer.Option(None, help="comma list of English tasks (default: all of them)"),
    e: bool = typer.Option(False, "--longbench-e", help="LongBench-E's <task>_e.jsonl files, scored per length bucket"),
    policies: str = typer.Option("dense", help="comma list of KV policies (attention.hf.POLICIES)"),
    policy_ratio: float = typer.Option(0.5, help="fraction of the KV a non-dense policy removes"),
    art: str = typer.Option("off,tuned", help="comma list: off, on (tuned) or ART presets with overrides, e.g. "
                                              "certified+eps=0.01; every policy runs with every setting"),
    limit: Optional[int] = typer.Option(None, help="the first N examples of each task (default: all)"),
    max_length: int = typer.Option(3500, help="prompt budget in tokens: longer prompts lose their middle"),
    max_new_tokens: Optional[int] = typer.Option(None, help="answer budget (default: LongBench's per task)"),
    batch: int = typer.Option(1, help="prompts of equal length decoded together"),
    dtype: str = typer.Option("auto", help="auto (bfloat16 where the device runs it natively), float32 or bfloat16"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads"),
    model_override: List[str] = typer.Option([], "--model-override", help="model config KEY=VALUE (repeatable)"),
    experiment: str = typer.Option("sparta-eval", help="MLflow experiment"),
    run_name: Optional[str] = typer.Option(None, help="MLflow run name (default longbench-<model>)"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri",
                                               help="default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db"),
    out: Path = typer.Option(Path("eval-results/longbench"), help="folder for the scores, answers and kvpress runs"),
) -> None:
    """LongBench scores of every KV policy x ART setting on the same prompts, and the answers ART changed."""
    from pipelines.evaluation import longbench as ev
    from pipelines.evaluation.niah import ConfigError
    from pipelines.progress import bar, console as make_console
    from workers.data.longbench import E_TASKS, TASKS

    try:
        cfg = ev.LongBenchConfig(data=str(data), model=model,
                                 tasks=names(tasks) if tasks else (E_TASKS if e else TASKS), e=e,
                                 policies=names(policies), policy_ratio=policy_ratio, art=names(art), limit=limit,
                                 max_length=max_length, max_new_tokens=max_new_tokens, batch=batch, dtype=dtype,
                                 device=device, threads=threads, model_overrides=_overrides(model_override),
                                 tracking_uri=tracking_uri)
        console = make_console()
        with bar(console, "answers", "building prompts") as update:
            report = ev.run(cfg, update)
    except ConfigError as err:
        raise typer.BadParameter(err.message, param_hint=_LONGBENCH_OPTIONS.get(err.field, err.field)) from None
    run_id = ev.log_mlflow(report, out, experiment, run_name)
    ev.print_report(console, report)
    changed = sum(s.changed or 0 for s in report.summaries)
    console.print(f"{changed} answers changed against ART off ({out}/changed.jsonl); MLflow run {run_id} "
                  f"(experiment {experiment}); files: {out}/scores.csv, longbench.md, answers.jsonl, kvpress/")
