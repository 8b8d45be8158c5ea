"""The serve spec: one YAML file saying which model to serve and how (KV policy, ART, limits, replicas,
batching, HTTP), validated before anything starts.

    spec = load_serve_spec("examples/serve-smollm2.yaml")   # ServeSpecError (a ValueError) names the field
    spec.art_config()                                        # the default ARTConfig of every request

Errors name the field path and the valid choices, like the sweep spec's (pipelines.sweeps.spec). Registry
models (models:/..., runs:/...) are checked for form here and resolved by pipelines.serving.deploy.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pipelines.spec_fields import (FieldError, Section, SpecError, check_model, error_message, field_path, read_yaml,
                                   resolve_path)

REGISTRY_PREFIXES = ("models:/", "runs:/")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DEFAULT_API_KEY_ENV = "SPARTA_API_KEY"


class ServeSpecError(SpecError):
    """A serve spec that cannot run; `errors` holds (field path, message) pairs."""

    what = "serve spec"


@functools.cache
def _policies() -> tuple[str, ...]:
    from attention.hf import POLICIES
    return tuple(POLICIES)


def is_registry_uri(model: str) -> bool:
    return model.startswith(REGISTRY_PREFIXES)


def _check_registry_uri(uri: str) -> str:
    """A models:/ or runs:/ URI checked for form (ValueError saying the form)."""
    if uri.startswith("models:/") and not re.fullmatch(r"models:/[^/@]+(/[^/]+|@[^/]+)", uri):
        raise ValueError(f"a registered model is models:/NAME/VERSION (or models:/NAME@ALIAS), got {uri!r}")
    if uri.startswith("runs:/") and not re.fullmatch(r"runs:/[0-9a-f]{8,}/.+", uri):
        raise ValueError(f"a run's artifact is runs:/RUN_ID/PATH (e.g. runs:/<id>/adapter), got {uri!r}")
    return uri


def _check_serve_model(name: str, info: ValidationInfo) -> str:
    if is_registry_uri(name):
        return _check_registry_uri(name)
    name = check_model(name, info)   # an alias, random:<arch>-tiny or a folder (made absolute)
    from workers.data.assets import model_kind

    if model_kind(name) != "causal":
        raise ValueError(f"{name!r} is an encoder; serving generates text and needs a causal LM "
                         "(e.g. smollm2-135m, gemma3-270m, random:llama-tiny)")
    return name


def _check_folder(marker: str, what: str):
    def check(value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        path = resolve_path(value, info)
        if not (path / marker).is_file():
            raise ValueError(f"{path} is not {what} (no {marker} in it)")
        return str(path)
    return check


def _check_tokenizer(name: str | None, info: ValidationInfo) -> str | None:
    from workers.data.assets import MODELS
    from workers.serving.codec import BYTES

    if name is None or name == BYTES or name in MODELS:
        return name
    path = resolve_path(name, info)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ValueError(f"unknown tokenizer {name!r}; valid: {BYTES}, {', '.join(MODELS)}, or a folder with a "
                         "Hugging Face tokenizer")
    return str(path)


def _check_art(value: Any) -> Any:
    from attention.config import PRESETS
    from workers.serving.requests import RequestError, art_config

    # YAML 1.1 reads a bare off / no / false as the boolean False: in a spec that means ART off. A bare
    # true / on / yes says nothing about which settings, so it is refused with the choices.
    if value is False:
        return "off"
    if value is True:
        raise FieldError((), f"true (YAML also reads a bare on / yes as true) is ambiguous; give a preset name "
                             f"({', '.join(PRESETS)}) with optional +field=value overrides, off, or a mapping of "
                             "ARTConfig fields")
    try:
        art_config(value)
    except RequestError as e:
        raise FieldError(tuple(e.param.split(".")[1:]) if e.param else (), e.message) from None
    return value


# -- the sections ----------------------------------------------------------------------------------
class KVSpec(Section):
    """The KV policy applied at prefill (kvpress presses, h2o) or decode (quest), removing `ratio` of the KV."""

    policy: str = "dense"
    ratio: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("policy")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in _policies():
            raise ValueError(f"unknown KV policy {v!r}; valid: {', '.join(_policies())}")
        return v


class AutoscalingSpec(Section):
    min: int = Field(1, ge=1)
    max: int = Field(ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> AutoscalingSpec:
        if self.min > self.max:
            raise FieldError(("min",), f"min ({self.min}) exceeds max ({self.max})")
        return self


class BatchingSpec(Section):
    """Serve's dynamic batching: up to `max_batch_size` requests waiting at most `wait_timeout_s` decode together."""

    max_batch_size: int = Field(8, ge=1, le=256)
    wait_timeout_s: float = Field(0.01, ge=0.0, le=10.0)


