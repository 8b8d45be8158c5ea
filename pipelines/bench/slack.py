"""`sparta bench slack`: how loose certified mode's bounds are on a real model's decode attention.

Per prompt (passkey prompts of exactly `context` tokens, as `sparta bench decode` makes them), one prefill
captures every layer's last-position query with the post-RoPE keys and values it attends to: that is the
decode attention of the next step. Per layer and KV head, in fp32, with the reference's own functions:
- score-bound slack: per block, the bound minus the block's true largest score (nats), for the channel
  box, the key ball and their minimum;
- at a visited set (the certified visiting order's first `fraction` of the blocks, sink and recent ones
  included): the unvisited-mass bound R over the true unvisited mass, and the error bound over the true
  error ||o_exact - o||, for 2 W max||v|| (the mass certificate) and the value-aware min(A, B), each with
  the box and the box+ball score bounds;
- end to end: the visited fraction and error of certified settings and the skip comparator (the fastest
  kernel that implements each, making the reference's decisions), and whether each certified output
  stayed within its limit.
Ratios are summarised by their median and 90th percentile over (prompt, layer, query head).
"""
from __future__ import annotations

import math
import platform
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable

import torch

from attention import ARTConfig
from attention.config import parse_art
from attention.kernels.dispatch import decode_attention
from attention.reference import (ball_bounds, block_balls, block_key_bounds, certified_error, upper_bounds,
                                 value_spread, visiting_order)
from pipelines.bench import SLACK_RUNS
from pipelines.bench.common import ConfigError, fmt
from workers.hardware import cpu_name

CAPTURE = "sparta_capture"
VARIANTS = {"box": "box", "box+ball": "box+ball"}


@dataclass
class SlackConfig:
    model: str = "smollm2-135m"
    context: int = 4096
    prompts: int = 4
    block_size: int = 64
    fractions: tuple[float, ...] = (0.5, 0.8)
    runs: tuple[str, ...] = SLACK_RUNS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.context < 2 * self.block_size:
            raise ConfigError("context", f"must be >= 2 blocks ({2 * self.block_size} tokens), got {self.context}")
        if self.prompts < 1:
            raise ConfigError("prompts", f"must be >= 1, got {self.prompts}")
        if not all(0 < f < 1 for f in self.fractions):
            raise ConfigError("fractions", f"each must be in (0, 1), got {self.fractions}")
        for text in self.runs:
            try:
                parse_art(text)
            except ValueError as e:
                raise ConfigError("runs", str(e)) from None


@dataclass
class Captured:
    """One layer's decode attention at the prompt's last position (batch 1), fp32 on the CPU."""

    layer: int
    q: torch.Tensor       # (hq, d)
    k: torch.Tensor       # (hkv, T, d)
    v: torch.Tensor       # (hkv, T, d)
    scale: float


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    sink = getattr(module, "_sparta_capture", None)
    if sink is not None:
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        sink.append(Captured(module.layer_idx, query[0, :, -1].float().cpu(), key[0].float().cpu(),
                             value[0].float().cpu(), float(scale)))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def capturing(model):
    """Stock SDPA attention that also keeps each layer's last-position query, keys and values (the list of
    `Captured` is yielded; see `pipelines.bench.decode.sdpa_wrapped`)."""
    from pipelines.bench.decode import sdpa_wrapped

    return sdpa_wrapped(model, CAPTURE, _capture_attention, "_sparta_capture", [])


@dataclass
class Sample:
    """Per (prompt, layer, query head) measurements of one captured attention."""

    bound_gap: dict[str, torch.Tensor]     # score-bound variant -> (blocks,) bound - true block max, nats
    mass_ratio: dict[tuple, torch.Tensor]  # (fraction, variant) -> (g,) R / true unvisited mass
    error_ratio: dict[tuple, torch.Tensor]  # (fraction, variant, certificate) -> (g,) bound / true error


def score_bounds(qs, k, valid, block_size):
    """(hkv, g, nb) score bounds per variant for one captured attention."""
    kmin, kmax = block_key_bounds(k[None], valid, block_size)
    box = upper_bounds(qs[None], kmin, kmax)[0]
    ball = ball_bounds(qs[None], *block_balls(k[None], valid, block_size))[0]
    return {"box": box, "box+ball": torch.minimum(box, ball)}


