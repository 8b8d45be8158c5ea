"""The continuous engine: iteration-level scheduling (as Orca, vLLM and TGI do) over a preallocated KV pool.

A background thread runs steps. Each step admits waiting requests into free KV slots, prefills prompts
in chunks of at most `max_prefill_tokens` (shortest remaining first) and decodes one token for every
running sequence, all in one packed forward (workers.serving.batch_attention); a sequence that finishes
or is cancelled leaves at once and frees its slot. Rows keep their own lengths, budgets, stop strings,
sampling parameters, ART settings and KV policy: ART runs per group of rows that share settings, inside
the same step. A request with a prefill KV policy (kvpress presses need the whole prompt) is prefilled
whole, then joins the decode batch like any other.

    engine = ContinuousEngine(EngineConfig(model="smollm2-135m", kv_cache_tokens=8 * 2048))
    future = engine.submit(Job(ids, max_tokens=32, on_delta=print))   # concurrent.futures.Future
    done = future.result()                                             # a Completion
    engine.close()
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from adapters.bank import Routing
from attention.hf import pressed
from attention.kernels.dispatch import resolve
from workers.serving import batch_attention
from workers.serving.batch_attention import DecodeGroup, PrefillChunk, StepBatch
from workers.serving.codec import TextStream
from workers.serving.engine import ARTUsage, Choice, Completion, Delta, Engine, EngineConfig, Job
from workers.serving.kv_pool import KVPool
from workers.serving.requests import RequestError
from workers.serving.sampling import SequenceSampler, TokenLogprobs, sample
from workers.serving.scheduler import SlotTable, share_prefill

log = logging.getLogger(__name__)
DEFAULT_SLOTS = 8
SCHEDULERS = ("continuous", "static")


def build_engine(cfg: EngineConfig) -> Engine:
    """The engine `cfg.scheduler` names: ContinuousEngine (continuous) or the static batch Engine."""
    if cfg.scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler: valid: {', '.join(SCHEDULERS)}; got {cfg.scheduler!r}")
    return ContinuousEngine(cfg) if cfg.scheduler == "continuous" else Engine(cfg)


class Overloaded(RequestError):
    """Every KV slot is taken and the queue is full: HTTP 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message, None, code="overloaded", status=503)
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class Sequence:
    """One choice of a request: its KV slot, text and sampler; `prefilled` prompt tokens are in the cache."""

    request: Request
    index: int
    stream: TextStream
    sampler: SequenceSampler | None = None   # made on the engine's thread, at admission
    slot: int = -1
    prefilled: int = 0
    position: int = 0                      # RoPE position of the next token fed
    last_token: int | None = None
    logprobs: list[TokenLogprobs] | None = None
    first_at: float | None = None
    last_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.stream.finish is not None


@dataclass(eq=False)
class Request:
    """A job inside the engine: its sequences (one per choice, the first one prefills), accounting, result."""

    job: Job
    future: Future
    arrival: float
    kv: dict
    press: object | None
    quest_ratio: float
    seqs: list[Sequence] = field(default_factory=list)
    reserved: int = 0                      # slots held back for the other choices until the prefill ends
    visited: int = 0
    candidates: int = 0
    steps: int = 0
    widest: int = 0                        # the largest decode batch it was part of

    @property
    def prompt(self) -> list[int]:
        return self.job.prompt


