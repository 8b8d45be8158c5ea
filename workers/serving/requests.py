"""What a request asks the engines for, checked before it is queued: ART settings, the KV policy, and the
error every refusal raises (`RequestError`, which the replica turns into an OpenAI-shaped 4xx)."""
from __future__ import annotations

from dataclasses import fields
from typing import Any

from attention import ARTConfig
from attention.config import PRESETS, parse_art
from attention.hf import POLICIES

# Serving bounds on ART fields beyond ARTConfig's own checks, so one request cannot make a replica crawl.
ART_BOUNDS = {"block_size": (8, 1024), "patience": (1, 256), "min_blocks": (1, 4096), "sink_tokens": (0, 4096),
              "recent_blocks": (0, 256)}
OFF = ARTConfig(mode="off")


class RequestError(ValueError):
    """A request (or spec value) the engine refuses: `param` names the field, `code` is a short
    OpenAI-style error code, `status` the HTTP status a server answers with."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value", status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def _art_value(name: str, value: Any, param: str):
    default = getattr(ARTConfig(), name)
    ok = (isinstance(value, bool) if isinstance(default, bool) else
          isinstance(value, int) and not isinstance(value, bool) if isinstance(default, int) else
          isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, float) else
          isinstance(value, str))
    if not ok:
        kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[type(default)]
        raise RequestError(f"ART field {name!r} must be {kind}, got {value!r}", f"{param}.{name}")
    return float(value) if isinstance(default, float) else value


def art_config(value: Any, base: ARTConfig = OFF, param: str = "art") -> ARTConfig:
    """ART settings from a spec or a request: None (`base`), "off", a preset with optional overrides
    ("tuned", "tuned+tau=1e-3+block_size=32"), or a dict of ARTConfig fields, optionally with "preset"
    (the dict's fields override that preset, else `base`). Raises RequestError naming the bad field."""
    if value is None:
        cfg = base
    elif isinstance(value, str):
        if value.strip() == "off":
            return OFF
        try:
            cfg = parse_art(value.strip())
        except ValueError as e:
            hint = " (or off)" if "preset" in str(e) else f"; presets: {', '.join(PRESETS)}, off"
            raise RequestError(f"{e}{hint}", param) from None
    elif isinstance(value, dict):
        valid = [f.name for f in fields(ARTConfig)]
        unknown = [k for k in value if k not in valid and k != "preset"]
        if unknown:
            raise RequestError(f"unknown ART field {unknown[0]!r}; valid: preset, {', '.join(valid)}",
                               f"{param}.{unknown[0]}", code="unknown_art_field")
        start = base
        if "preset" in value:
            name = value["preset"]
            if name == "off":
                start = OFF
            elif not isinstance(name, str) or name not in PRESETS:
                raise RequestError(f"unknown ART preset {name!r}; valid: {', '.join(PRESETS)}, off", f"{param}.preset")
            else:
                start = ARTConfig.preset(name)
        overrides = {k: _art_value(k, v, param) for k, v in value.items() if k != "preset"}
        try:
            cfg = start.with_overrides(**overrides)
        except ValueError as e:
            raise RequestError(str(e), param) from None
    elif isinstance(value, bool):
        # Strict for JSON's booleans: "off" says what is meant; true names no setting. (A serve spec maps
        # YAML's bare `off`, read as False, to "off" before it gets here: pipelines.serving.spec.)
        raise RequestError(f"give ART settings as a preset name ({', '.join(PRESETS)}; optional +field=value "
                           f"overrides), \"off\", or an object of ARTConfig fields; got {str(value).lower()}"
                           + ('; to turn ART off send "off"' if not value else ""), param)
    else:
        raise RequestError(f"give ART settings as a preset name (with optional +field=value overrides), off, "
                           f"or an object of ARTConfig fields; got {value!r}", param)
    for name, (low, high) in ART_BOUNDS.items():
        v = getattr(cfg, name)
        if not low <= v <= high:
            raise RequestError(f"ART field {name!r} must be in [{low}, {high}] when serving, got {v!r}", f"{param}.{name}")
    return cfg


def kv_config(value: Any, base: tuple[str, float], param: str = "kv") -> tuple[str, float]:
    """A request's KV policy: None (`base`, the server's), or {"policy": NAME, "ratio": FRACTION} (a
    missing ratio is 0, a missing policy the server's). Raises RequestError naming the bad field."""
    if value is None:
        return base
    if not isinstance(value, dict):
        raise RequestError(f"give the KV policy as an object {{\"policy\": NAME, \"ratio\": FRACTION}}, got {value!r}", param)
    unknown = [k for k in value if k not in ("policy", "ratio")]
    if unknown:
        raise RequestError(f"unknown KV field {unknown[0]!r}; valid: policy, ratio", f"{param}.{unknown[0]}",
                           code="unknown_kv_field")
    policy, ratio = value.get("policy", base[0]), value.get("ratio", 0.0)
    if not isinstance(policy, str) or policy not in POLICIES:
        raise RequestError(f"unknown KV policy {policy!r}; valid: {', '.join(POLICIES)}", f"{param}.policy")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise RequestError(f"KV ratio must be a number in [0, 1), got {ratio!r}", f"{param}.ratio")
    return policy, float(ratio)
