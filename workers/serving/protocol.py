"""OpenAI-shaped requests, responses and errors for the serving replica (the subset sparta serves:
greedy completions and chat completions, streamed or not)."""
from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP = 4


class ApiError(Exception):
    """An error answered as OpenAI does: HTTP `status` and {"error": {message, type, param, code}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 422: "invalid_request_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


# -- requests --------------------------------------------------------------------------------------
def _greedy(name: str, neutral: float):
    def check(v):
        if v is not None and v != neutral:
            raise ValueError(f"only greedy decoding is served: {name} must be {neutral:g} or omitted, got {v!r}")
        return v
    return check


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Request(BaseModel):
    # strict: "8" is not an integer; extra="forbid": a misspelt option is an error, not silently ignored.
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = None
    stop: Any = Field(None, validate_default=True)   # -> a tuple of strings
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None          # accepted and ignored: greedy decoding is deterministic
    user: str | None = None
    art: Any = None                  # ART overrides: preset[+field=value...], "off" or {field: value}
    kv: Any = None                   # KV policy override: {"policy": NAME, "ratio": FRACTION}
    return_token_ids: bool = False   # vLLM's extension: the generated (and prompt) token ids

    _temperature = field_validator("temperature")(_greedy("temperature", 0.0))
    _top_p = field_validator("top_p")(_greedy("top_p", 1.0))
    _n = field_validator("n")(_greedy("n", 1))
    _presence = field_validator("presence_penalty")(_greedy("presence_penalty", 0.0))
    _frequency = field_validator("frequency_penalty")(_greedy("frequency_penalty", 0.0))

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> tuple[str, ...]:
        stops = [v] if isinstance(v, str) else v if isinstance(v, list) else [] if v is None else None
        if stops is None or not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {v!r}")
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        return tuple(stops)

    @field_validator("logprobs", check_fields=False)   # each request type declares its own logprobs field
    @classmethod
    def _logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not served")
        return v


class CompletionRequest(_Request):
    prompt: Any
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> str | list[int]:
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
            v = v[0]   # a batch of one prompt
        if isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool)
                                                                   for t in v)):
            return v
        raise ValueError("prompt must be one string or one list of token ids (one prompt per request), "
                         f"got {json.dumps(v)[:80]}")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: Any
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text(cls, v: Any) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                       for p in v):
            return "".join(p["text"] for p in v)
        raise ValueError("content must be a string or a list of {\"type\": \"text\", \"text\": ...} parts")


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


_TYPE_TAG = re.compile(r"^[a-z_-]+\[.*\]$|^(str|int|float|bool)$")


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TYPE_TAG.match(part):
            out += f".{part}" if out else part
    return out


def parse_request(raw: bytes, cls: type[_Request]) -> _Request:
    """The request from a body, or ApiError(400) naming the first bad field."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param(tuple(err["loc"]))
        if err["type"] == "extra_forbidden":
            section = {1: cls, 2: StreamOptions}.get(len(err["loc"]), ChatMessage)   # messages[i].x: 3 parts
            valid = ", ".join(section.model_fields)
            raise ApiError(400, f"unknown parameter {param!r}; valid: {valid}", param, "unknown_parameter") from None
        if err["type"] == "missing":
            raise ApiError(400, f"{param}: required parameter is missing", param, "missing_required_parameter") from None
        msg = str((err.get("ctx") or {}).get("error") or err["msg"])
        if err["type"] != "value_error":
            msg = f"{msg}, got {json.dumps(err.get('input'), default=str)[:80]}"
        code = "invalid_type" if err["type"].endswith("_type") else "invalid_value"
        raise ApiError(400, f"{param}: {msg}", param, code) from None


# -- responses -------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, done, replica: str, token_ids: list[int] | None = None,
                    chat: bool = False) -> dict:
    """A whole (non-streamed) response for a workers.serving.engine.Completion. Beyond OpenAI's fields:
    `art` (the decode batch's ARTUsage), `kv` (the KV policy applied: {policy, ratio}, plus requested and
    reason when it differs from the one asked for, see Completion.kv) and `replica`; a stream's last
    chunk carries the same three."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": done.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": done.text}
    else:
        choice["text"] = done.text
    if token_ids is not None:
        choice["token_ids"] = list(done.tokens)
    body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(done.prompt_tokens, done.completion_tokens),
            "art": done.art.to_dict(), "kv": done.kv, "replica": replica}
    if token_ids is not None:
        body["prompt_token_ids"] = token_ids
    return body


def chunk(rid: str, model: str, chat: bool, text: str | None = None, finish: str | None = None,
          role: bool = False, **extra) -> str:
    """One server-sent event of a streamed response."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], **extra}
    return sse(body)


def sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"