def measure(cap: Captured, cfg: SlackConfig) -> Sample:
    hq, d = cap.q.shape
    hkv, t, _ = cap.k.shape
    g, bs = hq // hkv, cfg.block_size
    nb = math.ceil(t / bs)
    pad = nb * bs - t
    valid = torch.ones(1, t, dtype=torch.bool)
    qs = cap.q.view(hkv, g, d) * cap.scale
    s = torch.einsum("hgd,htd->hgt", qs, cap.k)                                 # true scores
    s_blocks = torch.nn.functional.pad(s, (0, pad), value=-math.inf).view(hkv, g, nb, bs)
    true_max = s_blocks.amax(-1)                                                 # (hkv, g, nb)
    bounds = score_bounds(qs, cap.k, valid, bs)
    gaps = {name: (ub - true_max).flatten() for name, ub in bounds.items()}
    n_valid = torch.full((1, nb), bs)
    n_valid[0, -1] = t - (nb - 1) * bs
    mean, spread = (x[0] for x in value_spread(cap.v[None], valid, bs, n_valid))  # (hkv, d), (hkv, nb)
    art = ARTConfig(mode="certified", block_size=bs, score_bound="box+ball")
    cand = torch.ones(1, hkv, nb, dtype=torch.bool)
    order, n_protected = visiting_order(cand, torch.tensor([nb - 1]), art, bounds["box+ball"].amax(1)[None])
    order, n_protected = order[0], n_protected[0]
    exact = torch.softmax(s, -1) @ cap.v                                          # (hkv, g, d) ... per group
    vmax = cap.v.norm(dim=-1).amax(-1)                                            # (hkv,)
    mass_ratio, error_ratio = {}, {}
    pos_block = torch.arange(t) // bs
    for f in cfg.fractions:
        n_seen = torch.clamp(n_protected, min=math.ceil(f * nb))                  # (hkv,)
        seen = torch.zeros(hkv, nb, dtype=torch.bool)
        seen.scatter_(1, order, torch.arange(nb)[None, :] < n_seen[:, None])
        seen_pos = seen[:, pos_block][:, None, :]                                  # (hkv, 1, t)
        m = s.masked_fill(~seen_pos, -math.inf).amax(-1)                         # (hkv, g)
        p = torch.exp(s - m[..., None])
        l = p.masked_fill(~seen_pos, 0.0).sum(-1)
        o = torch.einsum("hgt,htd->hgd", p.masked_fill(~seen_pos, 0.0), cap.v) / l[..., None]
        true_mass = p.masked_fill(seen_pos, 0.0).sum(-1)
        true_err = (exact - o).norm(dim=-1).clamp_min(1e-30)
        unseen = ~seen[:, None, :]
        top = spread[:, None, :].masked_fill(~unseen, 0.0).amax(-1)
        for name, ub in bounds.items():
            w = (n_valid[0] * torch.exp(ub - m[..., None])).masked_fill(~unseen, 0.0)
            rest = w.sum(-1)
            mass_ratio[(f, name)] = (rest / true_mass.clamp_min(1e-30)).flatten()
            two_w = 2 * rest / (l + rest) * vmax[:, None]
            aware = certified_error(rest, (w * spread[:, None, :]).sum(-1), top, l, o, mean[:, None, :])
            error_ratio[(f, name, "2 W max|v|")] = (two_w / true_err).flatten()
            error_ratio[(f, name, "value-aware")] = (aware / true_err).flatten()
    return Sample(gaps, mass_ratio, error_ratio)


@dataclass
class RunRow:
    """One ART setting over every captured attention: blocks visited, errors, certificate kept."""

    art: str
    visited: float            # visited blocks / candidate blocks, over everything
    max_rel_error: float      # largest ||o - o_exact|| / ||o_exact||
    median_rel_error: float
    checked: int              # certified outputs compared with their limit (0 for other modes)
    violations: int


