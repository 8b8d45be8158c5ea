"""The Ray Serve replica: a thin FastAPI ingress (OpenAI-style HTTP) around a serving engine.

With the continuous scheduler (the default) requests go straight to `workers.serving.continuous.ContinuousEngine`,
whose thread admits them into the running decode batch; with the static one, `@serve.batch` gathers them and
`Engine.run` decodes each batch to its end in a worker thread. Either way the event loop keeps answering
(health checks, metrics, streamed tokens) while the model runs. pipelines.serving.deploy builds and deploys
it; nothing here imports pipelines.
"""
# No `from __future__ import annotations`: FastAPI resolves the handlers' annotations at runtime.
import asyncio
import hmac
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import metrics
from starlette.exceptions import HTTPException   # what routing raises (FastAPI's is a subclass)

from workers.serving import protocol as api
from workers.serving.artifacts import with_local_adapters
from workers.serving.continuous import Overloaded, build_engine
from workers.serving.engine import Completion, EngineConfig, Job
from workers.serving.metrics import MetricsReporter
from workers.serving.prometheus import CONTENT_TYPE_LATEST, ServingMetrics
from workers.serving.requests import RequestError, art_config, kv_config
from workers.serving.sampling import SamplingParams, sampling_params

app = FastAPI(title="sparta serve", docs_url=None, redoc_url=None)
_END = object()   # end of a streamed job's text
log = logging.getLogger("ray.serve")   # Serve writes this logger to the replica's log file


def _internal_error(what: str, exc: BaseException) -> api.ApiError:
    """A 500 for the client and the traceback for the server, tied by a new request id. The client gets
    nothing of the exception: its text can carry prompts, paths and internals."""
    request_id = api.new_id("req")
    log.error("request %s: %s failed", request_id, what, exc_info=exc)
    return api.ApiError(500, f"internal error; request id {request_id}", code="internal_error")


@app.exception_handler(api.ApiError)
async def _api_error(request: Request, exc: api.ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:   # unknown routes, wrong methods
    return JSONResponse(api.ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(api.ApiError(400, str(exc)).body(), status_code=400)


@app.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    # The last resort (the /v1 generation routes answer and count their own failures: Replica._failed).
    return JSONResponse(_internal_error(f"{request.method} {request.url.path}", exc).body(), status_code=500)


def _metrics() -> dict:
    latency = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64]
    return {
        "requests": metrics.Counter("sparta_requests", "Requests answered, by endpoint and HTTP status.",
                                    tag_keys=("endpoint", "status")),
        "tokens": metrics.Counter("sparta_output_tokens", "Completion tokens generated.", tag_keys=("endpoint",)),
        "latency": metrics.Histogram("sparta_request_latency_s", "Request latency in seconds (to the last token).",
                                     boundaries=latency, tag_keys=("endpoint",)),
        "tokens_per_s": metrics.Histogram("sparta_output_tokens_per_s", "Per-request completion tokens per second.",
                                          boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], tag_keys=("endpoint",)),
        "skipped": metrics.Histogram("sparta_art_skipped_fraction", "Fraction of candidate KV blocks ART skipped "
                                     "in a request's decode batch.", boundaries=[0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9],
                                     tag_keys=("endpoint",)),
    }


