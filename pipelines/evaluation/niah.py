"""`sparta eval niah`: RULER-style needle-in-a-haystack accuracy of KV policy x ART configurations on the
same prompts in one run, through a served endpoint or in-process, recorded as one MLflow run.

    cfg = NiahConfig(model="smollm2-135m", lengths=(1024, 2048), art=("off", "certified+eps=0.01"))
    report = run(cfg, progress)        # every configuration answers every case (workers.data.niah)
    run_id = log_mlflow(report, out)   # the grid as metrics; heatmaps, CSV, markdown, answers as artifacts

Prompts are token ids built here with the served model's tokenizer (its chat template included), so their
lengths are exact; an endpoint gets them as `POST /v1/completions` with `prompt` = ids, greedy, and the
configuration in the request's `art` and `kv` fields. The cases are processed a chunk at a time, every
configuration answering the chunk (in a rotating order) before the next one starts, so that machine drift
hits them alike. In-process, each prompt chunk is prefilled once per KV policy and every ART setting
decodes from a copy of it (`EngineConfig.prefill_reuse`: ART changes decode only), and tokens/s is
completion tokens over a configuration's decode time; through an endpoint it is over the requests' wall
time, prefill included.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from pipelines import tables
from pipelines.evaluation import frontier, kvpress_layout
from workers.hardware import DEVICES, DTYPES, resolve_device, resolve_dtype
from workers.data.niah import VARIANTS, Case, build_cases, found_values, score

EXPERIMENT = "sparta-eval"
OFF = "off"
ON = "on"   # through an endpoint: the deployment's own ART setting (no override sent); in-process: ON_PRESET
ON_PRESET = "tuned"
HAYSTACKS = ("essays", "noise")


class ConfigError(ValueError):
    """A bad evaluation setting; `field` names the config field (the CLI turns it into an option name)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class EvalError(RuntimeError):
    """The endpoint refused or failed a request."""


@dataclass(frozen=True)
class RunConfig:
    """One configuration: a KV policy (with its ratio) and an ART setting ("off" or a preset string)."""

    policy: str
    ratio: float
    art: str

    @property
    def label(self) -> str:
        return f"{self.policy}/{self.art}"

    @property
    def key(self) -> str:
        """The label as MLflow metric names allow it ('+' and '=' are not)."""
        return self.label.replace("+", "_").replace("=", "")


def check_art_settings(art: tuple[str, ...]) -> None:
    """The checks every evaluation makes of its ART settings (ConfigError naming the field)."""
    from attention.config import parse_art

    if not art or len(set(art)) != len(art):
        raise ConfigError("art", f"give one or more distinct settings, got {', '.join(art) or '(none)'}")
    for a in art:
        if a not in (OFF, ON):
            try:
                parse_art(a)
            except ValueError as e:
                raise ConfigError("art", f"{e} (or off, on)") from None


def checked_dtype(device: str, dtype: str) -> str:
    """The dtype an evaluation runs in (auto: what this machine runs natively); ConfigError on bad names."""
    if device not in DEVICES:
        raise ConfigError("device", f"valid: {', '.join(DEVICES)}; got {device!r}")
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"valid: {', '.join(DTYPES)}; got {dtype!r}")
    return resolve_dtype(dtype, resolve_device(device))


def run_configs(policies, policy_ratio: float, art) -> list[RunConfig]:
    """Every policy x ART setting (dense takes no ratio)."""
    return [RunConfig(p, policy_ratio if p != "dense" else 0.0, a) for p in policies for a in art]