def run_setting(text: str, captures: list[Captured], block_size: int) -> RunRow:
    cfg = parse_art(text).with_overrides(block_size=block_size)
    visited = candidates = checked = violations = 0
    errors = []
    for cap in captures:
        q, k, v = cap.q[None, :, None], cap.k[None], cap.v[None]
        out, stats = decode_attention(q, k, v, cfg, scale=cap.scale)
        exact, _ = decode_attention(q, k, v, cfg.with_overrides(mode="off"), scale=cap.scale)
        err = (out - exact).norm(dim=-1).flatten()
        errors.append(err / exact.norm(dim=-1).flatten().clamp_min(1e-30))
        visited += int(stats.visited_blocks.sum())
        candidates += int(stats.candidate_blocks.sum())
        if cfg.mode == "certified":
            if cfg.certificate == "mass":
                limit = 2 * cfg.eps * v.norm(dim=-1).amax(-1).repeat_interleave(q.shape[1] // k.shape[1], 1)
            elif cfg.certificate == "relative":
                limit = cfg.eps * out.norm(dim=-1).flatten()
            else:
                limit = torch.full_like(err, cfg.eps)
            checked += err.numel()
            violations += int((err > limit.flatten()).sum())
    rel = torch.cat(errors)
    return RunRow(text, visited / max(1, candidates), float(rel.max()), float(rel.median()), checked, violations)


@dataclass
class SlackReport:
    config: SlackConfig
    environment: dict
    gaps: list[dict]          # per score-bound variant: median / p90 gap in nats
    ratios: list[dict]        # per (fraction, variant, what): median / p90 ratio
    runs: list[RunRow]


def _quantiles(x: torch.Tensor) -> tuple[float, float]:
    x = x[torch.isfinite(x)]
    if x.numel() == 0:
        return math.nan, math.nan
    return float(x.median()), float(torch.quantile(x.double(), 0.9))


def summarize(cfg: SlackConfig, samples: list[Sample], runs: list[RunRow], environment: dict) -> SlackReport:
    gaps = []
    for name in VARIANTS:
        med, p90 = _quantiles(torch.cat([s.bound_gap[name] for s in samples]))
        gaps.append({"score bound": name, "gap median (nats)": med, "gap p90 (nats)": p90})
    ratios = []
    for f in cfg.fractions:
        for name in VARIANTS:
            med, p90 = _quantiles(torch.cat([s.mass_ratio[(f, name)] for s in samples]))
            ratios.append({"visited": f, "score bound": name, "bound": "unvisited mass R", "median": med, "p90": p90})
            for what in ("2 W max|v|", "value-aware"):
                med, p90 = _quantiles(torch.cat([s.error_ratio[(f, name, what)] for s in samples]))
                ratios.append({"visited": f, "score bound": name, "bound": f"error, {what}", "median": med,
                               "p90": p90})
    return SlackReport(cfg, environment, gaps, ratios, runs)


def environment() -> dict:
    return {"cpu": cpu_name(), "machine": platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


@torch.no_grad()
def run(cfg: SlackConfig, progress: Callable[[str, int, int], None] = lambda *a: None,
        model=None, tokenizer=None) -> SlackReport:
    from pipelines.bench.decode import make_prompts
    from workers.data.assets import load_model

    if model is None:
        progress(f"loading {cfg.model}", 0, cfg.prompts)
        model, tokenizer = load_model(cfg.model, task="causal_lm", dtype=torch.float32)
        model.eval()
    prompts = make_prompts(tokenizer, cfg.context, cfg.prompts, cfg.seed, model.config.vocab_size)
    samples, captures = [], []
    for i in range(cfg.prompts):
        progress(f"prompt {i + 1}/{cfg.prompts}: prefill {cfg.context} tokens", i, cfg.prompts)
        with capturing(model) as sink:
            model(input_ids=prompts.ids[i: i + 1], use_cache=False, logits_to_keep=1)
        samples += [measure(cap, cfg) for cap in sink]
        captures += sink
    runs = []
    for j, text in enumerate(cfg.runs):
        progress(f"ART setting {text}", j, len(cfg.runs))
        runs.append(run_setting(text, captures, cfg.block_size))
    progress("done", cfg.prompts, cfg.prompts)
    return summarize(cfg, samples, runs, environment())


# -- output ------------------------------------------------------------------------------------------------
def gap_rows(report: SlackReport) -> list[dict]:
    return [{k: fmt(v, ".2f") if isinstance(v, float) else v for k, v in row.items()} for row in report.gaps]


def ratio_rows(report: SlackReport) -> list[dict]:
    return [{"visited": f"{r['visited']:.0%}", "score bound": r["score bound"], "bound": r["bound"],
             "bound / truth, median": f"{r['median']:.3g}x", "p90": f"{r['p90']:.3g}x"} for r in report.ratios]


def run_rows(report: SlackReport) -> list[dict]:
    return [{"ART": r.art, "visited": f"{r.visited:.1%}", "rel. error median": f"{r.median_rel_error:.1e}",
             "rel. error max": f"{r.max_rel_error:.1e}",
             "bound held": f"{r.checked - r.violations}/{r.checked}" if r.checked else "-"} for r in report.runs]


def markdown(report: SlackReport) -> str:
    import pandas as pd

    from pipelines import tables

    c, env = report.config, report.environment
    head = (f"Certified-bound slack on {c.model}'s decode attention at {c.context} tokens, {c.prompts} passkey "
            f"prompts x every layer and query head, blocks of {c.block_size}; fp32 on {env['cpu']}, "
            f"{env['date']}.")
    return "\n\n".join([head, tables.markdown(pd.DataFrame(gap_rows(report)), {"score bound"}),
                        tables.markdown(pd.DataFrame(ratio_rows(report)), {"visited", "score bound", "bound"}),
                        tables.markdown(pd.DataFrame(run_rows(report)), {"ART"})])


def write(report: SlackReport, out) -> dict:
    from pathlib import Path

    from pipelines.bench.common import write_report

    record = {"config": asdict(report.config), "environment": report.environment, "gaps": report.gaps,
              "ratios": report.ratios, "runs": [asdict(r) for r in report.runs]}
    return write_report(Path(out), f"slack-{report.config.model.replace(':', '_').replace('/', '_')}",
                        [asdict(r) for r in report.runs], markdown(report), record)


def print_report(console, report: SlackReport) -> None:
    import pandas as pd

    from pipelines import tables

    for title, rows in (("score bound - true block max", gap_rows(report)), ("bound / truth", ratio_rows(report)),
                        ("ART settings", run_rows(report))):
        console.print(tables.rich_table(pd.DataFrame(rows), title=title))
