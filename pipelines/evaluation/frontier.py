"""ART's frontier in a NIAH run: KV blocks skipped against needles lost, per criterion and KV policy.

Every ART setting is compared with its own policy's ART-off configuration on the same prompts: `lost` counts
the prompts answered right with ART off and wrong with it, `gained` the reverse, `identical` the answers
with exactly ART off's text. A setting is lossless by issue 13's standard when it loses no needle and at
least 97% of its answers are identical. Where the run has the policy's `walk` setting (our kernel, every
block visited) the same is counted against it: ART off is torch's SDPA, whose bf16 rounding differs from
the kernel's, so only the comparison with walk isolates what ART's own skipping changed.

    frame = frontier_frame(report)     # one row per ART setting that has an ART-off config beside it
    plot_frontier(report, out / "frontier.png")
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

LOSSLESS_IDENTICAL = 0.97


def criterion(art: str) -> str:
    """The ART mode of an evaluation's setting ("on": the deployment's own, or the in-process preset)."""
    from attention.config import parse_art

    return "on" if art == "on" else parse_art(art).mode


def _against(report, label: str, base: str) -> tuple[int, float]:
    """(needles lost, fraction of identical answers) of configuration `label` against `base`, case by case."""
    case = lambda r: (r.variant, r.length, r.depth, r.sample)   # noqa: E731
    ref = {case(r): r for r in report.rows if r.config == base}
    mine = [r for r in report.rows if r.config == label]
    return (sum(ref[case(r)].correct and not r.correct for r in mine),
            sum(r.answer == ref[case(r)].answer for r in mine) / len(mine))


def frontier_rows(report) -> list[dict]:
    """One dict per ART setting compared with ART off: policy, art, criterion, skipped, lost, gained,
    identical, lossless, lost per prompt length, and (None without a walk setting) lost_vs_walk and
    identical_vs_walk."""
    lengths = report.config.lengths
    labels = {c.label for c in report.configs}
    rows = []
    for conf, s in zip(report.configs, report.summaries):
        if s.agree is None:   # ART off itself, or no ART-off config to compare with
            continue
        lost = [c for c in s.changed if not c["correct"]]
        walk = type(conf)(conf.policy, conf.ratio, "walk").label
        vs_walk = _against(report, conf.label, walk) if walk in labels and conf.label != walk else (None, None)
        rows.append({"policy": conf.policy, "art": conf.art, "criterion": criterion(conf.art),
                     "skipped": s.skipped_fraction, "lost": len(lost), "gained": len(s.changed) - len(lost),
                     "identical": s.identical, "prompts": s.total,
                     "lossless": not lost and s.identical >= LOSSLESS_IDENTICAL,
                     **{f"lost@{n}": sum(c["length"] == n for c in lost) for n in lengths},
                     "lost_vs_walk": vs_walk[0], "identical_vs_walk": vs_walk[1]})
    return rows


def frontier_frame(report) -> pd.DataFrame:
    """frontier_rows as the table docs and artifacts print, most skipped first within each policy."""
    rows = sorted(frontier_rows(report), key=lambda r: (r["policy"], -r["skipped"]))
    lengths = report.config.lengths
    return pd.DataFrame([[r["policy"], r["art"], r["criterion"], f"{r['skipped']:.1%}", str(r["lost"]),
                          *(str(r[f"lost@{n}"]) for n in lengths), str(r["gained"]), f"{r['identical']:.0%}",
                          "yes" if r["lossless"] else "no",
                          "-" if r["lost_vs_walk"] is None else str(r["lost_vs_walk"]),
                          "-" if r["identical_vs_walk"] is None else f"{r['identical_vs_walk']:.0%}"] for r in rows],
                        columns=["policy", "ART", "criterion", "skipped KV", "needles lost",
                                 *(f"lost at {n}" for n in lengths), "gained", "identical answers", "lossless",
                                 "lost vs walk", "identical vs walk"])


def plot_frontier(report, path: Path) -> Path:
    """Needles lost (y) against KV blocks skipped (x): one marker per criterion, one colour per policy; a
    second panel counts the losses against walk where the run has it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = frontier_rows(report)
    markers = {"stability": "o", "certified": "s", "skip": "^", "walk": "x"}
    policies = sorted({r["policy"] for r in rows})
    colours = dict(zip(policies, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    panels = [("lost", "needles lost vs ART off (prompts)")]
    if any(r["lost_vs_walk"] is not None for r in rows):
        panels.append(("lost_vs_walk", "needles lost vs walk (prompts)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.2), layout="constrained", squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for policy in policies:
            for mode, marker in markers.items():
                mine = sorted((r for r in rows if r["policy"] == policy and r["criterion"] == mode
                               and r[key] is not None), key=lambda r: r["skipped"])
                if not mine:
                    continue
                ax.plot([100 * r["skipped"] for r in mine], [r[key] for r in mine], marker=marker,
                        linestyle="-" if len(mine) > 1 else "none", color=colours[policy], label=f"{policy} / {mode}")
                for r in mine:
                    ax.annotate(r["art"].split("+", 1)[-1], (100 * r["skipped"], r[key]), fontsize=6,
                                xytext=(3, 3 if policy == policies[0] else -8), textcoords="offset points")
        ax.set_xlabel("KV blocks skipped in decode attention (%; skip mode: value reads)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:   # the walk panel is empty when walk was not run
            ax.legend(fontsize=7)
    prompts = max((r["prompts"] for r in rows), default=0)
    fig.suptitle(f"ART frontier: {prompts} prompts per setting, lengths {', '.join(map(str, report.config.lengths))}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
