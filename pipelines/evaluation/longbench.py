"""`sparta eval longbench`: LongBench's English tasks (v1 or LongBench-E, from a local folder of the official
files) answered in-process by every KV policy x ART configuration on the same prompts, scored with
LongBench's per-task metrics and recorded as one MLflow run.

    cfg = LongBenchConfig(data="LongBench/data", model="smollm2-135m", tasks=("hotpotqa",), limit=20)
    report = run(cfg, progress)        # prompts from workers.data.longbench, answers from niah.InProcess
    run_id = log_mlflow(report, out)   # scores as metrics; tables, answers, kvpress-layout folders as artifacts

Scores follow LongBench's eval.py: per example the best score over the reference answers (first line only
on trec, triviaqa and samsum), per task the mean x 100. `changed` counts the answers whose text differs
from the same policy's ART-off answer.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import string
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from pipelines import tables
from pipelines.evaluation import kvpress_layout
from pipelines.evaluation.niah import (OFF, ConfigError, InProcess, RunConfig, answer_chunks, check_art_settings,
                                       checked_dtype, resolve_source, run_configs)
from workers.data import longbench as lb
from workers.hardware import resolve_device

EXPERIMENT = "sparta-eval"
FIRST_LINE_TASKS = ("trec", "triviaqa", "samsum")   # scored on the answer's first line (LongBench: + lsht)
BUCKETS = ("0-4k", "4-8k", "8k+")                   # LongBench-E's context lengths (words)


# -- metrics: one prediction against one reference, in 0..1 -----------------------------------------
def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation and the articles a/an/the removed, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def qa_f1(prediction: str, reference: str, all_classes=None) -> float:
    """Token-level F1 of the normalised texts (SQuAD; LongBench's qa_f1_score)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])   # no stemming, as LongBench


def rouge_l(prediction: str, reference: str, all_classes=None) -> float:
    """ROUGE-L F-measure (the rouge-score package: lower-cased alphanumeric tokens, longest common
    subsequence over the whole text)."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def classification(prediction: str, reference: str, all_classes) -> float:
    """LongBench's classification score: 1/k when the reference is among the k class names found in the
    prediction, else 0; a class that is part of the reference's own name ("location" in "other location")
    does not count. (LongBench removes those while iterating, which skips one of two adjacent such
    classes; here all are removed.)"""
    found = [c for c in all_classes if c in prediction]
    found = [c for c in found if c == reference or c not in reference]
    return 1.0 / len(found) if reference in found else 0.0


def _share_equal(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, reference: str, all_classes=None) -> float:
    """passage_retrieval_en: the share of the numbers in the prediction that are the reference's paragraph."""
    found = re.findall(r"Paragraph (\d+)", reference)
    if not found:
        raise ValueError(f"a passage_retrieval_en answer must name 'Paragraph N', got {reference!r}")
    return _share_equal(prediction, found[0])


def count(prediction: str, reference: str, all_classes=None) -> float:
    """passage_count: the share of the numbers in the prediction that equal the reference count."""
    return _share_equal(prediction, str(reference).strip())


def code_similarity(prediction: str, reference: str, all_classes=None) -> float:
    """lcc, repobench-p: the prediction's first line that is not a comment or a code fence (no `, #, //),
    against the reference by normalised Indel similarity (rapidfuzz's fuzz.ratio; LongBench uses fuzzywuzzy's,
    which rounds to whole percents)."""
    from rapidfuzz import fuzz

    line = next((s for s in prediction.lstrip("\n").split("\n") if not any(m in s for m in ("`", "#", "//"))), "")
    return fuzz.ratio(line, reference) / 100.0


METRICS: dict[str, Callable[..., float]] = {
    **{t: qa_f1 for t in ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa")},
    **{t: rouge_l for t in ("gov_report", "qmsum", "multi_news", "samsum")},
    "trec": classification, "passage_retrieval_en": retrieval, "passage_count": count,
    "lcc": code_similarity, "repobench-p": code_similarity,
}


def example_score(task: str, prediction: str, answers, all_classes=None) -> float:
    """An answer's score in 0..1: the best over the reference answers."""
    if task not in METRICS:
        lb.check_task(task)   # names Chinese tasks as unsupported, unknown ones as unknown
    if task in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return max((METRICS[task](prediction, ref, all_classes) for ref in answers), default=0.0)


def task_score(scores: list[float]) -> float:
    """A task's score: the mean example score x 100, rounded to 2 places (LongBench's scorer)."""
    return round(100 * sum(scores) / len(scores), 2)


def bucket(length: int) -> str:
    return BUCKETS[0] if length < 4000 else BUCKETS[1] if length < 8000 else BUCKETS[2]


def bucket_scores(scores: list[float], lengths: list[int]) -> dict[str, float | None]:
    """LongBench-E: the task score per context-length bucket (None for an empty bucket)."""
    by = defaultdict(list)
    for s, n in zip(scores, lengths):
        by[bucket(n)].append(s)
    return {b: task_score(by[b]) if by[b] else None for b in BUCKETS}


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class LongBenchConfig:
    """What to evaluate: `tasks` from the folder `data` (LongBench-E's files when `e`), the first `limit`
    examples of each, prompts cut in the middle to `max_length` tokens; every policy in `policies` with every
    `art` setting ("off", "on" = tuned, or ART presets with overrides), in-process on `model` (an alias,
    folder, random:<arch>-tiny, or a models:/ / runs:/ URI). `max_new_tokens` None: LongBench's per task."""

    data: str
    model: str
    tasks: tuple[str, ...] = lb.TASKS
    e: bool = False
    policies: tuple[str, ...] = ("dense",)
    policy_ratio: float = 0.5
    art: tuple[str, ...] = (OFF, "tuned")
    limit: int | None = None
    max_length: int = 3500   # LongBench's prompt budget for its 4K-context models
    max_new_tokens: int | None = None
    batch: int = 1
    dtype: str = "auto"
    device: str = "auto"
    threads: int | None = None
    model_overrides: dict = field(default_factory=dict)
    tracking_uri: str | None = None

    def __post_init__(self) -> None:
        from attention.hf import POLICIES

        for name in ("tasks", "policies", "art"):
            setattr(self, name, tuple(getattr(self, name)))
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError("tasks", f"give one or more distinct tasks, got {', '.join(self.tasks) or '(none)'}")
        for t in self.tasks:
            try:
                lb.check_task(t, self.e)
            except ValueError as err:
                raise ConfigError("tasks", str(err)) from None
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown or not self.policies or len(set(self.policies)) != len(self.policies):
            raise ConfigError("policies", f"{'unknown ' + ', '.join(map(repr, unknown)) + '; ' if unknown else ''}"
                                          f"give one or more distinct of: {', '.join(POLICIES)}")
        if not 0.0 <= self.policy_ratio < 1.0:
            raise ConfigError("policy_ratio", f"must be in [0, 1), got {self.policy_ratio!r}")
        check_art_settings(self.art)
        for name, low in (("limit", 1), ("max_length", 16), ("max_new_tokens", 1), ("batch", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(name, f"must be >= {low}, got {value}")
        self.dtype = checked_dtype(self.device, self.dtype)

    def configs(self) -> list[RunConfig]:
        return run_configs(self.policies, self.policy_ratio, self.art)


@dataclass
class Row:
    """One configuration's answer to one example."""

    config: str
    policy: str
    art: str
    task: str
    id: str
    line: int
    length: int              # LongBench's context length (words)
    prompt_tokens: int
    truncated: bool
    max_tokens: int          # the answer budget
    input: str               # the example's question (or query, or few-shot tail)
    answer: str
    answers: list[str]       # the references
    all_classes: list[str] | None
    score: float             # 0..1
    completion_tokens: int
    art_mode: str
    prompt_sha: str          # of the prompt's token ids: equal across configurations
    changed: bool | None     # the text differs from this policy's ART-off answer (None: no such config)


@dataclass
class ConfigSummary:
    config: str
    scores: dict[str, float]              # per task, 0..100
    buckets: dict[str, dict]              # LongBench-E: per task, score per length bucket
    tokens_per_s: float
    skipped_fraction: float
    seconds: float
    completion_tokens: int
    changed: int | None                   # answers whose text differs from ART off
    compared: int

    @property
    def average(self) -> float:
        return round(sum(self.scores.values()) / len(self.scores), 2)


@dataclass
class LongBenchReport:
    config: LongBenchConfig
    configs: list[RunConfig]
    rows: list[Row]
    summaries: list[ConfigSummary]
    source: dict


def _sha(ids) -> str:
    return hashlib.sha1(json.dumps(list(ids)).encode()).hexdigest()[:16]


def prepare(cfg: LongBenchConfig):
    """Read the examples and build their prompts, checked against the model's positions before the model
    loads: (prompts, a function that makes the answerer, source info). ConfigError on a misfit."""
    from workers.serving.codec import BYTES, load_tokenizer
    from workers.serving.engine import EngineConfig, model_limits

    try:
        examples = [x for t in cfg.tasks for x in lb.load_task(cfg.data, t, cfg.e, cfg.limit)]
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError("data", str(err)) from None
    try:
        model, adapter, overrides = resolve_source(cfg)
        limit, _ = model_limits(EngineConfig(model=model, model_overrides=overrides))
    except ValueError as err:
        raise ConfigError("model", str(err)) from None
    tok_name = BYTES if model.startswith("random:") else model
    try:
        tokenizer = load_tokenizer(tok_name)
    except (ValueError, OSError) as err:
        raise ConfigError("model", f"cannot load the tokenizer of {tok_name!r} ({err})") from None
    prompts = [lb.build_prompt(tokenizer, x, cfg.max_length, cfg.max_new_tokens) for x in examples]
    need = max(len(p.prompt) + p.max_tokens for p in prompts)
    if limit and need > limit:
        raise ConfigError("max_length", f"a prompt of up to {cfg.max_length} tokens, its chat template and its answer "
                                        f"need {need} positions, but {cfg.model} has {limit}: lower --max-length "
                                        "or --max-new-tokens")
    source = {"model": cfg.model, "base_model": model, "adapter": adapter, "positions": limit, "tokenizer": tok_name,
              "chat_template": bool(getattr(tokenizer, "chat_template", None)),
              "device": resolve_device(cfg.device)}
    make = lambda context, budget: InProcess(cfg, None, model, adapter, overrides, context, budget)
    return prompts, make, source


def _chunks(prompts: list[lb.Prompt], size: int) -> list[list[int]]:
    """Indices of prompts in chunks of at most `size`, one task and prompt length per chunk (no padding)."""
    by: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by[(p.example.task, len(p.prompt))].append(i)
    return [idx[k:k + size] for idx in by.values() for k in range(0, len(idx), size)]


def run(cfg: LongBenchConfig, progress: Callable[[str, int, int], None] = lambda *a: None) -> LongBenchReport:
    prompts, make, source = prepare(cfg)
    configs = cfg.configs()
    total = len(prompts) * len(configs)
    progress("loading the model", 0, total)
    answerer = make(max(len(p.prompt) + p.max_tokens for p in prompts), max(p.max_tokens for p in prompts))
    answers, seconds = answer_chunks(answerer, prompts, [p.max_tokens for p in prompts], _chunks(prompts, cfg.batch),
                                     configs, lambda p: p.example.task, progress)
    rows = []
    for conf in configs:
        base = RunConfig(conf.policy, conf.ratio, OFF).label
        compare = conf.art != OFF and base in seconds
        for i, p in enumerate(prompts):
            x, a = p.example, answers[(i, conf.label)]
            rows.append(Row(conf.label, conf.policy, conf.art, x.task, x.id, x.line, x.length, len(p.prompt),
                            p.truncated, p.max_tokens, x.input, a.text, list(x.answers),
                            None if x.all_classes is None else list(x.all_classes),
                            example_score(x.task, a.text, x.answers, x.all_classes),
                            a.completion_tokens, a.art_mode, _sha(p.prompt),
                            a.text != answers[(i, base)].text if compare else None))
    summaries = []
    for conf in configs:
        mine = [r for r in rows if r.config == conf.label]
        ans = [answers[(i, conf.label)] for i in range(len(prompts))]
        by_task = {t: [r for r in mine if r.task == t] for t in cfg.tasks}
        tokens = sum(a.completion_tokens for a in ans)
        cand = sum(a.candidates for a in ans)
        compared = [r for r in mine if r.changed is not None]
        summaries.append(ConfigSummary(
            conf.label, {t: task_score([r.score for r in rs]) for t, rs in by_task.items()},
            {t: bucket_scores([r.score for r in rs], [r.length for r in rs]) for t, rs in by_task.items()} if cfg.e
            else {},
            tokens / seconds[conf.label] if seconds[conf.label] else 0.0,
            1.0 - sum(a.visited for a in ans) / cand if cand else 0.0, seconds[conf.label], tokens,
            sum(r.changed for r in compared) if compared else None, len(compared)))
    return LongBenchReport(cfg, configs, rows, summaries, source)


# -- outputs ---------------------------------------------------------------------------------------
def summary_frame(report: LongBenchReport) -> pd.DataFrame:
    """One row per configuration: the score of each task and their average (0..100), tokens/s, skipped KV
    and the answers that changed against ART off."""
    tasks = report.config.tasks
    return pd.DataFrame([[s.config, *(f"{s.scores[t]:.2f}" for t in tasks), f"{s.average:.2f}",
                          f"{s.tokens_per_s:.1f}", f"{s.skipped_fraction:.1%}",
                          "-" if s.changed is None else f"{s.changed}/{s.compared}"] for s in report.summaries],
                        columns=["config", *tasks, "average", "tokens/s", "skipped KV", "changed vs ART off"])


def changed_answers(report: LongBenchReport) -> list[dict]:
    """Every answer that differs from its policy's ART-off answer, beside it."""
    off = {(r.policy, r.task, r.id, r.line): r for r in report.rows if r.art == OFF}
    return [{"config": r.config, "task": r.task, "id": r.id, "line": r.line,
             "art_off_answer": off[(r.policy, r.task, r.id, r.line)].answer, "answer": r.answer,
             "art_off_score": off[(r.policy, r.task, r.id, r.line)].score, "score": r.score}
            for r in report.rows if r.changed]


def _short(text: str, n: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def markdown(report: LongBenchReport) -> str:
    out = tables.markdown(summary_frame(report))
    changed = changed_answers(report)
    if changed:
        frame = pd.DataFrame([[c["config"], c["task"], c["id"], _short(c["art_off_answer"]), _short(c["answer"]),
                               f"{100 * c['art_off_score']:.1f}", f"{100 * c['score']:.1f}"] for c in changed],
                             columns=["config", "task", "id", "ART off answer", "answer", "ART off score", "score"])
        out += "\n\nAnswers that changed against ART off:\n\n" + tables.markdown(frame, {"config", "task", "id",
                                                                                        "ART off answer", "answer"})
    return out


def score_rows(report: LongBenchReport) -> list[dict]:
    """scores.csv: one row per configuration x task ("all") and, on LongBench-E, per length bucket."""
    n = Counter((r.config, r.task) for r in report.rows)
    per_bucket = Counter((r.config, r.task, bucket(r.length)) for r in report.rows)
    out = []
    for s in report.summaries:
        for t in report.config.tasks:
            out.append({"config": s.config, "task": t, "bucket": "all", "score": s.scores[t],
                        "examples": n[(s.config, t)]})
            out += [{"config": s.config, "task": t, "bucket": b, "score": v, "examples": per_bucket[(s.config, t, b)]}
                    for b, v in s.buckets.get(t, {}).items() if v is not None]
    return out


def write_kvpress(report: LongBenchReport, root: Path) -> list[Path]:
    """One kvpress run folder per configuration x task (kvpress runs LongBench a task at a time)."""
    cfg = report.config
    folders = []
    for conf, s in zip(report.configs, report.summaries):
        for t in cfg.tasks:
            mine = [r for r in report.rows if r.config == conf.label and r.task == t]
            run = kvpress_layout.KvpressRun(
                "longbench-e" if cfg.e else "longbench", f"{t}_e" if cfg.e else t, cfg.model, conf.policy, conf.ratio,
                conf.art, cfg.max_new_tokens, cfg.max_length, report.source.get("device"))
            predictions = [{"_id": r.id, "task": t, "question": r.input, "answers": r.answers,
                            "all_classes": r.all_classes, "length": r.length, "max_new_tokens": r.max_tokens,
                            "predicted_answer": r.answer, "compression_ratio": conf.ratio, "art_mode": r.art_mode,
                            "prompt_tokens": r.prompt_tokens, "score": round(100 * r.score, 2)} for r in mine]
            folders.append(kvpress_layout.write_run(root, run, predictions, s.buckets[t] if cfg.e else s.scores[t]))
    return folders


def write_files(report: LongBenchReport, out: Path) -> dict[str, Path]:
    """scores.csv, longbench.md (summary + changed answers), answers.jsonl (every answer), changed.jsonl,
    longbench.json (settings and source), and kvpress/<run>/ folders (kvpress_layout)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "scores.csv", "md": out / "longbench.md", "answers": out / "answers.jsonl",
             "changed": out / "changed.jsonl", "config": out / "longbench.json"}
    pd.DataFrame(score_rows(report)).to_csv(files["csv"], index=False)
    files["md"].write_text(markdown(report) + "\n", encoding="utf-8")
    files["answers"].write_text("".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in report.rows),
                                encoding="utf-8")
    files["changed"].write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in changed_answers(report)),
                                encoding="utf-8")
    files["config"].write_text(json.dumps({"config": asdict(report.config), "source": report.source}, indent=2,
                                          default=str))
    for folder in write_kvpress(report, out / "kvpress"):
        files.update({f"kvpress:{folder.name}/{f}": folder / f for f in kvpress_layout.FILES})
    return files


def metrics(report: LongBenchReport) -> dict[str, float]:
    """MLflow metrics per configuration: longbench/<config>/<task> (0..100; LongBench-E also per bucket, 8k+ as
    8k_plus), longbench/<config>/average, tokens_per_s, skipped_fraction, changed_vs_art_off (a fraction)."""
    key = {c.label: c.key for c in report.configs}
    out: dict[str, float] = {}
    for s in report.summaries:
        k = key[s.config]
        out.update({f"longbench/{k}/{t}": v for t, v in s.scores.items()})
        out.update({f"longbench/{k}/{t}/{b.replace('+', '_plus')}": v for t, bs in s.buckets.items()
                    for b, v in bs.items() if v is not None})
        out[f"longbench/{k}/average"] = s.average
        out[f"tokens_per_s/{k}"] = s.tokens_per_s
        out[f"skipped_fraction/{k}"] = s.skipped_fraction
        if s.changed is not None:
            out[f"changed_vs_art_off/{k}"] = s.changed / s.compared
    return out


def log_mlflow(report: LongBenchReport, out: Path, experiment: str = EXPERIMENT, run_name: str | None = None) -> str:
    """One MLflow run with the scores as metrics and the files of `write_files` as artifacts; its id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from pipelines.mlflow_store import ROLE_TAG, ensure_experiment, log_metrics, log_params, resolve_tracking_uri

    cfg = report.config
    uri = resolve_tracking_uri(cfg.tracking_uri)
    client = MlflowClient(uri)
    run = client.create_run(ensure_experiment(uri, experiment),
                            run_name=run_name or f"longbench-{cfg.model.replace('/', '_')[-40:]}",
                            tags={ROLE_TAG: "eval", "sparta.eval": "longbench"})
    rid = run.info.run_id
    try:
        params = {"model": cfg.model, "data": cfg.data, "longbench_e": cfg.e, "tasks": ",".join(cfg.tasks),
                  "policies": ",".join(cfg.policies), "policy_ratio": cfg.policy_ratio, "art": ",".join(cfg.art),
                  "limit": cfg.limit or "all", "max_length": cfg.max_length,
                  "max_new_tokens": cfg.max_new_tokens or "per task", "batch": cfg.batch, "dtype": cfg.dtype,
                  "examples": len({(r.task, r.id, r.line) for r in report.rows}),
                  "chat_template": report.source.get("chat_template")}
        log_params(client, rid, {k: str(v) for k, v in params.items()})
        now = int(time.time() * 1000)
        log_metrics(client, rid, [Metric(k, float(v), now, 0) for k, v in metrics(report).items()])
        for path in write_files(report, out).values():
            client.log_artifact(rid, str(path), None if path.parent == out else str(path.parent.relative_to(out)))
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")
    return rid


def print_report(console, report: LongBenchReport) -> None:
    n = len({(r.task, r.id, r.line) for r in report.rows})
    console.print(tables.rich_table(summary_frame(report), f"LongBench{'-E' if report.config.e else ''} scores "
                                                            f"(0-100; {n} examples per configuration)"))