@dataclass
class NiahConfig:
    """What to evaluate. Exactly one of `model` (in-process: an alias, folder, random:<arch>-tiny or a
    models:/ / runs:/ URI) and `endpoint` (a sparta serve URL). `art`: "off", "on" (the endpoint's own
    setting; tuned in-process) or ART presets with optional overrides (attention.config.parse_art); each
    policy runs with each art setting.
    `max_tokens` None: a per-case budget (workers.data.niah.Case.max_tokens)."""

    model: str | None = None
    endpoint: str | None = None
    tokenizer: str | None = None
    model_overrides: dict = field(default_factory=dict)
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    variants: tuple[str, ...] = VARIANTS
    policies: tuple[str, ...] = ("dense",)
    policy_ratio: float = 0.5
    art: tuple[str, ...] = (OFF, "tuned")
    samples: int = 1
    needles: int = 4
    haystack: str = "essays"
    max_tokens: int | None = None
    batch: int = 4
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    threads: int | None = None
    api_key: str | None = None
    tracking_uri: str | None = None
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        from attention.hf import POLICIES

        for name in ("lengths", "depths", "variants", "policies", "art"):
            setattr(self, name, tuple(getattr(self, name)))
        if (self.model is None) == (self.endpoint is None):
            raise ConfigError("model", "give exactly one of a model (in-process) or an endpoint URL")
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError("endpoint", f"give an http(s):// URL, got {self.endpoint!r}")
        for name, values, valid in (("variants", self.variants, VARIANTS), ("policies", self.policies, tuple(POLICIES))):
            unknown = [v for v in values if v not in valid]
            if unknown or not values or len(set(values)) != len(values):
                raise ConfigError(name, f"{'unknown ' + ', '.join(map(repr, unknown)) + '; ' if unknown else ''}"
                                        f"give one or more distinct of: {', '.join(valid)}")
        if not self.lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 16 for n in self.lengths):
            raise ConfigError("lengths", f"give one or more integers >= 16, got {list(self.lengths)}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ConfigError("depths", f"give one or more fractions in [0, 1], got {list(self.depths)}")
        if self.haystack not in HAYSTACKS:
            raise ConfigError("haystack", f"unknown haystack {self.haystack!r}; valid: {', '.join(HAYSTACKS)}")
        if not 0.0 <= self.policy_ratio < 1.0:
            raise ConfigError("policy_ratio", f"must be in [0, 1), got {self.policy_ratio!r}")
        for name, low in (("samples", 1), ("needles", 2), ("batch", 1)):
            if getattr(self, name) < low:
                raise ConfigError(name, f"must be >= {low}, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        object.__setattr__(self, "dtype", checked_dtype(self.device, self.dtype))
        check_art_settings(self.art)

    def configs(self) -> list[RunConfig]:
        return run_configs(self.policies, self.policy_ratio, self.art)


# -- answering: in-process or through an endpoint -------------------------------------------------
@dataclass
class Answer:
    text: str
    completion_tokens: int
    visited: float      # this prompt's share of its decode batch's visited / candidate KV blocks
    candidates: float
    art_mode: str       # what the server decoded with: off, stability or certified
    prefill_s: float = 0.0   # in-process: its batch's prefill (0 when reused), taken out of the decode time


class InProcess:
    """The model loaded here (workers.serving.engine.Engine, no Ray)."""

    def __init__(self, cfg: NiahConfig, tokenizer_name: str | None, resolved_model: str, adapter: str | None,
                 overrides: dict, max_context: int, max_tokens: int):
        from workers.serving.engine import Engine, EngineConfig

        self.engine = Engine(EngineConfig(
            model=resolved_model, adapter=adapter, tokenizer=tokenizer_name, model_overrides=overrides,
            dtype=cfg.dtype, device=cfg.device, max_context=max_context, max_new_tokens=max_tokens,
            threads=cfg.threads, prefill_reuse=len({(c.policy, c.ratio) for c in cfg.configs()})))

    def answer(self, cases: list[Case], conf: RunConfig, budgets: list[int]) -> list[Answer]:
        from workers.serving.engine import Job
        from workers.serving.requests import OFF as ART_OFF, art_config

        art = ART_OFF if conf.art == OFF else art_config(ON_PRESET if conf.art == ON else conf.art)
        done = self.engine.run([Job(list(c.prompt), b, art=art, kv=(conf.policy, conf.ratio))
                                for c, b in zip(cases, budgets)])
        return [Answer(d.text, d.completion_tokens, d.art.visited_blocks / d.art.batch_size,
                       d.art.candidate_blocks / d.art.batch_size, d.art.mode, d.prefill_s) for d in done]


def _request(url: str, body: dict | None, api_key: str | None, timeout: float) -> dict:
    from pipelines.http import EndpointError, request_json

    try:
        return request_json(url, body, api_key, timeout)
    except EndpointError as e:
        raise EvalError(str(e)) from None


class Endpoint:
    """A sparta serve deployment: completions from token-id prompts, the configuration per request."""

    def __init__(self, url: str, api_key: str | None, timeout: float):
        self.url, self.api_key, self.timeout = url.rstrip("/"), api_key, timeout
        [card, *_] = _request(self.url + "/v1/models", None, api_key, 30)["data"]
        self.model, self.max_model_len = card["id"], card.get("max_model_len")

    def _one(self, case: Case, conf: RunConfig, budget: int) -> Answer:
        body = {"model": self.model, "prompt": list(case.prompt), "max_tokens": budget, "temperature": 0.0,
                "kv": {"policy": conf.policy, "ratio": conf.ratio}, **({} if conf.art == ON else {"art": conf.art})}
        r = _request(self.url + "/v1/completions", body, self.api_key, self.timeout)
        art, n = r["art"], max(1, r["art"]["batch_size"])
        return Answer(r["choices"][0]["text"], r["usage"]["completion_tokens"], art["visited_blocks"] / n,
                      art["candidate_blocks"] / n, art["mode"])

    def answer(self, cases: list[Case], conf: RunConfig, budgets: list[int]) -> list[Answer]:
        with ThreadPoolExecutor(len(cases)) as pool:   # concurrent: the replica batches them
            return list(pool.map(lambda cb: self._one(conf=conf, case=cb[0], budget=cb[1]), zip(cases, budgets)))


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class Row:
    """One configuration's answer to one case."""

    config: str
    policy: str
    art: str
    variant: str
    length: int
    depth: float
    sample: int
    correct: bool
    found: int            # expected values found in the answer
    expected: int
    completion_tokens: int
    art_mode: str
    answer: str
    values: str           # the expected values, comma-separated
    prompt_sha: str       # of the prompt's token ids: equal across configurations


@dataclass
class ConfigSummary:
    config: str
    accuracy: float
    by_variant: dict[str, float]
    tokens_per_s: float
    skipped_fraction: float
    seconds: float
    completion_tokens: int
    agree: float | None   # fraction of prompts answered right/wrong alike as this policy's ART-off config
    correct: int = 0
    total: int = 0
    wilson: tuple[float, float] = (0.0, 1.0)   # 95% Wilson interval of the accuracy
    identical: float | None = None   # fraction of answers with exactly the ART-off config's text
    changed: list[dict] = field(default_factory=list)   # the cases whose score differs from ART off


def wilson_interval(correct: int, total: int) -> tuple[float, float]:
    """95% Wilson score interval of correct / total (scipy's binomial test)."""
    from scipy.stats import binomtest

    if total == 0:
        return 0.0, 1.0
    ci = binomtest(correct, total).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


@dataclass
class NiahReport:
    config: NiahConfig
    configs: list[RunConfig]
    rows: list[Row]
    summaries: list[ConfigSummary]
    source: dict          # model or endpoint, tokenizer, served model name, resolved max context

    def grid(self) -> list[dict]:
        """Accuracy per (config, variant, length, depth): the mean over samples."""
        cells: dict[tuple, list[bool]] = defaultdict(list)
        for r in self.rows:
            cells[(r.config, r.variant, r.length, r.depth)].append(r.correct)
        return [{"config": c, "variant": v, "length": n, "depth": d, "accuracy": sum(xs) / len(xs), "prompts": len(xs)}
                for (c, v, n, d), xs in cells.items()]


def _sha(ids) -> str:
    return hashlib.sha1(json.dumps(list(ids)).encode()).hexdigest()[:16]


def _tokenizer_name(cfg: NiahConfig, model: str | None, served: str | None) -> str | None:
    """The tokenizer that builds the prompts: --tokenizer, else the model's own (bytes for random models)."""
    from workers.serving.codec import BYTES

    if cfg.tokenizer:
        return cfg.tokenizer
    name = model or served
    if name and name.startswith("random:"):
        return BYTES
    return name


def resolve_source(cfg) -> tuple[str, str | None, dict]:
    """(base model, adapter folder, overrides) of --model, registry URIs resolved through MLflow; `cfg`: any
    evaluation config with `model`, `tracking_uri` and `model_overrides`."""
    from pipelines.serving.spec import ServeSpec, is_registry_uri

    if not is_registry_uri(cfg.model):
        return cfg.model, None, dict(cfg.model_overrides)
    from pipelines.serving.deploy import resolve_model

    got = resolve_model(ServeSpec.model_validate({"model": cfg.model, "tracking_uri": cfg.tracking_uri,
                                                  "model_overrides": dict(cfg.model_overrides)}))
    return got.model, got.adapter, dict(got.model_overrides)


def prepare(cfg: NiahConfig):
    """Build the cases and check them against the model's context, before anything heavy loads: returns
    (cases, their token budgets, a function that makes the answerer, source info). ConfigError on a misfit."""
    from workers.serving.codec import load_tokenizer
    from workers.serving.engine import EngineConfig, model_limits

    if cfg.endpoint:
        ep = Endpoint(cfg.endpoint, cfg.api_key, cfg.timeout_s)
        limit, what = ep.max_model_len, "the endpoint's max_model_len"
        tok_name = _tokenizer_name(cfg, None, ep.model)
        source = {"endpoint": ep.url, "served_model": ep.model, "max_model_len": ep.max_model_len}
        make = lambda context, budget: ep
    else:
        try:
            model, adapter, overrides = resolve_source(cfg)
            limit, _ = model_limits(EngineConfig(model=model, model_overrides=overrides))
        except ValueError as e:
            raise ConfigError("model", str(e)) from None
        what = f"{cfg.model} (its max_position_embeddings)"
        tok_name = _tokenizer_name(cfg, model, None)
        source = {"model": cfg.model, "base_model": model, "adapter": adapter, "positions": limit}
        make = lambda context, budget: InProcess(cfg, cfg.tokenizer, model, adapter, overrides, context, budget)
    try:
        tokenizer = load_tokenizer(tok_name)
    except (ValueError, OSError) as e:
        raise ConfigError("tokenizer", f"cannot load the tokenizer {tok_name!r} ({e}); give --tokenizer "
                                       "(an alias or folder with the served model's tokenizer)") from None
    try:
        cases = build_cases(tokenizer, cfg.variants, cfg.lengths, cfg.depths, cfg.samples, cfg.seed, cfg.needles,
                            cfg.haystack)
    except ValueError as e:
        raise ConfigError("lengths", str(e)) from None
    budgets = [cfg.max_tokens or c.max_tokens for c in cases]
    need = max(c.length + b for c, b in zip(cases, budgets))
    if limit and need > limit:
        raise ConfigError("lengths", f"the longest prompt ({max(cfg.lengths)} tokens) and its answer need {need} "
                                     f"positions, but {what} allows {limit}: lower --lengths or --max-tokens")
    source["tokenizer"] = tok_name
    source["chat_template"] = bool(getattr(tokenizer, "chat_template", None))
    return cases, budgets, make, source


def _chunks(cases: list[Case], size: int) -> list[list[int]]:
    """Indices of cases in chunks of at most `size`, one prompt length per chunk (no padding)."""
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(cases):
        by_len[c.length].append(i)
    return [idx[k:k + size] for idx in by_len.values() for k in range(0, len(idx), size)]


def answer_chunks(answerer, items: list, budgets: list[int], chunks: list[list[int]], configs: list[RunConfig],
                  describe: Callable, progress: Callable[[str, int, int], None]):
    """Every configuration's answers to every item, a chunk at a time, every configuration answering a chunk
    (in a rotating order: no configuration always first, machine drift hits them alike) before the next one:
    ({(item index, config label): Answer}, {config label: decode seconds})."""
    answers: dict[tuple[int, str], Answer] = {}
    seconds: dict[str, float] = defaultdict(float)
    done, total = 0, len(items) * len(configs)
    for k, chunk in enumerate(chunks):
        for conf in configs[k % len(configs):] + configs[:k % len(configs)]:
            start = time.perf_counter()
            got = answerer.answer([items[i] for i in chunk], conf, [budgets[i] for i in chunk])
            # a chunk is one prompt length under one configuration: one batch, one prefill
            seconds[conf.label] += time.perf_counter() - start - max(a.prefill_s for a in got)
            answers.update({(i, conf.label): a for i, a in zip(chunk, got)})
            done += len(chunk)
            progress(f"{conf.label} {describe(items[chunk[0]])}", done, total)
    return answers, seconds


def run(cfg: NiahConfig, progress: Callable[[str, int, int], None] = lambda *a: None) -> NiahReport:
    cases, budgets, make, source = prepare(cfg)
    configs = cfg.configs()
    total = len(cases) * len(configs)
    progress("loading the model" if cfg.model else f"connecting to {cfg.endpoint}", 0, total)
    answerer = make(max(c.length + b for c, b in zip(cases, budgets)), max(budgets))
    answers, seconds = answer_chunks(answerer, cases, budgets, _chunks(cases, cfg.batch), configs,
                                     lambda c: f"{c.length} tokens", progress)
    rows = []
    for conf in configs:
        for i, c in enumerate(cases):
            a = answers[(i, conf.label)]
            hits = found_values(a.text, c.expected)
            rows.append(Row(conf.label, conf.policy, conf.art, c.variant, c.length, c.depth, c.sample,
                            score(a.text, c.expected), sum(hits), len(hits), a.completion_tokens, a.art_mode, a.text,
                            ",".join(c.expected), _sha(c.prompt)))
    summaries = []
    for conf in configs:
        mine = [r for r in rows if r.config == conf.label]
        ans = [answers[(i, conf.label)] for i in range(len(cases))]
        base = RunConfig(conf.policy, conf.ratio, OFF).label
        agree = identical = None
        changed = []
        if conf.art != OFF and base in seconds:
            ref = [r for r in rows if r.config == base]
            agree = sum(r.correct == x.correct for r, x in zip(mine, ref)) / len(mine)
            identical = sum(r.answer == x.answer for r, x in zip(mine, ref)) / len(mine)
            changed = [{"variant": r.variant, "length": r.length, "depth": r.depth, "sample": r.sample,
                        "expected": r.values, "art_off": x.answer, "answer": r.answer, "correct": r.correct}
                       for r, x in zip(mine, ref) if r.correct != x.correct]
        tokens = sum(a.completion_tokens for a in ans)
        cand = sum(a.candidates for a in ans)
        correct = sum(r.correct for r in mine)
        summaries.append(ConfigSummary(
            conf.label, correct / len(mine),
            {v: sum(r.correct for r in mine if r.variant == v) / sum(r.variant == v for r in mine) for v in cfg.variants},
            tokens / seconds[conf.label] if seconds[conf.label] else 0.0,
            1.0 - sum(a.visited for a in ans) / cand if cand else 0.0, seconds[conf.label], tokens, agree,
            correct, len(mine), wilson_interval(correct, len(mine)), identical, changed))
    return NiahReport(cfg, configs, rows, summaries, source)


# -- outputs ---------------------------------------------------------------------------------------
def _fmt_depth(d: float) -> str:
    return f"{d:g}"


def summary_frame(report: NiahReport) -> pd.DataFrame:
    """One row per configuration: accuracy overall and per variant, tokens/s, skipped KV, agreement."""
    variants = report.config.variants
    return pd.DataFrame([[s.config, f"{s.accuracy:.3f}", f"{s.wilson[0]:.2f}-{s.wilson[1]:.2f}",
                          *(f"{s.by_variant[v]:.3f}" for v in variants),
                          f"{s.tokens_per_s:.1f}", f"{s.skipped_fraction:.1%}",
                          "-" if s.agree is None else f"{s.agree:.0%}",
                          "-" if s.identical is None else f"{s.identical:.0%}",
                          "-" if s.agree is None else str(len(s.changed))] for s in report.summaries],
                        columns=["config", "accuracy", "95% Wilson", *variants, "tokens/s", "skipped KV",
                                 "same as ART off", "identical answers", "changed"])


def grid_frame(report: NiahReport) -> pd.DataFrame:
    """Accuracy per variant x length x depth cell, one column per configuration."""
    cfg = report.config
    labels = [c.label for c in report.configs]
    grid = {(g["config"], g["variant"], g["length"], g["depth"]): g["accuracy"] for g in report.grid()}
    return pd.DataFrame([[v, str(n), _fmt_depth(d), *(f"{grid[(c, v, n, d)]:.2f}" for c in labels)]
                         for v in cfg.variants for n in cfg.lengths for d in cfg.depths],
                        columns=["variant", "length", "depth", *labels])


def markdown(report: NiahReport) -> str:
    return tables.markdown(summary_frame(report)) + "\n\n" + tables.markdown(grid_frame(report))


def write_kvpress(report: NiahReport, root: Path) -> list[Path]:
    """One kvpress RULER run folder per configuration x length (kvpress's data_dir is the length): tasks
    niah_<variant>, metrics.json {task: {"string_match": RULER's string_match_all, 0..100}} from the values found."""
    cfg = report.config
    model = report.source.get("served_model") or cfg.model
    folders = []
    for conf in report.configs:
        for length in cfg.lengths:
            mine = [r for r in report.rows if r.config == conf.label and r.length == length]
            found = defaultdict(list)
            for r in mine:
                found[f"niah_{r.variant}"].append(r.found / r.expected)
            run = kvpress_layout.KvpressRun("ruler", str(length), model, conf.policy, conf.ratio, conf.art,
                                            cfg.max_tokens, None, None if cfg.endpoint else cfg.device, cfg.seed)
            predictions = [{"task": f"niah_{r.variant}", "answer": r.values.split(","), "predicted_answer": r.answer,
                            "compression_ratio": conf.ratio, "depth": r.depth, "sample": r.sample,
                            "correct": r.correct, "art_mode": r.art_mode, "prompt_sha": r.prompt_sha} for r in mine]
            metrics = {t: {"string_match": round(100 * sum(v) / len(v), 2)} for t, v in found.items()}
            folders.append(kvpress_layout.write_run(root, run, predictions, metrics))
    return folders


def write_files(report: NiahReport, out: Path) -> dict[str, Path]:
    """niah.csv (the grid), niah.md (summary + grid), answers.jsonl (every answer), changed.jsonl (the
    answers scored unlike ART off), frontier.md and frontier.png (pipelines.evaluation.frontier, when an ART
    setting runs beside ART off), heatmap-*.png, and kvpress/<run>/ folders (kvpress_layout)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "niah.csv", "md": out / "niah.md", "answers": out / "answers.jsonl",
             "config": out / "niah.json"}
    with files["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["config", "variant", "length", "depth", "accuracy", "prompts"])
        w.writeheader()
        w.writerows(report.grid())
    files["md"].write_text(markdown(report) + "\n")
    files["answers"].write_text("".join(json.dumps(asdict(r)) + "\n" for r in report.rows))
    files["changed"] = out / "changed.jsonl"   # per ART config, the cases scored unlike its ART-off config
    files["changed"].write_text("".join(json.dumps({"config": s.config, **c}) + "\n"
                                        for s in report.summaries for c in s.changed))
    if frontier.frontier_rows(report):
        files["frontier"] = out / "frontier.md"   # skipped KV vs needles lost per ART setting (and its plot)
        files["frontier"].write_text(tables.markdown(frontier.frontier_frame(report)) + "\n")
        files["frontier_plot"] = frontier.plot_frontier(report, out / "frontier.png")
    files["config"].write_text(json.dumps({"config": asdict(report.config) | {"api_key": None},
                                           "source": report.source}, indent=2, default=str))
    for conf in report.configs:
        files[f"heatmap:{conf.label}"] = plot_heatmap(report, conf.label, out / f"heatmap-{conf.key.replace('/', '-')}.png")
    for folder in write_kvpress(report, out / "kvpress"):
        files.update({f"kvpress:{folder.name}/{f}": folder / f for f in kvpress_layout.FILES})
    return files


def plot_heatmap(report: NiahReport, label: str, path: Path) -> Path:
    """Depth (rows) x length (columns) accuracy for one configuration, one panel per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cfg = report.config
    grid = {(g["variant"], g["length"], g["depth"]): g["accuracy"] for g in report.grid() if g["config"] == label}
    n = len(cfg.variants)
    fig, axes = plt.subplots(1, n, figsize=(1.5 + (0.8 * len(cfg.lengths) + 1.0) * n, 1.8 + 0.45 * len(cfg.depths)),
                             squeeze=False, layout="constrained")
    for k, (ax, v) in enumerate(zip(axes[0], cfg.variants)):
        acc = np.array([[grid[(v, L, d)] for L in cfg.lengths] for d in cfg.depths])
        im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(cfg.lengths)), [str(L) for L in cfg.lengths])
        ax.set_yticks(range(len(cfg.depths)), [_fmt_depth(d) for d in cfg.depths])
        ax.set_xlabel("length (tokens)")
        if k == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(v)
        for (i, j), a in np.ndenumerate(acc):
            ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle(f"NIAH accuracy: {label}")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def metrics(report: NiahReport) -> dict[str, float]:
    """MLflow metrics: niah/<config>/<variant>/<length>/<depth> per cell, and per configuration
    accuracy (overall and per variant), tokens_per_s, skipped_fraction, and against ART off agreement,
    identical answers, changed and lost ones."""
    key = {c.label: c.key for c in report.configs}
    out = {f"niah/{key[g['config']]}/{g['variant']}/{g['length']}/{_fmt_depth(g['depth'])}": g["accuracy"]
           for g in report.grid()}
    for s in report.summaries:
        k = key[s.config]
        out[f"accuracy/{k}"] = s.accuracy
        out.update({f"accuracy/{k}/{v}": a for v, a in s.by_variant.items()})
        out[f"tokens_per_s/{k}"] = s.tokens_per_s
        out[f"skipped_fraction/{k}"] = s.skipped_fraction
        out[f"accuracy_wilson_low/{k}"], out[f"accuracy_wilson_high/{k}"] = s.wilson
        if s.agree is not None:
            out[f"agree_with_art_off/{k}"] = s.agree
            out[f"identical_to_art_off/{k}"] = s.identical
            out[f"changed_vs_art_off/{k}"] = len(s.changed)
            out[f"needles_lost_vs_art_off/{k}"] = sum(not c["correct"] for c in s.changed)
    return out