class SchedulerSpec(Section):
    """How a replica schedules its requests. `continuous` (iteration-level, as vLLM does): a preallocated KV
    pool of `kv_cache_tokens` positions in slots of `max_context` (one per running sequence); a new request is
    prefilled in chunks of at most `max_prefill_tokens` prompt tokens per step and joins the running decode
    batch at the next step; a finished one leaves at once. When every slot is taken, up to `max_queued`
    requests wait; beyond that a request gets 503 with Retry-After. `static`: Serve's `@serve.batch` gathers
    requests (`batching`) and each batch decodes to its longest budget before the next starts (for
    comparison)."""

    kind: Literal["continuous", "static"] = "continuous"
    kv_cache_tokens: int | None = Field(None, ge=16)   # default: 8 slots of max_context
    max_prefill_tokens: int = Field(128, ge=16, le=65536)
    max_queued: int = Field(64, ge=0, le=100000)


class SamplingSpec(Section):
    """Sampling defaults for requests that leave these parameters out (OpenAI's: temperature 1, top_p 1;
    top_k 0 is off). Temperature 0 is greedy decoding."""

    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)


_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@/:-]*$")


def default_adapter_name(uri: str) -> str:
    """models:/NAME/3 -> NAME/3, models:/NAME@ALIAS -> NAME@ALIAS, runs:/ID/adapter -> run-ID (12), a folder -> its name."""
    if uri.startswith("models:/"):
        return uri.removeprefix("models:/")
    if uri.startswith("runs:/"):
        return "run-" + uri.removeprefix("runs:/").split("/")[0][:12]
    return Path(uri).name


def _check_adapter_source(uri: str, info: ValidationInfo) -> str:
    if is_registry_uri(uri):
        return _check_registry_uri(uri)
    return _check_folder("adapter_config.json", "a sparta adapter folder")(uri, info)


class AdapterSpec(Section):
    """One adapter served beside the base: `uri` a registered model (models:/NAME/VERSION, models:/NAME@ALIAS),
    a run's artifact (runs:/RUN_ID/adapter) or a sparta adapter folder; `name` the `model` requests pick it by
    (default from the uri: NAME/VERSION, NAME@ALIAS, run-ID, the folder's name)."""

    uri: Annotated[str, AfterValidator(_check_adapter_source)]
    name: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _ADAPTER_NAME.match(v):
            raise ValueError(f"use letters, digits and . _ @ / : - (starting with a letter or digit), got {v!r}")
        return v

    @property
    def served_name(self) -> str:
        return self.name or default_adapter_name(self.uri)


def _adapter_entry(value: Any) -> Any:
    return {"uri": value} if isinstance(value, str) else value


