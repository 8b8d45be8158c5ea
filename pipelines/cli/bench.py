"""`sparta bench ...`: side-by-side benchmarks (one run, interleaved, ratios printed)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipelines.cli.options import ints, names

app = typer.Typer(help="Side-by-side benchmarks (one run, interleaved, ratios printed).", no_args_is_help=True)


def _parse_methods(methods: str) -> tuple[str, ...]:
    from adapters import METHODS

    if methods.strip() == "all":
        return tuple(METHODS)
    chosen = names(methods)
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        raise typer.BadParameter(f"unknown method(s) {', '.join(unknown) or '(none given)'}; "
                                 f"valid: all or a comma list of {', '.join(METHODS)}",
                                 param_hint="--methods")
    return chosen


@app.command("train")
def bench_train(
    model: str = typer.Option("minilm-l6", help="model alias, HF folder or random:<arch>-tiny"),
    methods: str = typer.Option("all", help="'all' or a comma list of adapters.METHODS"),
    steps: int = typer.Option(20, min=1, help="timed steps per row (after warm-up)"),
    warmup: int = typer.Option(3, min=0, help="untimed steps per row first"),
    batch: int = typer.Option(16, min=1),
    seq_len: int = typer.Option(128, min=1),
    rank: int = typer.Option(16, min=1),
    alpha: Optional[float] = typer.Option(None, help="default 2 * rank"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda if available)"),
    dtype: str = typer.Option("auto", help="auto (bfloat16 where the device runs it natively, else float32), "
                              "float32 or bfloat16"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads (default: all cores)"),
    peft: bool = typer.Option(True, help="include the HF PEFT LoRA reference rows"),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="default bench-results/train-<model>.csv"),
) -> None:
    """Step time, peak memory and saved activations of every adaptation method vs the floor and PEFT."""
    import torch

    from pipelines.bench import train as bt
    from pipelines.bench.train_report import markdown_train_bench, print_train_bench
    from pipelines.progress import bar, console as make_console
    from workers.data.assets import check_model_name

    try:
        check_model_name(model)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--model") from None
    if dtype not in ("auto", "float32", "bfloat16"):
        raise typer.BadParameter("valid: auto, float32, bfloat16", param_hint="--dtype")
    if threads:
        torch.set_num_threads(threads)
    cfg = bt.BenchConfig(model=model, methods=_parse_methods(methods), steps=steps, warmup=warmup,
                         batch=batch, seq_len=seq_len, rank=rank, alpha=alpha, dtype=dtype, peft=peft,
                         **({"device": device} if device else {}))
    console = make_console()
    with bar(console) as update:
        report = bt.run(cfg, update)
    path = csv_path or Path("bench-results") / f"train-{model.replace(':', '_').replace('/', '_')}.csv"
    bt.write_csv(path, report)
    path.with_suffix(".md").write_text(markdown_train_bench(report) + "\n")
    print_train_bench(console, report)
    console.print(f"CSV: {path}  (markdown: {path.with_suffix('.md')}, run metadata: {path.with_suffix('.json')})")


# BenchDecodeConfig field -> the option that sets it
_DECODE_OPTIONS = {"policies": "--policies", "contexts": "--contexts", "batches": "--batch", "art": "--art",
                   "policy_ratio": "--policy-ratio", "prompts": "--prompts", "new_tokens": "--new-tokens",
                   "rounds": "--rounds", "dtype": "--dtype"}


@app.command("decode")
def bench_decode(
    model: str = typer.Option("smollm2-135m", help="model alias, HF folder or random:<arch>-tiny (a causal LM)"),
    policies: str = typer.Option("dense,streaming,snapkv", help="comma list of KV policies (attention.hf.POLICIES)"),
    contexts: str = typer.Option("1024,2048,4096", help="comma list of prompt lengths in tokens"),
    batch: str = typer.Option("1,4,16", help="comma list of decode batch sizes"),
    art: str = typer.Option("tuned,certified", help="comma list of ART presets (paper, certified, tuned, aggressive), each optionally with overrides, e.g. tuned+tau=3e-3+block_size=32; one row each per policy"),
    policy_ratio: float = typer.Option(0.5, help="fraction of the KV a policy removes"),
    prompts: int = typer.Option(4, help="distinct passkey prompts per context (prefilled together)"),
    new_tokens: int = typer.Option(12, help="greedy tokens per sequence (the prefill's first one included)"),
    rounds: int = typer.Option(2, help="round-robin rounds over the rows of each context x batch"),
    dtype: str = typer.Option("auto", help="auto (bfloat16 where the CPU runs it natively, else float32), "
                              "float32 or bfloat16"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads (default: all cores)"),
    seed: int = typer.Option(0, help="seeds passkeys and haystack offsets"),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="default bench-results/decode-<model>.csv"),
) -> None:
    """Decode tokens/s and attention time of KV policies with and without ART vs stock generate."""
    from pipelines.bench import decode as bd
    from pipelines.progress import bar, console as make_console
    from workers.data.assets import check_model_name

    try:
        check_model_name(model)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--model") from None
    try:
        cfg = bd.BenchDecodeConfig(model=model, policies=names(policies), contexts=ints(contexts, "--contexts"),
                                   batches=ints(batch, "--batch"), art=names(art), policy_ratio=policy_ratio,
                                   prompts=prompts, new_tokens=new_tokens, rounds=rounds, dtype=dtype, seed=seed)
    except bd.ConfigError as e:
        raise typer.BadParameter(e.message, param_hint=_DECODE_OPTIONS.get(e.field, e.field)) from None
    import torch

    from pipelines.bench.decode_report import markdown_decode_bench, plot_decode_bench, print_decode_bench

    if threads:
        torch.set_num_threads(threads)
    console = make_console()
    with bar(console) as update:
        report = bd.run(cfg, update)
    path = csv_path or Path("bench-results") / f"decode-{model.replace(':', '_').replace('/', '_')}.csv"
    bd.write_csv(path, report)
    path.with_suffix(".md").write_text(markdown_decode_bench(report) + "\n")
    plot_decode_bench(report, path.with_suffix(".png"))
    print_decode_bench(console, report)
    console.print(f"CSV: {path}  (markdown: {path.with_suffix('.md')}, plot: {path.with_suffix('.png')}, "
                  f"run metadata: {path.with_suffix('.json')})")


@app.command("serve")
def bench_serve(
    spec: Path = typer.Option(..., "--spec", exists=True, dir_okay=False, help="the serve spec to deploy and drive"),
    concurrency: str = typer.Option("1,4,16", help="comma list of closed-loop client counts"),
    requests: int = typer.Option(32, help="requests per concurrency level and ART setting"),
    art: str = typer.Option("off,on", help="comma list: off, on (the spec's art), or presets with +field=value "
                            "overrides (tuned+tau=3e-3); ratios are against off"),
    prompt_tokens: str = typer.Option("1024", help="comma list of prompt lengths in tokens (cycled over requests)"),
    max_tokens: int = typer.Option(32, help="completion tokens per request"),
    rounds: int = typer.Option(2, help="phases per setting and level, in snake order (off, on, on, off)"),
    seed: int = typer.Option(0, help="seeds the prompts' essay offsets"),
    endpoint: Optional[str] = typer.Option(None, help="a running deployment of the spec (default: deploy it here)"),
    port: Optional[int] = typer.Option(None, help="override the spec's port when deploying"),
    out: Path = typer.Option(Path("bench-results"), help="folder for serve-<model>.csv/.md/.json and serve.log"),
) -> None:
    """Requests/s, output tokens/s and latency of a deployment under load, ART settings side by side."""
    from pipelines.bench import serve as bs
    from pipelines.progress import bar, console as make_console
    from pipelines.serving.deploy import check_port_free
    from pipelines.serving.spec import ServeSpecError

    try:
        cfg = bs.BenchServeConfig(spec=str(spec), concurrency=ints(concurrency, "--concurrency"),
                                  requests=requests, art=names(art), prompt_tokens=ints(prompt_tokens, "--prompt-tokens"),
                                  max_tokens=max_tokens, rounds=rounds, seed=seed, endpoint=endpoint, port=port)
        checked = bs.check(cfg)
        if not endpoint:
            check_port_free(checked[0].host, checked[0].port)
    except bs.ConfigError as e:
        raise typer.BadParameter(e.message, param_hint=e.option) from None
    except ServeSpecError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    console = make_console(220)
    with bar(console) as update:
        report = bs.run(cfg, out, update, checked)
    paths = bs.write(report, out)
    bs.print_table(console, report.rows, "off" if "off" in cfg.art else cfg.art[0])
    console.print(f"written: {paths['csv']}, {paths['md']}, {paths['json']}")


@app.command("overhead")
def bench_overhead(
    spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="a sweep spec; its first trial is timed"),
    trial: Optional[str] = typer.Option(None, help="the trial key to time instead of the first"),
    out: Path = typer.Option(Path("bench-results"), help="folder for overhead.md and overhead.json"),
) -> None:
    """What the orchestration adds to one trial: the loop run directly vs the same trial as a sweep."""
    from pipelines.bench.overhead import bench, markdown
    from pipelines.sweeps.spec import SpecError

    try:
        report = bench(spec, trial, out)
    except (SpecError, ValueError) as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(markdown(report))
    typer.echo(f"written: {out / 'overhead.md'}, {out / 'overhead.json'}")