def log_mlflow(report: NiahReport, out: Path, experiment: str = EXPERIMENT, run_name: str | None = None) -> str:
    """One MLflow run with the grid as metrics and the files of `write_files` as artifacts; its id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from pipelines.mlflow_store import ROLE_TAG, ensure_experiment, log_metrics, log_params, resolve_tracking_uri

    cfg = report.config
    uri = resolve_tracking_uri(cfg.tracking_uri)
    client = MlflowClient(uri)
    run = client.create_run(ensure_experiment(uri, experiment), run_name=run_name or
                            f"niah-{(report.source.get('served_model') or cfg.model or '').replace('/', '_')[-40:]}",
                            tags={ROLE_TAG: "eval", "sparta.eval": "niah"})
    rid = run.info.run_id
    try:
        params = {"source": cfg.endpoint or cfg.model, "tokenizer": report.source.get("tokenizer"),
                  "lengths": ",".join(map(str, cfg.lengths)), "depths": ",".join(map(_fmt_depth, cfg.depths)),
                  "variants": ",".join(cfg.variants), "policies": ",".join(cfg.policies),
                  "policy_ratio": cfg.policy_ratio, "art": ",".join(cfg.art), "samples": cfg.samples,
                  "needles": cfg.needles, "haystack": cfg.haystack, "max_tokens": cfg.max_tokens or "auto",
                  "batch": cfg.batch, "seed": cfg.seed, "dtype": cfg.dtype if cfg.model else "served",
                  "prompts": len({r.prompt_sha for r in report.rows}),
                  "chat_template": report.source.get("chat_template")}
        log_params(client, rid, {k: str(v) for k, v in params.items()})
        now = int(time.time() * 1000)
        log_metrics(client, rid, [Metric(k, float(v), now, 0) for k, v in metrics(report).items()])
        files = write_files(report, out)
        for name, path in files.items():
            client.log_artifact(rid, str(path), "heatmaps" if name.startswith("heatmap:") else
                                None if path.parent == out else str(path.parent.relative_to(out)))
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")
    return rid


def print_report(console, report: NiahReport) -> None:
    title = (f"NIAH accuracy ({len({r.prompt_sha for r in report.rows})} prompts per configuration; "
             f"{report.config.haystack} haystack)")
    console.print(tables.rich_table(summary_frame(report), title))


def default_api_key() -> str | None:
    return os.environ.get("SPARTA_API_KEY") or None
