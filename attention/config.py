"""ARTConfig: how decode attention may stop walking the KV cache (see docs/specs/art.md)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

MODES = ("stability", "certified", "skip", "walk", "off")
ORDERS = ("recency", "bound")
CERTIFICATES = ("mass", "relative", "absolute")
SCORE_BOUNDS = ("box", "box+ball")


@dataclass(frozen=True)
class ARTConfig:
    """Attention Run-time Termination settings.

    mode: "stability" (the paper's criterion: stop after `patience` consecutive blocks that change the
        running output by less than `tau` in magnitude and `phi` in direction), "certified" (stop once a
        bound from per-block summaries proves what `certificate` says), "skip" (the industrial keys-only
        comparator, BLASST / TensorRT-LLM skip-softmax style: every block's keys are read, and a block whose
        scores all lie below the running max + ln(skip_lambda / context) skips its softmax and values;
        nothing stops early), "walk" (the ART kernel visiting every candidate block with no check: the
        baseline that separates ART's skipping from the kernel's own speed), or "off" (dense: SDPA where
        the caller has it).
    block_size: KV positions per block.
    tau, phi: relative magnitude change and 1 - cosine thresholds of a stable block.
    patience: consecutive stable blocks before stopping (stability mode).
    min_blocks: blocks always visited before any stop is considered.
    sink_tokens: the first positions (attention sinks); their blocks are visited first, never skipped.
    recent_blocks: the newest blocks, visited right after the sinks, never skipped.
    eps: the certified bound: on the unvisited softmax mass (certificate "mass"; error <= 2 eps max ||v||),
        on the output error relative to ||o|| ("relative") or absolute ("absolute").
    certificate: what certified mode bounds: "mass" (keys only), "relative" or "absolute" (value-aware:
        the error W ||mu_rest - o|| with per-block value centroids and radii; docs/specs/art.md).
    score_bound: the per-block score bound: "box" (channel min/max, as Quest) or "box+ball" (the minimum of
        that and the key ball q.c + ||q|| r).
    skip_lambda: the skip comparator's threshold factor: a block's values are skipped when
        exp(max score - m) < lambda / T, T the sequence's cached positions.
    order: how blocks after the sink and recent ones are visited when the KV policy gives no scores:
        "recency" (newest first, the paper's) or "bound" (highest key-bound score first, from per-block
        key min/max as Quest ranks pages; certified mode always visits in this order).
    enabled: False is the same as mode="off".
    """

    mode: str = "stability"
    block_size: int = 64
    tau: float = 1e-7
    phi: float = 1e-3
    patience: int = 5
    min_blocks: int = 2
    sink_tokens: int = 4
    recent_blocks: int = 1
    eps: float = 1e-3
    order: str = "recency"
    enabled: bool = True
    certificate: str = "mass"
    score_bound: str = "box"
    skip_lambda: float = 1e-3

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"ARTConfig.mode: unknown mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.order not in ORDERS:
            raise ValueError(f"ARTConfig.order: unknown order {self.order!r}; valid: {', '.join(ORDERS)}")
        if self.certificate not in CERTIFICATES:
            raise ValueError(f"ARTConfig.certificate: unknown certificate {self.certificate!r}; "
                             f"valid: {', '.join(CERTIFICATES)}")
        if self.score_bound not in SCORE_BOUNDS:
            raise ValueError(f"ARTConfig.score_bound: unknown score bound {self.score_bound!r}; "
                             f"valid: {', '.join(SCORE_BOUNDS)}")
        if not float(self.skip_lambda) > 0:
            raise ValueError(f"ARTConfig.skip_lambda must be > 0, got {self.skip_lambda!r}")
        for name in ("block_size", "patience", "min_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ARTConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("sink_tokens", "recent_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ARTConfig.{name} must be an integer >= 0, got {value!r}")
        for name in ("tau", "phi"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"ARTConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.certificate == "absolute":
            if not float(self.eps) >= 0:
                raise ValueError(f"ARTConfig.eps must be >= 0, got {self.eps!r}")
        elif not 0 <= float(self.eps) < 1:
            raise ValueError(f"ARTConfig.eps must be in [0, 1), got {self.eps!r}")

    @property
    def active(self) -> bool:
        return self.enabled and self.mode != "off"

    @property
    def uses_bounds(self) -> bool:
        """Whether decoding needs the per-block key bounds (certified mode, bound order)."""
        return self.active and (self.mode == "certified" or self.order == "bound")

    @property
    def uses_ball(self) -> bool:
        """Whether the score bounds also need the key balls (centroid, radius) per block."""
        return self.uses_bounds and self.score_bound == "box+ball"

    @property
    def uses_values(self) -> bool:
        """Whether the stop needs the value balls per block (the value-aware certificate)."""
        return self.active and self.mode == "certified" and self.certificate != "mass"

    @classmethod
    def preset(cls, name: str, **overrides) -> "ARTConfig":
        """A fresh config from `PRESETS`: "paper" (the reported defaults), "certified" (eps = 1e-3),
        "tuned" (the needle-lossless setting that skips most in our SmolLM2-135M frontier) or "aggressive" (their fast, lossy end);
        see docs/art.md."""
        if name not in PRESETS:
            raise ValueError(f"unknown ART preset {name!r}; valid: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def with_overrides(self, **overrides) -> "ARTConfig":
        unknown = sorted(set(overrides) - set(self.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown ART field(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(self.__dataclass_fields__)}")
        return replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_art(text: str) -> ARTConfig:
    """A preset name with optional overrides: "tuned" or "tuned+tau=3e-3+block_size=32+order=bound"
    ("certified+score_bound=box+ball": a value may contain "+")."""
    name, *parts = text.split("+")
    pairs: list[str] = []
    for part in parts:   # a value may hold "+" itself (score_bound=box+ball): a part without "=" continues it
        if "=" not in part and pairs:
            pairs[-1] += "+" + part
        else:
            pairs.append(part)
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"ART override {pair!r} in {text!r} is not FIELD=VALUE")
        kind = ARTConfig.__dataclass_fields__.get(key)
        if kind is None:
            raise ValueError(f"unknown ART field {key!r} in {text!r}; valid: {', '.join(ARTConfig.__dataclass_fields__)}")
        overrides[key] = _override_value(key, value, text)
    return ARTConfig.preset(name, **overrides)


_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _override_value(key: str, value: str, text: str) -> Any:
    """One FIELD=VALUE of parse_art as the field's type; refused, never rounded or read as False."""
    default = getattr(ARTConfig(), key)
    where = f"ART field {key!r} in {text!r}"
    if isinstance(default, bool):
        if value.lower() not in _BOOLS:
            raise ValueError(f"{where}: {value!r} is not a boolean; valid: {', '.join(_BOOLS)}")
        return _BOOLS[value.lower()]
    if not isinstance(default, (int, float)):
        return value
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{where}: {value!r} is not a number") from None
    if isinstance(default, int):
        if not number.is_integer():   # 32.5 must not become 32 (1e3 and 32.0 are whole numbers)
            raise ValueError(f"{where}: {value!r} is not an integer")
        return int(number)
    return number


PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(mode="stability", tau=1e-7, phi=1e-3, patience=5),
    "certified": dict(mode="certified", eps=1e-3),
    # Re-chosen from the 4K-8K NIAH frontier (docs/benchmarks.md; SmolLM2-135M, 64 prompts, dense and SnapKV):
    # skips 17.5% of the blocks (dense) and loses no needle against walk; tau 1e-3, the preset until
    # 2026-12-04, skipped 40% and lost 2. Heavy blocks first (by key bound): a retrieval head meets its
    # needle before it may stop.
    "tuned": dict(mode="stability", tau=1e-4, phi=1e-4, patience=5, block_size=64, order="bound"),
    # The speed side of the same sweep: skips 60-80% of the blocks at 2K-4K but loses passkeys there.
    "aggressive": dict(mode="stability", tau=1e-2, phi=1e-3, patience=3, block_size=32, order="bound"),
    # The industrial comparator (BLASST / TensorRT-LLM skip-softmax style: keys read, faint blocks' values not).
    "skip": dict(mode="skip", skip_lambda=1e-3),
    # Every block through the ART kernel, no termination: the baseline of ART's own contribution.
    "walk": dict(mode="walk"),
}