@serve.deployment(name="SpartaReplica")
@serve.ingress(app)
class Replica:
    """One model per replica (loaded once, offline). `config`: workers.serving.engine.EngineConfig fields
    (`scheduler`: continuous or static; `adapter` and `adapters` values: folders, or ArtifactRefs the replica
    downloads on its node, workers.serving.artifacts); `api_key`: when set, /v1 routes need `Authorization: Bearer <key>`;
    `max_batch_size`, `batch_wait_timeout_s`: the static scheduler's `@serve.batch`; `metrics`: {tracking_uri,
    run_id, interval_s} of the deployment's MLflow run (workers.serving.metrics), None: no MLflow reports."""

    def __init__(self, config: dict, api_key: str | None = None, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, metrics: dict | None = None):
        cfg = EngineConfig(**with_local_adapters(config))   # registry adapters: fetched on this node
        self.continuous = cfg.scheduler == "continuous"
        # The static engine loads and decodes on one thread of its own, as the continuous engine does: torch
        # ops on several threads keep several OpenMP teams, which slows small ops (see ContinuousEngine).
        self.executor = None if self.continuous else ThreadPoolExecutor(1, thread_name_prefix="sparta-static")
        self.engine = build_engine(cfg) if self.continuous else self.executor.submit(build_engine, cfg).result()
        self.defaults = SamplingParams(**self.engine.cfg.sampling)
        self.name = self.engine.cfg.served_name
        self.api_key = api_key
        self._generate.set_max_batch_size(max_batch_size)
        self._generate.set_batch_wait_timeout_s(batch_wait_timeout_s)
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:   # constructed outside Serve
            self.replica_id = "local"
        self.metrics = _metrics()
        self.prometheus = ServingMetrics(self.name, self.replica_id, self.engine.load)
        self.counts = {"requests": 0, "errors": 0, "output_tokens": 0}
        self.started = time.time()
        self.reporter = MetricsReporter(**metrics, replica_id=self.replica_id).start() if metrics else None

    def __del__(self):   # Serve calls it on a graceful shutdown: the last report
        if getattr(self, "reporter", None) is not None:
            self.reporter.stop()
        if getattr(self, "continuous", False):
            self.engine.close()

    # -- the static scheduler's batching -------------------------------------------------------------
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate(self, jobs: list[Job]) -> list[Completion]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.engine.run, jobs)

    # -- routes ------------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.name, "replica": self.replica_id, "pid": os.getpid(),
                "dtype": self.engine.dtype, "device": str(self.engine.device), "scheduler": self.engine.cfg.scheduler,
                "uptime_s": round(time.time() - self.started, 1), **self.counts, **self.engine.load(),
                "adapters": self.engine.adapters.names() if self.engine.adapters is not None else [],
                "adapter_evictions": self.engine.adapters.evictions if self.engine.adapters is not None else 0}

    @app.get("/metrics")
    async def prometheus_metrics(self) -> Response:
        return Response(self.prometheus.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        # max_model_len as vLLM reports it: clients (sparta eval) check prompt lengths before sending; adapters
        # with their base as `parent` and their folder as `root`, as vLLM lists LoRA modules
        base = {"id": self.name, "object": "model", "created": int(self.started), "owned_by": "sparta",
                "root": self.engine.cfg.model, "parent": None, "max_model_len": self.engine.cfg.max_context}
        adapters = self.engine.adapters.describe() if self.engine.adapters is not None else []
        return {"object": "list", "data": [base, *({**base, "id": a["name"], "root": a["path"], "parent": self.name,
                                                     "method": a["method"], "rank": a["rank"]} for a in adapters)]}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(self, request: Request) -> Response:
        """Serve another adapter (a sparta adapter folder on the replica's machine) by name, as vLLM's route
        does; the least recently used idle adapter makes room when max_adapters are loaded."""
        self._authorize(request)
        body = api.parse_body(await request.body(), api.LoadAdapterRequest)
        adapters = self._adapters_for("load")
        if body.lora_name == self.name:
            raise api.ApiError(400, f"{body.lora_name!r} is the base model's name", "lora_name")
        load = lambda: adapters.load(body.lora_name, body.lora_path)  # noqa: E731
        try:
            await self._on_engine(load)
        except RequestError as e:
            raise api.ApiError(e.status, e.message, e.param, e.code) from None
        log.info("loaded adapter %s from %s", body.lora_name, body.lora_path)
        return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(self, request: Request) -> Response:
        self._authorize(request)
        body = api.parse_body(await request.body(), api.UnloadAdapterRequest)
        try:
            self._adapters_for("unload").unload(body.lora_name)   # its slot frees when its last request ends
        except RequestError as e:
            raise api.ApiError(e.status, e.message, e.param, e.code) from None
        return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", media_type="text/plain")

    def _adapters_for(self, what: str):
        if self.engine.adapters is None:
            raise api.ApiError(400, f"cannot {what} adapters: this deployment serves a merged adapter (merge: true); "
                               "deploy the base model to serve adapters by name", code="adapters_unavailable")
        if not self.engine.cfg.runtime_adapters:
            raise api.ApiError(403, f"cannot {what} adapters at run time: the deployment's spec sets "
                               "runtime_adapters: false", code="adapters_unavailable")
        return self.engine.adapters

    async def _on_engine(self, fn):
        """Run `fn` on the engine's thread, between steps (it changes tensors the model reads)."""
        if self.continuous:
            return await asyncio.wrap_future(self.engine.call(fn))
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, chat=True)

    # -- the work ----------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise api.ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")

    def _job(self, req, chat: bool) -> tuple[Job, list[int]]:
        """Validate against the model and the server's limits; RequestError -> 4xx. A job for an adapter holds
        a lease on its slot (taken last, so that nothing after it can fail): `_start` hands it back."""
        adapters = self.engine.adapters
        if req.model != self.name and (adapters is None or req.model not in adapters.names()):
            served = [self.name, *(adapters.names() if adapters is not None else [])]
            raise RequestError(f"unknown model {req.model!r}; this server serves: {', '.join(served)}", "model",
                               code="model_not_found", status=404)
        art = art_config(req.art, self.engine.art)
        kv = kv_config(req.kv, (self.engine.cfg.policy, self.engine.cfg.policy_ratio))
        self.engine.check_supported(art, kv)
        sampling = sampling_params(req.sampling(), self.defaults)
        if chat:
            messages = [m.model_dump(exclude_none=True) for m in req.messages]
            prompt = self.engine.check_prompt_ids(self.engine.codec.chat(messages), "messages")
            budget = self.engine.max_tokens_for(len(prompt), req.token_budget, "messages")
        else:
            ids = self.engine.codec.encode(req.prompt) if isinstance(req.prompt, str) else req.prompt
            prompt = self.engine.check_prompt_ids(ids, "prompt")
            budget = self.engine.max_tokens_for(len(prompt), req.max_tokens, "prompt")
        job = Job(prompt, budget, req.stop, art, kv=kv, sampling=sampling, n=req.n)
        if req.model != self.name:
            job.adapter = adapters.acquire(req.model)
            if job.adapter is None:   # unloaded or evicted since the check above
                raise RequestError(f"the adapter {req.model!r} was just unloaded", "model", code="model_not_found",
                                   status=404)
        return job, prompt

    def _start(self, job: Job):
        """The job's completion to await: queued in the continuous engine now (Overloaded or RequestError if
        it cannot be), or handed to the static scheduler's batching. The job's adapter lease ends with it."""
        release = (lambda *_: self.engine.adapters.release(job.adapter)) if job.adapter is not None else None
        if self.continuous:
            try:
                future = self.engine.submit(job)
            except BaseException:
                if release:
                    release()
                raise
            if release:
                future.add_done_callback(release)
            return asyncio.wrap_future(future)
        if release is None:
            return self._generate(job)

        async def static() -> Completion:
            try:
                return await self._generate(job)
            finally:
                release()
        return static()

    async def _serve(self, request: Request, chat: bool):
        endpoint = "chat" if chat else "completions"
        try:
            self._authorize(request)
            req = api.parse_request(await request.body(), api.ChatRequest if chat else api.CompletionRequest)
            try:
                job, prompt = self._job(req, chat)
                rid = api.new_id("chatcmpl" if chat else "cmpl")
                ids = prompt if req.return_token_ids else None
                if req.stream:
                    include_usage = bool(req.stream_options and req.stream_options.include_usage)
                    queue = self._subscribe(job)
                    pending = self._start(job)
                    return StreamingResponse(self._stream(job, pending, queue, rid, chat, include_usage, ids, endpoint,
                                                          req.model),
                                             media_type="text/event-stream", headers={"x-sparta-replica": self.replica_id})
                pending = self._start(job)
            except Overloaded as e:
                raise api.ApiError(503, e.message, code=e.code, headers={"Retry-After": str(e.retry_after_s)}) from None
            except RequestError as e:
                raise api.ApiError(e.status, e.message, e.param, e.code) from None
        except api.ApiError as e:
            self._count(endpoint, e.status)
            return JSONResponse(e.body(), status_code=e.status, headers={"x-sparta-replica": self.replica_id, **e.headers})
        except Exception as e:   # a bug reading the request: counted, the details only in the log
            return self._failed(endpoint, e)
        try:
            done = await pending
        except asyncio.CancelledError:   # the client went away: its rows stop at the next step
            job.cancelled = True
            raise
        except Exception as e:   # the batch or step failed (every request in it gets a 500 of its own)
            return self._failed(endpoint, e)
        self._record(endpoint, done)
        return JSONResponse(api.completion_body(rid, req.model, done, self.replica_id, self._token_text, ids, chat),
                            headers={"x-sparta-replica": self.replica_id})

    def _token_text(self, token: int) -> str:
        return self.engine.codec.decode([token])

    @staticmethod
    def _subscribe(job: Job) -> asyncio.Queue:
        """A queue the engine's thread feeds with the job's deltas, in order, through the event loop."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job.on_delta = lambda delta: loop.call_soon_threadsafe(queue.put_nowait, delta)
        return queue

    async def _stream(self, job: Job, pending, queue: asyncio.Queue, rid: str, chat: bool, include_usage: bool,
                      ids: list[int] | None, endpoint: str, model: str) -> AsyncIterator[str]:
        task = asyncio.ensure_future(pending)
        # the result comes after the deltas: the engine posts each delta before it resolves the job
        task.add_done_callback(lambda _: queue.put_nowait(_END))
        offsets = [0] * job.n   # where each choice's next token starts in its text (completions' text_offset)
        try:
            if chat:
                for index in range(job.n):
                    yield api.chunk(rid, model, chat, role=True, index=index)
            while (delta := await queue.get()) is not _END:
                if not delta.text and not delta.logprobs:
                    continue
                logprobs = api.logprobs_body(delta.logprobs, self._token_text, chat, offsets[delta.index])
                if logprobs and not chat:
                    offsets[delta.index] += sum(len(t) for t in logprobs["tokens"])
                yield api.chunk(rid, model, chat, text=delta.text, index=delta.index, logprobs=logprobs)
            try:
                done = task.result()
            except Exception as e:   # the step failed: tell the client in-band, the status line is sent
                self._count(endpoint, 500)
                yield api.sse(_internal_error(f"{endpoint} (streamed) {rid}", e).body())
                yield api.sse("[DONE]")
                return
            for c in done.choices:   # each choice's end; the last carries the request's art, kv and replica
                extra = {}
                if c is done.choices[-1]:
                    extra = {"art": done.art.to_dict(), "kv": done.kv, "replica": self.replica_id}   # see api.completion_body
                    if ids is not None:
                        extra.update(prompt_token_ids=ids)
                if ids is not None:
                    extra["token_ids"] = list(c.tokens)
                yield api.chunk(rid, model, chat, finish=c.finish_reason, index=c.index, **extra)
            if include_usage:
                yield api.sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                               "created": int(time.time()), "model": model, "choices": [],
                               "usage": api.usage(done.prompt_tokens, done.completion_tokens, done)})
            yield api.sse("[DONE]")
            self._record(endpoint, done)
        finally:
            job.cancelled = True   # a client that went away stops its rows at the next step

    def _failed(self, endpoint: str, exc: Exception) -> JSONResponse:
        """An unexpected failure of a request: logged with its traceback, counted, a generic 500."""
        error = _internal_error(endpoint, exc)
        self._count(endpoint, 500)
        return JSONResponse(error.body(), status_code=500, headers={"x-sparta-replica": self.replica_id})

    def _count(self, endpoint: str, status: int) -> None:
        self.metrics["requests"].inc(1, tags={"endpoint": endpoint, "status": str(status)})
        self.prometheus.request(endpoint, status)
        self.counts["requests"] += 1
        if status >= 400:
            self.counts["errors"] += 1
        if self.reporter is not None:
            self.reporter.request(status)

    def _record(self, endpoint: str, done: Completion) -> None:
        tags = {"endpoint": endpoint}
        self._count(endpoint, 200)
        self.prometheus.completion(endpoint, done)
        self.counts["output_tokens"] += done.completion_tokens
        if self.reporter is not None:
            self.reporter.completion(done.completion_tokens, done.seconds, done.art.skipped_fraction,
                                     done.ttft_s, done.tpot_s)
        self.metrics["tokens"].inc(done.completion_tokens, tags=tags)
        self.metrics["latency"].observe(done.seconds, tags=tags)
        if done.seconds > 0:
            self.metrics["tokens_per_s"].observe(done.completion_tokens / done.seconds, tags=tags)
        self.metrics["skipped"].observe(done.art.skipped_fraction, tags=tags)