class ContinuousEngine(Engine):
    """`Engine` (model, codec, request checks) with a KV pool and a scheduling thread. `submit(job)`
    queues a job and returns a Future of its Completion (Overloaded when it cannot be queued); `run(jobs)`
    submits and waits; `close()` stops the thread, failing what is left."""

    def __init__(self, cfg: EngineConfig):
        # Every torch call of the engine (loading included) runs on its own thread: a second thread running
        # torch's OpenMP-parallel ops keeps a second team of workers, and with more workers than cores
        # libgomp stops spinning, which made each small decode-step op ~2x slower (measured on 2 cores).
        self.cond = threading.Condition()
        self.closed = False
        self.calls: list[tuple] = []   # (fn, Future) to run on the engine's thread between steps
        ready: Future = Future()
        self.thread = threading.Thread(target=self._run, args=(cfg, ready), name="sparta-engine", daemon=True)
        self.thread.start()
        ready.result()   # re-raises what loading raised

    def _run(self, cfg: EngineConfig, ready: Future) -> None:
        try:
            self._build(cfg)
        except BaseException as e:
            ready.set_exception(e)
            return
        ready.set_result(None)
        self._loop()

    def _build(self, cfg: EngineConfig) -> None:
        super().__init__(cfg)
        conf = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        heads = conf.num_attention_heads
        kv_heads = getattr(conf, "num_key_value_heads", None) or heads
        head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // heads
        tokens = cfg.kv_cache_tokens or DEFAULT_SLOTS * cfg.max_context
        slots = tokens // cfg.max_context
        if slots < 1:
            raise ValueError(f"kv_cache_tokens ({tokens}) holds no slot of max_context ({cfg.max_context}) positions")
        self.pool = KVPool(conf.num_hidden_layers, kv_heads, head_dim, slots, cfg.max_context,
                           getattr(torch, self.dtype), self.device)
        self.table = SlotTable(slots)
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Sequence] = []
        self.decoding: list[Sequence] = []   # in slot order: decoding[i].slot == i
        self.counters = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "visited_blocks": 0,
                         "candidate_blocks": 0, "failed_steps": 0}
        self.step_seconds = 0.05             # a running mean, for Retry-After
        batch_attention.register()
        self._previous_impl = [(c, c._attn_implementation) for c in self._configs()]
        for c, _ in self._previous_impl:
            c._attn_implementation = batch_attention.IMPLEMENTATION
        self._warm_up()

    def _warm_up(self) -> None:
        """One packed step on the scratch slot before serving: builds the kernels the first request would
        wait for, and checks that every attention layer went through `batch_attention` (a model whose
        attention ignores transformers' attention interface cannot be batched this way)."""
        resolve(self.cfg.impl, self.device, self.art.block_size)   # compiles the CPU ART kernel on first use
        ids = [self.codec.pad_id, self.codec.pad_id]
        step = StepBatch(self.pool, [], torch.zeros(self.pool.layers, 0, dtype=torch.long), [],
                         [PrefillChunk(self.pool.scratch, 0, len(ids), 0)], impl=self.cfg.impl)
        with torch.inference_mode(), batch_attention.running(step):
            self.model(input_ids=torch.tensor([ids], device=self.device),
                       position_ids=torch.arange(len(ids), device=self.device)[None], use_cache=False, logits_to_keep=1)
        if step.layer_calls != self.pool.layers:
            raise ValueError(f"{type(self.model).__name__}'s attention does not go through transformers' attention "
                             f"interface ({step.layer_calls} of {self.pool.layers} layers did): serve it with "
                             "scheduler: static")

    def _configs(self) -> list:
        cfg = self.model.config
        return [cfg, *(c for c in (getattr(cfg, "text_config", None),) if c is not None)]

    @contextmanager
    def stock_attention(self):
        """transformers' own attention for a whole-prompt forward (a KV policy's prefill)."""
        for c, impl in self._previous_impl:
            c._attn_implementation = impl
        try:
            yield
        finally:
            for c, _ in self._previous_impl:
                c._attn_implementation = batch_attention.IMPLEMENTATION

    # -- the public side (any thread) ---------------------------------------------------------------
    def submit(self, job: Job) -> Future:
        """Queue `job`; a Future of its Completion. RequestError if it cannot run here, Overloaded (503)
        when every slot is taken and `max_queued` requests already wait."""
        return self.submit_all([job])[0]

    def submit_all(self, jobs: list[Job], bounded: bool = True) -> list[Future]:
        """Queue `jobs` together (they are admitted in one step when slots allow); bounded=False skips the
        queue bound (a caller that waits for all of them anyway, as `run` does)."""
        requests = [self._request(job) for job in jobs]
        with self.cond:
            if self.closed:
                raise RuntimeError("the engine is closed")
            for request in requests:
                if bounded and self._queued_beyond_slots(request.job.n) >= self.cfg.max_queued:
                    raise Overloaded(f"all {self.pool.slots} KV slots are taken and {self.cfg.max_queued} requests "
                                     "are waiting for one; retry later", self.retry_after_s())
                self.waiting.append(request)
            self.cond.notify()
        return [r.future for r in requests]

    def _queued_beyond_slots(self, n: int) -> int:
        """How many waiting requests would still wait once the free slots are handed out in arrival order;
        -1 when a new request of `n` sequences would get slots too (holding the lock)."""
        free, blocked = self.table.free(), 0
        for r in self.waiting:
            if blocked or r.job.n > free:
                blocked += 1
            else:
                free -= r.job.n
        return -1 if not blocked and n <= free else blocked

    def _request(self, job: Job) -> Request:
        kv = self.kv_of(job)
        self.check_supported(job.art, kv)
        if job.n > self.pool.slots:
            raise RequestError(f"n ({job.n}) exceeds the {self.pool.slots} sequences this server decodes at once",
                               "n")
        press, applied = self.applied_kv(*kv, len(job.prompt))
        request = Request(job, Future(), time.perf_counter(), applied, press, kv[1] if kv[0] == "quest" else 0.0)
        request.seqs = [Sequence(request, i, TextStream(self.codec, job.max_tokens, job.stop),
                                 logprobs=[] if job.sampling.logprobs is not None else None)
                        for i in range(job.n)]
        request.future.set_running_or_notify_cancel()
        return request

    def call(self, fn) -> Future:
        """Run `fn()` on the engine's thread between two steps (loading an adapter changes what the model
        reads); a Future of its result."""
        future: Future = Future()
        with self.cond:
            if self.closed:
                raise RuntimeError("the engine is closed")
            self.calls.append((fn, future))
            self.cond.notify()
        return future

    def run(self, jobs: list[Job]) -> list[Completion]:
        """Decode `jobs` (queued together, without the queue bound) and wait for them; one Completion each."""
        return [f.result() for f in self.submit_all(jobs, bounded=False)]

    def close(self, timeout: float = 30.0) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout)

    def load(self) -> dict:
        """What the scheduler holds now (for metrics and health checks)."""
        with self.cond:
            running = {id(s.request) for s in self.decoding + self.prefilling}
            return {"running_requests": len(running), "running_sequences": len(self.decoding) + len(self.prefilling),
                    "queued_requests": len(self.waiting), "kv_slots": self.pool.slots,
                    "kv_slots_used": self.pool.slots - self.table.owner.count(None),
                    "kv_cache_tokens": self.pool.slots * self.pool.capacity, "kv_used_tokens": self.pool.used_tokens(),
                    **self.counters}

    def retry_after_s(self) -> int:
        """Seconds until a slot likely frees: the fewest tokens a running sequence still has to make,
        at the recent step time."""
        left = [s.stream.max_tokens - len(s.stream.tokens) for s in self.decoding]
        return max(1, math.ceil(self.step_seconds * (min(left) if left else 1)))

    # -- the loop (the engine thread) ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not (self.waiting or self.decoding or self.prefilling or self.calls):
                    self.cond.wait()
                if self.closed:
                    break
                calls, self.calls = self.calls, []
            for fn, future in calls:   # between steps: nothing reads what they change
                try:
                    future.set_result(fn())
                except BaseException as e:
                    future.set_exception(e)
            with self.cond:
                admitted = self._admit()
            start = time.perf_counter()
            try:
                with torch.inference_mode():
                    self._step(admitted)
                if self.cfg._step_delay_s:
                    time.sleep(self.cfg._step_delay_s)
            except Exception as e:   # fail what this step held, keep serving the rest
                log.exception("engine step failed")
                self.counters["failed_steps"] += 1
                self._fail_all_running(e)
            self.step_seconds = 0.9 * self.step_seconds + 0.1 * (time.perf_counter() - start)
        self._fail_all_running(RuntimeError("the engine was closed"))
        for _, future in self.calls:
            future.set_exception(RuntimeError("the engine was closed"))
        for request in self.waiting:
            request.future.set_exception(RuntimeError("the engine was closed"))

    def _admit(self) -> list[Request]:
        """Waiting requests that get slots now, in arrival order (holding the lock)."""
        out = []
        while self.waiting and self.table.free() >= self.waiting[0].job.n:
            request = self.waiting.popleft()
            job = request.job
            for seq in request.seqs:
                seq.sampler = self.sampler(job, seq.index)
            self.table.take(request.seqs[0])
            self.pool.reset(request.seqs[0].slot)
            request.reserved = job.n - 1
            self.table.reserved += request.reserved
            if job.art.uses_bounds or request.quest_ratio:
                self.pool.track_blocks(job.art.block_size, balls=job.art.uses_ball or job.art.uses_values)
            out.append(request)
        return out

    def _step(self, admitted: list[Request]) -> None:
        self._drop_cancelled()
        self.prefilling += [r.seqs[0] for r in admitted if r.press is None]
        for request in admitted:
            if request.press is not None:
                self._prefill_whole(request)
        self.inject_fault([s.request.prompt for s in self.decoding + self.prefilling])
        chunks = share_prefill({s: len(s.request.prompt) - s.prefilled for s in self.prefilling},
                               self.cfg.max_prefill_tokens)
        if not self.decoding and not chunks:
            return
        step, ids, positions, keep = self._plan(chunks)
        with batch_attention.running(step), self.route(self._routing(chunks)):
            out = self.model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=keep)
        logits = out.logits[0].float()
        self._advance(step, chunks, logits)

    # -- planning --------------------------------------------------------------------------------------
    def _plan(self, chunks: list[tuple[Sequence, int]]):
        """The packed input of a step (decode tokens, then chunks), its positions, the rows whose logits are
        needed, and the attention plan."""
        tokens, positions, keep = [], [], []
        for i, seq in enumerate(self.decoding):
            tokens.append(seq.last_token)
            positions.append(seq.position)
            keep.append(i)
        plan_chunks = []
        for seq, n in chunks:
            offset = len(tokens)
            tokens += seq.request.prompt[seq.prefilled: seq.prefilled + n]
            positions += range(seq.prefilled, seq.prefilled + n)
            plan_chunks.append(PrefillChunk(seq.slot, seq.prefilled, n, offset))
            if seq.prefilled + n == len(seq.request.prompt):
                keep.append(offset + n - 1)
        slots = [s.slot for s in self.decoding]
        before = self.pool.lengths[:, slots] if slots else torch.zeros(self.pool.layers, 0, dtype=torch.long)
        dev = self.device
        step = StepBatch(self.pool, slots, before, self._groups(), plan_chunks, impl=self.cfg.impl,
                         completed=self._completed_blocks(before, chunks))
        as_tensor = lambda x: torch.tensor([x], dtype=torch.long, device=dev)  # noqa: E731
        return step, as_tensor(tokens), as_tensor(positions), torch.tensor(keep, dtype=torch.long, device=dev)

    def _routing(self, chunks: list[tuple[Sequence, int]]) -> Routing:
        """Which adapter each packed token uses: decode rows one token each, then the prompt chunks."""
        spans = [(seq.request.job.adapter, i, 1) for i, seq in enumerate(self.decoding)]
        offset = len(spans)
        for seq, n in chunks:
            spans.append((seq.request.job.adapter, offset, n))
            offset += n
        if self.adapters is None or all(slot is None for slot, _, _ in spans):
            return Routing()
        return Routing.packed(spans, self.adapters.bank, self.device)

    def _groups(self) -> list[DecodeGroup]:
        by_setting: dict[tuple, list[int]] = {}
        for i, seq in enumerate(self.decoding):
            by_setting.setdefault((seq.request.job.art, seq.request.quest_ratio), []).append(i)
        if len(by_setting) == 1:
            (art, quest), rows = next(iter(by_setting.items()))
            return [DecodeGroup(art, quest, rows)]
        return [DecodeGroup(art, quest, rows, torch.tensor(rows, dtype=torch.long, device=self.device))
                for (art, quest), rows in by_setting.items()]

    def _completed_blocks(self, before: torch.Tensor, chunks: list[tuple[Sequence, int]]) -> dict:
        """Per tracked block size and layer: the (slots, blocks) this step's writes complete."""
        out: dict[int, dict] = {}
        for bs in self.pool.bounds:
            per_layer: dict[int, tuple[list[int], list[int]]] = {}
            if self.decoding:   # a decode row completes block b when its length reaches (b + 1) * bs
                done = (before + 1) % bs == 0
                for layer, row in done.nonzero().tolist():
                    slots, blocks = per_layer.setdefault(layer, ([], []))
                    slots.append(self.decoding[row].slot)
                    blocks.append(int(before[layer, row] + 1) // bs - 1)
            for seq, n in chunks:   # dense chunks write every layer alike
                first, last = seq.prefilled // bs, (seq.prefilled + n) // bs
                for layer in range(self.pool.layers):
                    slots, blocks = per_layer.setdefault(layer, ([], []))
                    slots += [seq.slot] * (last - first)
                    blocks += range(first, last)
            dev = self.device
            out[bs] = {layer: (torch.tensor(s, device=dev), torch.tensor(b, device=dev))
                       for layer, (s, b) in per_layer.items() if s}
        return out

    # -- after the forward -----------------------------------------------------------------------------
    def _advance(self, step: StepBatch, chunks: list[tuple[Sequence, int]], logits: torch.Tensor) -> None:
        now = time.perf_counter()
        n = len(self.decoding)
        for seq, k in chunks:   # what the forward wrote
            seq.prefilled += k
            self.pool.lengths[:, seq.slot] += k
            self.counters["prefill_tokens"] += k
        if n:
            self.pool.lengths[:, [s.slot for s in self.decoding]] += 1
        completing = [seq for seq, _ in chunks if seq.prefilled == len(seq.request.prompt)]
        rows = list(self.decoding)   # the sequence each logits row samples for
        row_logits = [logits[:n]]
        for i, seq in enumerate(completing):   # every choice draws its first token from the prompt's last logits
            self.prefilling.remove(seq)
            choices = self._fork(seq)
            rows += choices
            row_logits.append(logits[n + i].expand(len(choices), -1))
        tokens, logprobs = sample(torch.cat(row_logits), [s.sampler for s in rows]) if rows else (None, [])
        values = torch.cat([tokens, step.visited, step.candidates]).tolist() if rows else []   # the step's one read
        tokens, visited, candidates = values[: len(rows)], values[len(rows): len(rows) + n], values[len(rows) + n:]
        self.counters["steps"] += 1
        self.counters["decode_tokens"] += n
        self.counters["visited_blocks"] += sum(visited)
        self.counters["candidate_blocks"] += sum(candidates)
        for i, seq in enumerate(self.decoding):
            request = seq.request
            request.visited += visited[i]
            request.candidates += candidates[i]
            request.widest = max(request.widest, n)
            request.steps += seq.index == 0
        for seq, token, lp in zip(rows, tokens, logprobs):
            self._push(seq, token, lp, now)
        self._settle(rows)

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """The request's choices after its prefill: the first one in the parent's slot, the others in copies."""
        request = parent.request
        for seq in request.seqs[1:]:
            self.table.reserved -= 1
            request.reserved -= 1
            self.table.take(seq)
            self.pool.move(parent.slot, seq.slot)
            seq.prefilled = parent.prefilled
        return request.seqs

    def _push(self, seq: Sequence, token: int, lp: TokenLogprobs | None, now: float) -> None:
        request = seq.request
        seq.first_at = seq.first_at or now
        seq.last_at = now
        seq.last_token = token
        piece = seq.stream.push(token)
        seq.position = len(request.prompt) + len(seq.stream.tokens) - 1   # where `token` is fed next step
        seq.sampler.record(token)
        if lp is not None and seq.logprobs is not None:
            seq.logprobs.append(lp)
        request.job.emit(Delta(seq.index, piece, [token], [lp] if lp is not None and seq.logprobs is not None else None,
                               seq.stream.finish))

    def _settle(self, rows: list[Sequence]) -> None:
        """The next step's decode batch from this step's rows: finished sequences leave (their slots free,
        their requests end), the rest are compacted into slots 0..n-1."""
        for seq in rows:
            if seq.finished and seq.slot >= 0:
                self._leave(seq)
        staying = [s for s in rows if not s.finished]
        for move in self.table.compact(staying):
            self.pool.move(*(self.pool.scratch if s == SlotTable.SCRATCH else s for s in move))
        for slot, owner in enumerate(self.table.owner):   # slots left behind by moves hold nothing now
            if owner is None:
                self.pool.reset(slot)
        self.decoding = sorted(staying, key=lambda s: s.slot)
        running = [s.request.job.art for s in self.decoding + self.prefilling]
        self.pool.drop_blocks({art.block_size for art in running},
                              {art.block_size for art in running if art.uses_ball or art.uses_values})

    def _leave(self, seq: Sequence) -> None:
        self.table.release(seq)
        self.pool.reset(seq.slot)
        seq.slot = -1
        request = seq.request
        if all(s.finished for s in request.seqs) and not request.future.done():
            request.future.set_result(self._completion(request))

    def _completion(self, request: Request) -> Completion:
        seqs = request.seqs
        first = seqs[0]
        end = max(s.last_at for s in seqs if s.last_at is not None) if any(s.last_at for s in seqs) else time.perf_counter()
        n0 = len(first.stream.tokens)
        tpot = (first.last_at - first.first_at) / (n0 - 1) if n0 > 1 else None
        art = request.job.art
        usage = ARTUsage(art.mode if art.active else "off", request.visited, request.candidates, request.steps,
                         request.widest)
        choices = [Choice(s.index, s.stream.tokens, s.stream.text, s.stream.finish, s.logprobs) for s in seqs]
        return Completion(choices, len(request.prompt), usage, end - request.arrival, dict(request.kv),
                          first.first_at - request.arrival if first.first_at else None, tpot)

    # -- requests that stop early ------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        with self.cond:
            for request in [r for r in self.waiting if r.job.cancelled]:
                self.waiting.remove(request)
                for seq in request.seqs:
                    seq.stream.end("cancelled")
                request.future.set_result(self._completion(request))
        gone = {id(s.request): s.request for s in self.decoding + self.prefilling if s.request.job.cancelled}
        for request in gone.values():
            for seq in request.seqs:
                if not seq.finished:
                    request.job.emit(Delta(seq.index, seq.stream.end("cancelled"), [], None, "cancelled"))
            if request.seqs[0] in self.prefilling:
                self.prefilling.remove(request.seqs[0])
                self._release_reservation(request)
            for seq in request.seqs:
                if seq.slot >= 0:
                    self._leave(seq)
        if gone:
            self._settle(self.decoding)

    def _release_reservation(self, request: Request) -> None:
        self.table.reserved -= request.reserved
        request.reserved = 0

    def _fail_all_running(self, error: Exception) -> None:
        """A step failed: every request it held fails with `error` (the replica answers 500); slots free."""
        for seq in list(self.decoding) + list(self.prefilling):
            request = seq.request
            self._release_reservation(request)
            for s in request.seqs:
                if s.slot >= 0:
                    self.table.release(s)
                    self.pool.reset(s.slot)
                    s.slot = -1
            if not request.future.done():
                request.future.set_exception(error)
        self.decoding, self.prefilling = [], []

    # -- a KV policy's prefill ---------------------------------------------------------------------------
    def _prefill_whole(self, request: Request) -> None:
        """Prefill with a kvpress press: the whole prompt in one forward on transformers' cache, then its
        (compressed) KV into the request's slot; its first token comes from this forward."""
        from attention.cache import new_cache

        seq = request.seqs[0]
        ids = torch.tensor([request.prompt], device=self.device)
        cache = new_cache(self.model, growing=False)
        with self.stock_attention(), pressed(request.press, self.model), self.route(Routing.uniform(request.job.adapter)):
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        self.pool.load(seq.slot, [(layer.keys, layer.values) for layer in cache.layers])
        seq.prefilled = len(request.prompt)
        choices = self._fork(seq)
        tokens, logprobs = sample(out.logits[0, -1:].float().expand(len(choices), -1), [s.sampler for s in choices])
        now = time.perf_counter()
        for s, token, lp in zip(choices, tokens.tolist(), logprobs):
            self._push(s, token, lp, now)
        self._settle(self.decoding + choices)
