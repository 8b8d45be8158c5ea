"""`sparta bench ...`: side-by-side benchmarks (one run, interleaved, ratios printed)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from pipelines.bench import SLACK_RUNS
from pipelines.cli.options import ints, names, numbers

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
    art: str = typer.Option("walk,tuned,certified", help="comma list of ART presets (paper, certified, tuned, aggressive, skip, walk), each optionally with overrides, e.g. tuned+tau=3e-3+block_size=32; one row each per policy (walk: the kernel visiting every block, the second baseline)"),
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
    concurrency: Optional[str] = typer.Option(None, help="closed loop (the default mode): comma list of client "
                                              "counts, each sending its next request when the last is answered "
                                              "(default 1,4,16)"),
    rates: Optional[str] = typer.Option(None, help="open loop: comma list of request rates in requests/s (e.g. "
                                        "0.5,1,2); Poisson arrivals, each request sent at its arrival time whether "
                                        "or not earlier ones were answered"),
    schedulers: Optional[str] = typer.Option(None, help="open loop: comma list of scheduler kinds, each deployed "
                                             "in turn with the spec's scheduler.kind overridden "
                                             "(default continuous,static)"),
    requests: int = typer.Option(32, help="requests per concurrency level (open loop: per rate) and ART setting; "
                                 "the open loop sends the same seeded requests at every rate, scheduler and setting"),
    art: Optional[str] = typer.Option(None, help="comma list: off, on (the spec's art), or presets with +field=value "
                                      "overrides (tuned+tau=3e-3); ratios are against off (default off,on; with "
                                      "--adapters one setting, default off)"),
    prompt_tokens: Optional[str] = typer.Option(None, help="comma list of prompt lengths in tokens: cycled over "
                                                "the requests in the closed loop (default 1024); in the open loop "
                                                "each request draws one uniformly (seeded) "
                                                "(default 128,512,1024,2048)"),
    max_tokens: Optional[str] = typer.Option(None, help="completion tokens per request: one value in the closed "
                                             "loop (default 32); in the open loop a comma list each request draws "
                                             "one from uniformly (seeded) (default 16,64,128)"),
    rounds: int = typer.Option(2, help="phases per setting and level (rate), in snake order (off, on, on, off); "
                               "the requests are split between them"),
    seed: int = typer.Option(0, help="seeds the prompts' essay offsets (open loop: also arrivals, lengths, budgets)"),
    max_in_flight: Optional[int] = typer.Option(None, help="open loop: cap on unanswered requests, to protect the "
                                                "client; requests held back by it are reported as capped "
                                                "(default 128)"),
    interference: bool = typer.Option(False, "--interference", help="open loop: also probe prefill interference "
                                      "per scheduler: TTFT of short requests (128 prompt tokens, 8 out) alone vs "
                                      "while a long one (the longest --prompt-tokens, largest --max-tokens) runs"),
    probe_requests: Optional[int] = typer.Option(None, help="open loop: short requests per half of the "
                                                 "interference probe (default 8)"),
    endpoint: Optional[str] = typer.Option(None, help="a running deployment of the spec (default: deploy it here); "
                                           "the open loop then takes one --schedulers kind, the one it runs"),
    port: Optional[int] = typer.Option(None, help="override the spec's port when deploying"),
    adapters: Optional[int] = typer.Option(None, "--adapters", help="open loop: one merged adapter vs this many "
                                           "adapters per --adapter-methods mixed in one batch (and one unmerged), "
                                           "on the spec's base model, instead of scheduler kinds"),
    adapter_methods: Optional[str] = typer.Option(None, help="with --adapters: comma list of methods, the first "
                                                  "low-rank (default lora,cla: the selector path vs the low-rank one)"),
    adapter_rank: Optional[int] = typer.Option(None, help="with --adapters: their rank (default 16)"),
    out: Path = typer.Option(Path("bench-results"), help="folder for serve-<model>.csv/.md/.json (open loop: "
                             "serve-open-<model>.*, with --adapters serve-adapters-<model>.*) and the deployments' "
                             "logs"),
) -> None:
    """Output tokens/s and latency of a deployment under load, ART settings (and scheduler kinds) side by side:
    a closed loop per --concurrency level, or an open loop (Poisson arrivals) per --rates rate. Open loop, per
    (rate, scheduler, ART): errors (503s apart), output tokens/s over the phases' wall time,
    TTFT, TPOT ((latency - TTFT) / (tokens - 1)) and latency p50/p99, ratios vs static and vs off. A rate is
    sustained when every request was answered at it and below, and p99 latency stays within 2x the lowest
    rate's; the report names the highest rate static sustains (start --rates at a light load). With --adapters N:
    one merged adapter vs N adapters per method mixed in one batch (and one unmerged, and the base), same open
    loop, both deployments up at once and driven in turn."""
    from pipelines.bench import serve as bs
    from pipelines.progress import bar, console as make_console

    if adapters is not None:
        if rates is None:
            raise typer.BadParameter("needs --rates (the open-loop mode)", param_hint="--adapters")
        for option, value in {"--concurrency": concurrency, "--schedulers": schedulers, "--endpoint": endpoint,
                              "--interference": interference or None, "--probe-requests": probe_requests}.items():
            if value is not None:
                raise typer.BadParameter("not with --adapters (it deploys the spec's scheduler itself)",
                                         param_hint=option)
        _bench_serve_adapters(spec, rates, adapters, adapter_methods, adapter_rank, requests, art, prompt_tokens,
                              max_tokens, rounds, seed, max_in_flight, port, out)
        return
    for option, value in {"--adapter-methods": adapter_methods, "--adapter-rank": adapter_rank}.items():
        if value is not None:
            raise typer.BadParameter("only with --adapters", param_hint=option)
    art = art or "off,on"
    if rates is not None:
        if concurrency is not None:
            raise typer.BadParameter("give --concurrency (closed loop) or --rates (open loop), not both",
                                     param_hint="--concurrency")
        _bench_serve_open(spec, rates, schedulers, requests, art, prompt_tokens, max_tokens, rounds, seed,
                          max_in_flight, interference, probe_requests, endpoint, port, out)
        return
    open_only = {"--schedulers": schedulers, "--max-in-flight": max_in_flight,
                 "--interference": interference or None, "--probe-requests": probe_requests}
    for option, value in open_only.items():
        if value is not None:
            raise typer.BadParameter("only with --rates (the open-loop mode)", param_hint=option)
    budgets = ints(max_tokens or "32", "--max-tokens")
    if len(budgets) != 1:
        raise typer.BadParameter("the closed loop takes one value (several: with --rates)", param_hint="--max-tokens")
    cfg = bs.BenchServeConfig(spec=str(spec), concurrency=ints(concurrency or "1,4,16", "--concurrency"),
                              requests=requests, art=names(art),
                              prompt_tokens=ints(prompt_tokens or "1024", "--prompt-tokens"),
                              max_tokens=budgets[0], rounds=rounds, seed=seed, endpoint=endpoint, port=port)
    with _bad_arguments_exit_2():
        checked = bs.check(cfg)
        if not endpoint:
            _check_port(checked[0])
    console = make_console(220)
    with bar(console) as update:
        report = bs.run(cfg, out, update, checked)
    paths = bs.write(report, out)
    bs.print_table(console, report.rows, "off" if "off" in cfg.art else cfg.art[0])
    console.print(f"written: {paths['csv']}, {paths['md']}, {paths['json']}")


def _bench_serve_open(spec, rates, schedulers, requests, art, prompt_tokens, max_tokens, rounds, seed,
                      max_in_flight, interference, probe_requests, endpoint, port, out) -> None:
    from pipelines.bench import serve_open as so
    from pipelines.progress import bar, console as make_console

    cfg = so.OpenLoopConfig(
        spec=str(spec), rates=numbers(rates, float, "--rates"), schedulers=names(schedulers or "continuous,static"),
        requests=requests, art=names(art), prompt_tokens=ints(prompt_tokens or "128,512,1024,2048", "--prompt-tokens"),
        max_tokens=ints(max_tokens or "16,64,128", "--max-tokens"), rounds=rounds, seed=seed,
        max_in_flight=128 if max_in_flight is None else max_in_flight, interference=interference,
        probe_requests=8 if probe_requests is None else probe_requests, endpoint=endpoint, port=port)
    with _bad_arguments_exit_2():
        checked = so.check(cfg)
        if not endpoint:
            _check_port(next(iter(checked[0].values())))
    console = make_console(220)
    with bar(console) as update:
        report = so.run(cfg, out, update, checked)
    paths = so.write(report, out)
    so.print_report(console, report)
    console.print(f"written: {paths['csv']}, {paths['md']}, {paths['json']}")


def _bench_serve_adapters(spec, rates, adapters, methods, rank, requests, art, prompt_tokens, max_tokens, rounds,
                          seed, max_in_flight, port, out) -> None:
    from pipelines.bench import serve_adapters as sa
    from pipelines.progress import bar, console as make_console

    arts = names(art or "off")
    if len(arts) != 1:
        raise typer.BadParameter("one setting with --adapters", param_hint="--art")
    cfg = sa.AdapterBenchConfig(
        spec=str(spec), rates=numbers(rates, float, "--rates"), adapters=adapters,
        methods=names(methods or "lora,cla"), rank=16 if rank is None else rank, requests=requests, art=arts[0],
        prompt_tokens=ints(prompt_tokens or "128,512", "--prompt-tokens"),
        max_tokens=ints(max_tokens or "32,64", "--max-tokens"), rounds=rounds, seed=seed,
        max_in_flight=128 if max_in_flight is None else max_in_flight, port=port)
    with _bad_arguments_exit_2():
        checked = sa.check(cfg)
        _check_port(checked[0])
    console = make_console(220)
    with bar(console) as update:
        report = sa.run(cfg, out, update, checked)
    paths = sa.write(report, out)
    sa.print_report(console, report)
    console.print(f"written: {paths['csv']}, {paths['md']}, {paths['json']}")


@contextmanager
def _bad_arguments_exit_2():
    """A bad option (ConfigError: BadParameter on it) or spec (ServeSpecError) exits 2, before any deployment."""
    from pipelines.bench.serve import ConfigError
    from pipelines.serving.spec import ServeSpecError

    try:
        yield
    except ConfigError as e:
        raise typer.BadParameter(e.message, param_hint=e.option) from None
    except ServeSpecError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None


def _check_port(spec) -> None:
    from pipelines.serving.deploy import check_port_free

    check_port_free(spec.host, spec.port)


@app.command("kernel")
def bench_kernel(
    shape: str = typer.Option("smollm2-135m", help="attention shape (heads, KV heads, head dim) of: smollm2-135m, "
                              "gemma3-270m, llama3-8b"),
    contexts: str = typer.Option("4096,16384", help="comma list of cached positions per row"),
    batch: str = typer.Option("4,16", help="comma list of decode batch sizes"),
    art: str = typer.Option("tuned,certified,aggressive", help="comma list of ART presets, each optionally with "
                            "overrides (tuned+tau=3e-3)"),
    device: str = typer.Option("auto", help="auto (a GPU when one is visible), cpu or cuda"),
    dtype: str = typer.Option("bfloat16", help="float32 or bfloat16"),
    rounds: int = typer.Option(3, help="round-robin rounds over the rows"),
    reps: int = typer.Option(10, help="timed calls per row and round"),
    sink_nats: float = typer.Option(10.0, help="how far above the background the sinks' scores sit"),
    recent_nats: float = typer.Option(4.0, help="how far above the background the 8 newest positions' scores sit"),
    summaries: str = typer.Option("kept", help="comma list: kept (per-block summaries made once, as the serving "
                                  "KV pool keeps them) and/or per-call (made in every call)"),
    out: Path = typer.Option(Path("bench-results"), help="folder for kernel-<device>.csv/.md/.json"),
) -> None:
    """Decode attention alone: torch SDPA vs our kernel walking every block vs ART presets, on CPU or GPU."""
    from pipelines.bench import kernel as bk
    from pipelines.progress import bar, console as make_console

    try:
        cfg = bk.KernelBenchConfig(shape=shape, contexts=ints(contexts, "--contexts"), batches=ints(batch, "--batch"),
                                   art=names(art), device=device, dtype=dtype, rounds=rounds, reps=reps,
                                   sink_nats=sink_nats, recent_nats=recent_nats, summaries=names(summaries))
    except bk.ConfigError as e:
        hint = "--batch" if e.field == "batches" else "--" + e.field.replace("_", "-")
        raise typer.BadParameter(e.message, param_hint=hint) from None
    console = make_console(200)
    with bar(console) as update:
        rows = bk.run(cfg, update)
    paths = bk.write(cfg, rows, out)
    bk.print_report(console, cfg, rows)
    console.print(f"written: {paths['csv']}, {paths['md']}, {paths['json']}")


@app.command("slack")
def bench_slack(
    model: str = typer.Option("smollm2-135m", help="model alias, HF folder or random:<arch>-tiny (a causal LM)"),
    context: int = typer.Option(4096, help="prompt length in tokens"),
    prompts: int = typer.Option(4, help="passkey prompts (each captured at every layer)"),
    block_size: int = typer.Option(64, help="KV positions per block"),
    fractions: str = typer.Option("0.5,0.8", help="comma list of visited fractions at which bounds are compared"),
    art: str = typer.Option(",".join(SLACK_RUNS), help="comma list of ART settings run end to end"),
    seed: int = typer.Option(0, help="seeds passkeys and haystack offsets"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads (default: all cores)"),
    out: Path = typer.Option(Path("bench-results"), help="folder for slack-<model>.csv/.md/.json"),
) -> None:
    """How loose certified mode's bounds are on a real model's decode attention (box vs box+ball score
    bounds, 2 W max|v| vs the value-aware error bound), and what certified and skip settings visit."""
    import torch

    from pipelines.bench import slack
    from pipelines.progress import bar, console as make_console
    from workers.data.assets import check_model_name

    try:
        check_model_name(model)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--model") from None
    try:
        cfg = slack.SlackConfig(model=model, context=context, prompts=prompts, block_size=block_size,
                                fractions=numbers(fractions, float, "--fractions"), runs=names(art), seed=seed)
    except slack.ConfigError as e:
        hint = {"runs": "--art"}.get(e.field, "--" + e.field.replace("_", "-"))
        raise typer.BadParameter(e.message, param_hint=hint) from None
    if threads:
        torch.set_num_threads(threads)
    console = make_console(200)
    with bar(console) as update:
        report = slack.run(cfg, update)
    paths = slack.write(report, out)
    slack.print_report(console, report)
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


