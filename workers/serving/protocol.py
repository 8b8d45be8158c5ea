"""OpenAI-shaped requests, responses and errors for the serving replica: completions and chat completions,
streamed or not, with OpenAI's sampling parameters, `n` choices and logprobs."""
from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

MAX_STOP = 4
MAX_N = 16
# OpenAI parameters this server does not implement: named in a 400 rather than listed as unknown.
UNSUPPORTED = ("best_of", "echo", "suffix", "logit_bias", "tools", "tool_choice", "functions", "function_call",
               "response_format", "parallel_tool_calls", "modalities", "audio", "prediction", "store", "metadata",
               "reasoning_effort", "service_tier", "web_search_options", "min_tokens", "repetition_penalty")


class ApiError(Exception):
    """An error answered as OpenAI does: HTTP `status` and {"error": {message, type, param, code}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
             413: "invalid_request_error", 422: "invalid_request_error", 503: "server_overloaded"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


# -- requests --------------------------------------------------------------------------------------
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
    # sampling (None: the deployment's default); ranges are checked by workers.serving.sampling.SamplingParams
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None         # vLLM's extra: 0 = off
    seed: int | None = None          # the same seed gives the same text, whatever else is being decoded
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    user: str | None = None
    art: Any = None                  # ART overrides: preset[+field=value...], "off" or {field: value}
    kv: Any = None                   # KV policy override: {"policy": NAME, "ratio": FRACTION}
    return_token_ids: bool = False   # vLLM's extension: the generated (and prompt) token ids

    def sampling(self) -> dict[str, Any]:
        """The sampling fields as SamplingParams takes them (None: left out)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "logprobs": self.top_logprob_count}

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> tuple[str, ...]:
        stops = [v] if isinstance(v, str) else v if isinstance(v, list) else [] if v is None else None
        if stops is None or not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {v!r}")
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        return tuple(stops)


class CompletionRequest(_Request):
    prompt: Any
    logprobs: int | None = Field(None, ge=0, le=20)   # the chosen token's logprob and this many alternatives

    @property
    def top_logprob_count(self) -> int | None:
        return self.logprobs

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
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    @property
    def top_logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

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
    unsupported = next((k for k in UNSUPPORTED if k in data), None)
    if unsupported is not None:
        raise ApiError(400, f"{unsupported!r} is not supported by this server", unsupported, "unsupported_parameter")
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


class LoadAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter, as vLLM takes it: serve the adapter folder `lora_path` as model `lora_name`."""
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's body; its lora_int_id is accepted and ignored)."""
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


def parse_body(raw: bytes, cls: type[BaseModel]) -> BaseModel:
    """A small JSON body of a management route; ApiError 400 naming the field at fault."""
    try:
        data = json.loads(raw or b"null")
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param(tuple(err["loc"])) if err["loc"] else None
        valid = ", ".join(cls.model_fields)
        raise ApiError(400, f"{param or 'body'}: {err['msg']} (fields: {valid})", param, "invalid_value") from None


# -- responses -------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, done=None) -> dict:
    """OpenAI's usage, plus (given the Completion) this request's own decode-attention work (`art`: KV
    blocks visited and candidate, summed over its rows' layers, KV heads and steps) and its timing
    (`ttft_s` arrival to first token, `tpot_s` per output token after it, `e2e_s`)."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if done is not None:
        art = done.art.to_dict()
        out["art"] = {k: art[k] for k in ("visited_blocks", "candidate_blocks", "skipped_fraction", "decode_steps")}
        out.update(done.timing())
    return out


TokenText = Callable[[int], str]


def logprobs_body(entries, token_text: TokenText, chat: bool, offset: int = 0) -> dict | None:
    """A choice's `logprobs` as OpenAI shapes them: chat `{"content": [{token, logprob, bytes, top_logprobs}]}`,
    completions `{tokens, token_logprobs, top_logprobs, text_offset}` (offsets from `offset` in the text)."""
    if entries is None:
        return None
    if chat:
        def item(token: int, logprob: float) -> dict:
            text = token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}
    tokens = [token_text(e.token) for e in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_text(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}


def completion_body(rid: str, model: str, done, replica: str, token_text: TokenText,
                    prompt_ids: list[int] | None = None, chat: bool = False) -> dict:
    """A whole (non-streamed) response for a workers.serving.engine.Completion, one entry per choice. Beyond
    OpenAI's fields: `art` (the request's ARTUsage), `kv` (the KV policy applied: {policy, ratio}, plus
    requested and reason when it differs from the one asked for, see Completion.kv) and `replica`; a
    stream's last chunk carries the same three. With `prompt_ids` (vLLM's return_token_ids), the prompt's
    and each choice's token ids."""
    choices = []
    for c in done.choices:
        choice: dict[str, Any] = {"index": c.index, "finish_reason": c.finish_reason,
                                  "logprobs": logprobs_body(c.logprobs, token_text, chat)}
        if chat:
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        if prompt_ids is not None:
            choice["token_ids"] = list(c.tokens)
        choices.append(choice)
    body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(done.prompt_tokens, done.completion_tokens, done),
            "art": done.art.to_dict(), "kv": done.kv, "replica": replica}
    if prompt_ids is not None:
        body["prompt_token_ids"] = prompt_ids
    return body


def chunk(rid: str, model: str, chat: bool, text: str | None = None, finish: str | None = None,
          role: bool = False, index: int = 0, logprobs: dict | None = None, **extra) -> str:
    """One server-sent event of a streamed response (for choice `index`)."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], **extra}
    return sse(body)


def sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"