class ServeSpec(Section):
    """A whole deployment. Build it with `load_serve_spec(path)` or `ServeSpec.model_validate(dict)`."""

    model: Annotated[str, AfterValidator(_check_serve_model)]
    name: str | None = None            # the served model name and the Serve application's; default from model
    route_prefix: str = "/"
    adapter: Annotated[str | None, AfterValidator(_check_folder("adapter_config.json", "a sparta adapter folder"))] = None
    # Adapters served by name beside the base (requests pick one with `model`), decoded together in one batch;
    # merge: true folds a single one into the base instead (the fastest path, one adapter per deployment).
    adapters: list[Annotated[AdapterSpec, BeforeValidator(_adapter_entry)]] = Field(default_factory=list)
    merge: bool = False
    max_adapters: int = Field(16, ge=1, le=1024)   # loaded at once per replica; the least recently used makes room
    runtime_adapters: bool = True                  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter
    tokenizer: Annotated[str | None, AfterValidator(_check_tokenizer)] = None
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    tracking_uri: str | None = None    # for models:/, runs:/ and the metrics run (default: $MLFLOW_TRACKING_URI or ./mlruns)
    # auto: bfloat16 on CUDA and on CPUs with AMX / AVX-512 BF16, float32 elsewhere (workers.hardware)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    kv: KVSpec = Field(default_factory=KVSpec)
    art: Annotated[Any, AfterValidator(_check_art)] = "off"
    max_context: int = Field(2048, ge=16)
    max_new_tokens: int = Field(256, ge=1)
    replicas: int | AutoscalingSpec = 1
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    batching: BatchingSpec = Field(default_factory=BatchingSpec)   # scheduler.kind static only
    # Requests Serve hands one replica at once (more wait in Serve's queue); default: the continuous
    # scheduler's slots + max_queued + 1 (so that a full replica answers 503 itself), static: 32.
    max_ongoing_requests: int | None = Field(None, ge=1)
    cpus_per_replica: float = Field(1.0, gt=0)
    gpus_per_replica: float | None = Field(None, ge=0)   # default: 1 with device cuda, else 0
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key: str | None = Field(None, min_length=1)
    api_key_env: str = DEFAULT_API_KEY_ENV
    # Each replica logs its metrics to the deployment's MLflow run this often (seconds); 0: no MLflow run.
    metrics_interval_s: float = Field(30.0, ge=0.0, le=86400.0)
    metrics_experiment: str = Field("sparta-serve", min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _NAME.match(v):
            raise ValueError(f"use letters, digits, '.', '_' and '-' (starting with a letter or digit), got {v!r}")
        return v

    @field_validator("route_prefix")
    @classmethod
    def _route(cls, v: str) -> str:
        if not v.startswith("/") or (len(v) > 1 and v.endswith("/")):
            raise ValueError(f"a route prefix starts with '/' and does not end with one (unless it is '/'), got {v!r}")
        return v

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError(f"give at least 1 replica (or {{min, max, target_ongoing_requests}}), got {v}")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> ServeSpec:
        registry = is_registry_uri(self.model)
        if registry and self.adapter is not None:
            raise FieldError(("adapter",), f"{self.model} carries its own adapter; leave adapter unset", root=True)
        if self.merge and len(self.adapters) != 1:
            raise FieldError(("merge",), f"merge: true folds one adapter into the base; adapters lists "
                             f"{len(self.adapters)} (list one, or serve them unmerged with merge: false)", root=True)
        if self.adapters:
            if registry or self.adapter is not None:
                raise FieldError(("adapters",), "adapters are served over a base model: give model as a base (an alias, "
                                 "a folder or random:<arch>-tiny) and leave adapter unset", root=True)
            names = [a.served_name for a in self.adapters]
            base = None if self.merge else self.served_name
            dup = next((n for n in names if names.count(n) > 1 or n == base), None)
            if dup is not None:
                raise FieldError(("adapters",), f"the name {dup!r} is taken twice (the base model is served as "
                                 f"{self.served_name!r}); give each adapter its own name", root=True)
            if len(self.adapters) > self.max_adapters:
                raise FieldError(("max_adapters",), f"{len(self.adapters)} adapters do not fit in max_adapters "
                                 f"({self.max_adapters})", root=True)
        if self.max_new_tokens >= self.max_context:
            raise FieldError(("max_new_tokens",), f"max_new_tokens ({self.max_new_tokens}) leaves no room for a prompt "
                      f"in max_context ({self.max_context})", root=True)
        if self.scheduler.kind == "static" and self.ongoing_requests < self.batching.max_batch_size:
            raise FieldError(("max_ongoing_requests",), f"max_ongoing_requests ({self.ongoing_requests}) must be >= "
                      f"batching.max_batch_size ({self.batching.max_batch_size}), or batches never fill", root=True)
        if self.scheduler.kv_cache_tokens is not None and self.scheduler.kv_cache_tokens < self.max_context:
            raise FieldError(("scheduler", "kv_cache_tokens"), f"kv_cache_tokens ({self.scheduler.kv_cache_tokens}) "
                             f"holds no slot of max_context ({self.max_context}) positions; give at least "
                             f"{self.max_context}", root=True)
        if self.device == "cpu" and self.gpus_per_replica:
            raise FieldError(("gpus_per_replica",), "device cpu holds no GPU; leave gpus_per_replica unset", root=True)
        if not registry:   # the model's own limits, from its config (registry models: at resolution)
            self.check_limits(self.model, self.model_overrides)
        return self

    def check_limits(self, model: str, overrides: dict) -> None:
        """max_context against the model's positions; raises FieldError on the field at fault."""
        from workers.serving.engine import EngineConfig, model_limits

        try:
            positions, _ = model_limits(EngineConfig(model=model, model_overrides=dict(overrides)))
        except TypeError as e:   # an unknown config field in model_overrides
            raise FieldError(("model_overrides",), str(e), root=True) from None
        if positions and self.max_context > positions:
            raise FieldError(("max_context",), f"max_context ({self.max_context}) exceeds the model's {positions} positions "
                      "(lower it, or raise max_position_embeddings in model_overrides for a random model)", root=True)

    # -- derived values ----------------------------------------------------------------------------
    @property
    def kv_cache_tokens(self) -> int:
        """The continuous scheduler's KV pool in positions (default: 8 slots of max_context)."""
        return self.scheduler.kv_cache_tokens or 8 * self.max_context

    @property
    def kv_slots(self) -> int:
        """Sequences a replica decodes at once under the continuous scheduler."""
        return self.kv_cache_tokens // self.max_context

    @property
    def ongoing_requests(self) -> int:
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return self.kv_slots + self.scheduler.max_queued + 1 if self.scheduler.kind == "continuous" else 32

    @property
    def served_name(self) -> str:
        """The name requests give as `model` for the base (for the merged adapter, with merge: true)."""
        if self.name:
            return self.name
        if self.merge and self.adapters:
            return self.adapters[0].served_name
        m = self.model
        if m.startswith("models:/"):
            return re.split(r"[/@]", m.removeprefix("models:/"))[0]
        if m.startswith("runs:/"):
            return "run-" + m.removeprefix("runs:/").split("/")[0][:12]
        if m.startswith("random:"):
            return m.replace(":", "-")
        return Path(m).name if "/" in m else m

    def art_config(self):
        from workers.serving.requests import art_config
        return art_config(self.art)

    def resolved_api_key(self) -> str | None:
        """The API key: the spec's, else the environment variable `api_key_env`, else None (no auth)."""
        return self.api_key or os.environ.get(self.api_key_env) or None

    @property
    def url(self) -> str:
        prefix = "" if self.route_prefix == "/" else self.route_prefix
        return f"http://{self.host}:{self.port}{prefix}"

    @classmethod
    def model_validate(cls, obj: Any, *, strict: bool | None = None, from_attributes: bool | None = None,
                       context: dict | None = None, **kwargs) -> ServeSpec:
        """Validate a dict; raise ServeSpecError naming every bad field."""
        try:
            return super().model_validate(obj, strict=strict, from_attributes=from_attributes,
                                          context=context, **kwargs)
        except ValidationError as e:
            raise ServeSpecError(_describe(e), (context or {}).get("source")) from None


# -- errors ----------------------------------------------------------------------------------------
_SECTIONS: dict[str, type[BaseModel]] = {"adapters": AdapterSpec, "kv": KVSpec, "batching": BatchingSpec, "replicas": AutoscalingSpec,
                                         "scheduler": SchedulerSpec, "sampling": SamplingSpec}


def _path(loc: tuple) -> str:
    # Union members show up in pydantic's locations ("int", "AutoscalingSpec"): leave them out.
    return field_path(tuple(p for p in loc if not (isinstance(p, str) and (
        p in ("int", "str", "float", "bool", "none") or p.endswith("Spec") or "[" in p))))


def _describe(e: ValidationError) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for err in e.errors():
        loc, kind = tuple(err["loc"]), err["type"]
        if loc and loc[0] == "replicas" and kind in ("int_type", "model_type", "dict_type"):
            if isinstance(err["input"], dict):   # the mapping's own errors say what is wrong with it
                continue
            msg = f"give a number of replicas or {{min, max, target_ongoing_requests}}, got {err['input']!r}"
            loc = ("replicas",)
        else:
            loc, msg = error_message(err, lambda parent: _SECTIONS.get(str(parent[0])) if parent else ServeSpec)
        item = (_path(loc), msg)
        if item not in out:
            out.append(item)
    return out


def load_serve_spec(path: str | Path, **overrides) -> ServeSpec:
    """Read and validate a serve spec file (relative paths inside are taken from its folder); `overrides`
    replace top-level fields (the CLI's --port, for one)."""
    path = Path(path)
    data = read_yaml(path, ServeSpecError)
    if not isinstance(data, dict):
        raise ServeSpecError([("", "the spec must be a mapping of fields")], str(path))
    data.update({k: v for k, v in overrides.items() if v is not None})
    return ServeSpec.model_validate(data, context={"base_dir": path.parent, "source": str(path)})


__all__ = ["AdapterSpec", "AutoscalingSpec", "BatchingSpec", "FieldError", "KVSpec", "SamplingSpec", "SchedulerSpec", "ServeSpec",
           "ServeSpecError", "is_registry_uri", "load_serve_spec"]
