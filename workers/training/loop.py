"""The training loop of one trial: a pretrained model, an adapter, DeepSpeed, chain steps, evaluation,
reports and resumable checkpoints.

    from workers.training.loop import TrainConfig, train
    result = train(TrainConfig(model="minilm-l6", dataset="movie-reviews-binary", method="cla", steps=40,
                               eval_every=20), report=lambda metrics, checkpoint_dir: ...)

`train` is one plain function of a typed config, read top to bottom: build, step, evaluate, report.
It runs in a single process (tests, smoke runs) or in each Ray Train worker; Ray and MLflow stay
outside (pipelines/ wraps it and turns `report` into `ray.train.report`). It reads no environment
variables itself; torch.distributed is set up by the caller's launcher (Ray, or MASTER_ADDR/PORT,
RANK, WORLD_SIZE for one process) and DeepSpeed picks its accelerator as usual.
"""
from __future__ import annotations

import base64
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers as tf
from deepspeed.accelerator import get_accelerator

import adapters
from adapters import AdapterConfig, chain_boundaries
from workers.data.assets import load_model, model_kind
from workers.hardware import PRECISIONS, resolve_device, resolve_precision
from workers.training.deepspeed_setup import chain_step, check_deepspeed, engine_config
from workers.data.datasets import TASKS, ByteTokenizer, ClassificationFraming, GenerationFraming, load_task
from workers.data.tables import load_table_task
from workers.training.analysis import AnalysisSettings, check_analyses
from workers.training.analysis import analyze as analyze_adapter
from workers.training.metrics import MAIN_METRIC, classification_scores, peak_memory_mib

Report = Callable[[dict[str, Any], str], None]

FRAMINGS = ("auto", "classification", "generation")
# Fields that must match between a checkpoint and the config resuming it (the run's identity).
_RESUME_KEYS = ("model", "dataset", "method", "seed", "rank", "alpha", "chain_segments", "lora_plus_ratio",
                "targets", "steps", "epochs", "batch_size", "max_length", "precision", "framing", "split_seed")


@dataclass(frozen=True)
class TrainConfig:
    """One trial.

    model: a packaged alias (`minilm-l6`, `smollm2-135m`, ...), `random:<arch>-tiny` or an HF folder.
    dataset: a task of `workers.data.datasets.TASKS`, or a table reference (a dict as the sweep spec's
        `DatasetSpec.reference()` gives: name, path or train/validation/test files, text, label, split;
        read by `workers.data.tables`); split once with `split_seed` (fixed across run seeds).
    method, rank, alpha, chain_segments, lora_plus_ratio, targets: the adapter (`adapters.AdapterConfig`).
    seed: seeds the head, the adapter's draws, the data order and dropout.
    lr, weight_decay: AdamW on the adapter's parameter groups (adapters get no decay; LoRA+ ratio on B).
    steps or epochs (exactly one): optimizer steps to take, or passes over the training split.
    batch_size: examples per micro-batch per worker (DeepSpeed's train_micro_batch_size_per_gpu);
        gradient_accumulation_steps comes from `deepspeed` (default 1).
    max_length: tokens per example (prompt + label for generation).
    eval_every: evaluate, report and checkpoint every this many steps (and always at the end);
        None: at the end only. eval_at_start: also evaluate the untouched model (result["initial"]).
    eval_examples: at most this many examples of each of validation and test (None: all).
    precision: "fp32", "bf16" (DeepSpeed's bf16 mode; the model is loaded in bf16) or "auto" (bf16 where the
        worker's device runs it natively: CUDA, or a CPU with AMX / AVX-512 BF16; fp32 elsewhere). The
        precision a run used is reported with its metrics ("precision").
    framing: "classification" (a sequence-classification head), "generation" (a causal LM writes the
        label; loss on the label tokens, accuracy by exact match) or "auto" (encoders classify,
        causal LMs generate).
    deepspeed: the DeepSpeed config; the micro-batch, bf16 flag, "zero_allow_untested_optimizer" and
        a quiet "steps_per_print" are filled in. ZeRO stages 0-2; no "optimizer" section (the loop
        builds AdamW from the adapter's groups); fp16 is not offered.
    analysis: the Beyond-LoRA analyses (`workers.training.analysis.ANALYSES`). "gap": every evaluation also
        measures the loss on a fixed slice of the training split (as many examples as validation), in eval
        mode, and reports `train_eval_loss` and `gap` = test_loss - train_eval_loss. The others run once at
        the end on rank 0 over the final adapter, report "analysis/..." metrics and write CSV + PNG files
        into the final checkpoint's `analysis/` folder. analysis_settings: `AnalysisSettings` fields (grid
        sizes of the landscape, intruder_k, the bound's sigma and bits) over their defaults.
    """

    model: str
    dataset: str | dict
    method: str
    seed: int = 0
    lr: float = 1e-3
    rank: int = 16
    alpha: float | None = None
    chain_segments: int = 3
    lora_plus_ratio: float = 16.0
    weight_decay: float = 0.0
    targets: tuple[str, ...] | str | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 16
    max_length: int = 128
    eval_every: int | None = None
    eval_examples: int | None = None
    eval_batch_size: int | None = None
    eval_at_start: bool = False
    precision: str = "auto"
    framing: str = "auto"
    split_seed: int = 0
    deepspeed: dict = field(default_factory=dict)
    analysis: tuple[str, ...] = ()
    analysis_settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.adapter_config()   # validates method, rank, alpha, ...
        if isinstance(self.dataset, dict):
            if not (self.dataset.get("path") or self.dataset.get("train")):
                raise ValueError("TrainConfig.dataset: a table reference needs `path` or `train`")
        elif self.dataset not in TASKS:
            raise ValueError(f"TrainConfig.dataset: unknown task {self.dataset!r}; valid: {', '.join(TASKS)}, "
                             "or a table reference (dict)")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("TrainConfig: give exactly one of steps and epochs")
        for name in ("steps", "batch_size", "max_length", "eval_every", "eval_examples", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"TrainConfig.epochs must be > 0, got {self.epochs!r}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"TrainConfig: need lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision: {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        if self.framing not in FRAMINGS:
            raise ValueError(f"TrainConfig.framing: {self.framing!r}; valid: {', '.join(FRAMINGS)}")
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        try:
            object.__setattr__(self, "analysis", check_analyses(self.analysis))
        except ValueError as e:
            raise ValueError(f"TrainConfig.analysis: {e}") from None
        try:
            AnalysisSettings.from_dict(self.analysis_settings)
        except ValueError as e:
            raise ValueError(f"TrainConfig.analysis_settings: {e}") from None
        try:
            check_deepspeed(self.deepspeed, self.batch_size, self.precision)
        except ValueError as e:
            raise ValueError(f"TrainConfig.deepspeed: {e}") from None

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(method=self.method, rank=self.rank, alpha=self.alpha, targets=self.targets,
                             chain_segments=self.chain_segments, lora_plus_ratio=self.lora_plus_ratio,
                             seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets) if isinstance(self.targets, tuple) else self.targets
        d["analysis"] = list(self.analysis)
        return d


def resolve_framing(cfg: TrainConfig) -> str:
    causal = model_kind(cfg.model) == "causal"
    if cfg.framing == "auto":
        return "generation" if causal else "classification"
    if cfg.framing == "generation" and not causal:
        raise ValueError(f"{cfg.model} is an encoder: it cannot generate labels; use framing='classification'")
    return cfg.framing


# -- the loop --------------------------------------------------------------------------------------
def train(cfg: TrainConfig, report: Report | None = None, checkpoint_dir: str | Path | None = None,
          resume_from: str | Path | None = None) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `cfg.dataset` with `cfg.method` under DeepSpeed.

    Every `cfg.eval_every` steps and at the end: evaluate on the validation and test splits, save a
    checkpoint into a fresh folder `<checkpoint_dir>/step-NNNNNN` (the adapter, DeepSpeed's engine and
    optimizer state, the step and RNG state) and call `report(metrics, folder)` with a flat dict
    (step, epoch, train_loss, val_loss, val_<metric>..., test_loss, test_<metric>..., metric, gen_gap,
    samples_per_s, wall_s, peak_mem_mib, trainable_params). `checkpoint_dir=None` uses a new temporary
    folder (the caller owns it). `resume_from=<a step folder>` continues that run to the same end,
    giving the metrics an uninterrupted run gives. Returns the last metrics plus `adapter_dir`,
    `history` (every report) and `initial` (the untrained model's metrics, with `eval_at_start`).
    """
    # -- build: distributed, data, model + adapter, DeepSpeed ---------------------------------------
    t_start = time.perf_counter()
    # auto -> fp32 or bf16 for this worker's device, first: a checkpoint records (and a resume checks) it
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, resolve_device()))
    _init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.seed)   # the classification head's init
    resume = Path(resume_from) if resume_from is not None else None
    saved = _read_trainer_state(resume, cfg) if resume else None

    task = (load_table_task(cfg.dataset, seed=cfg.split_seed) if isinstance(cfg.dataset, dict)
            else load_task(cfg.dataset, seed=cfg.split_seed))
    val = task.validation[:cfg.eval_examples]
    test = task.test[:cfg.eval_examples]
    train_fixed = task.train[:len(val)]   # the gap's training loss: a fixed slice, measured like the test loss
    framing = resolve_framing(cfg)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    model, frame = build_model(cfg, task, framing, dtype)
    # On resume the adapter file replays the finished chain segments (their merges into W0) exactly.
    handle = adapters.load(model, resume / "adapter") if resume else adapters.apply(model, cfg.adapter_config())
    optimizer = torch.optim.AdamW(handle.param_groups(lr=cfg.lr, weight_decay=cfg.weight_decay))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=engine_config(cfg.deepspeed, cfg.batch_size, cfg.precision))

    accumulation = engine.gradient_accumulation_steps()
    global_batch = cfg.batch_size * accumulation * world
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(task.train) / global_batch))
    boundaries = set(chain_boundaries(total_steps, cfg.chain_segments)) if handle.config.spec.chained else set()
    batches = _Batches(task.train, cfg.batch_size, accumulation, rank, world, cfg.seed)
    root = Path(checkpoint_dir) if checkpoint_dir is not None else Path(tempfile.mkdtemp(prefix="sparta-train-"))

    def evaluate_all() -> dict[str, float]:
        eval_batch = cfg.eval_batch_size or cfg.batch_size
        return {f"{split}_{k}": v
                for split, examples in (("val", val), ("test", test))
                for k, v in evaluate(engine, frame, examples, task.num_labels, eval_batch).items()}

    state = {"step": 0, "wall_s": 0.0, "history": [], "initial": None, "adapter_dir": None}
    if saved:
        engine.load_checkpoint(str(resume / "deepspeed"), tag="state", load_module_strict=False)
        state = saved
        _set_rng_state(json.loads((resume / f"rng-rank{rank}.json").read_text()))
    elif cfg.eval_at_start:
        state["initial"] = {"step": 0, **evaluate_all(), "metric": MAIN_METRIC}
    wall_offset = state["wall_s"]   # a resumed run's clock goes on from the checkpoint's

    # -- train ----------------------------------------------------------------------------------------
    losses: list[float] = []
    train_s = 0.0
    engine.train()
    while state["step"] < total_steps:
        t0 = time.perf_counter()
        step_loss = 0.0
        for micro in range(accumulation):   # DeepSpeed steps the optimizer after the last one
            examples = batches.micro_batch(state["step"], micro)
            loss = engine(**_to(frame.batch(examples), engine.device)).loss
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / accumulation
        state["step"] += 1
        losses.append(step_loss)
        if state["step"] in boundaries:
            chain_step(handle, engine)
        train_s += time.perf_counter() - t0

        # -- evaluate, checkpoint, report -------------------------------------------------------------
        if state["step"] == total_steps or (cfg.eval_every and state["step"] % cfg.eval_every == 0):
            train_loss = _mean_over_workers(losses, engine.device)
            scores = evaluate_all()
            if "gap" in cfg.analysis:
                eval_batch = cfg.eval_batch_size or cfg.batch_size
                scores["train_eval_loss"] = evaluate(engine, frame, train_fixed, task.num_labels, eval_batch,
                                                     loss_only=True)["loss"]
                scores["gap"] = scores["test_loss"] - scores["train_eval_loss"]
            engine.train()
            metrics = {
                "step": state["step"],
                "epoch": state["step"] * global_batch / len(task.train),
                "train_loss": train_loss,
                **scores,
                "metric": MAIN_METRIC,
                "precision": cfg.precision,
                "gen_gap": scores["test_loss"] - train_loss,
                "samples_per_s": len(losses) * global_batch / max(train_s, 1e-9),
                "wall_s": wall_offset + time.perf_counter() - t_start,
                "peak_mem_mib": peak_memory_mib(engine.device),
                "trainable_params": handle.num_trainable(),
            }
            state["history"].append(metrics)
            state["wall_s"] = metrics["wall_s"]
            folder = _save_checkpoint(root / f"step-{state['step']:06d}", cfg, handle, engine, state, rank)
            state["adapter_dir"] = str(folder / "adapter")
            final_analyses = [a for a in cfg.analysis if a != "gap"]
            if state["step"] == total_steps and final_analyses and rank == 0:
                metrics.update(analyze_adapter(
                    folder / "adapter", lambda: build_model(cfg, task, framing, dtype)[0], final_analyses,
                    n_train=len(task.train), out=folder / "analysis",
                    losses=lambda m, split: fixed_loss(m, frame, train_fixed if split == "train" else test,
                                                       cfg.eval_batch_size or cfg.batch_size),
                    settings=AnalysisSettings.from_dict(cfg.analysis_settings)))
            if report is not None:
                report(metrics, str(folder))
            losses, train_s = [], 0.0

    return {**state["history"][-1], "adapter_dir": state["adapter_dir"], "history": state["history"],
            "initial": state["initial"]}


def build_model(cfg: TrainConfig, task, framing: str, dtype: torch.dtype):
    """(the pretrained model, its framing of the task's examples) for `cfg`, with no adapter yet."""
    if framing == "generation":
        model, tok = load_model(cfg.model, task="causal_lm", dtype=dtype)
        return model, GenerationFraming(tok or ByteTokenizer(), task, cfg.max_length)
    model, tok = load_model(cfg.model, task="classification", num_labels=task.num_labels, dtype=dtype)
    return model, ClassificationFraming(tok or ByteTokenizer(), cfg.max_length)


# -- evaluation ------------------------------------------------------------------------------------
def _loss_sum(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> tuple[float, int]:
    """(summed cross-entropy, what it sums over): per example for classification, per label token for
    generation (whose logits and labels cover the last positions only: GenerationFraming.batch)."""
    if kind == "classification":
        return F.cross_entropy(logits, labels, reduction="sum").item(), len(labels)
    target = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=-100, reduction="sum").item()
    return loss, int((target != -100).sum())


@torch.no_grad()
def fixed_loss(model, frame, examples, batch_size: int) -> float:
    """The mean loss of `model` on `examples` in eval mode, in this process alone (evaluate's loss, unsharded):
    what the analyses compare between weights."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for i in range(0, len(examples), batch_size):
            batch = _to(frame.batch(examples[i:i + batch_size]), device)
            labels = batch.pop("labels")
            loss, n = _loss_sum(model(**batch).logits.float(), labels, frame.kind)
            total, count = total + loss, count + n
    finally:
        model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def evaluate(engine, frame, examples, num_labels: int, batch_size: int, loss_only: bool = False) -> dict[str, float]:
    """Loss and task scores on `examples`, sharded over the workers and gathered.

    Classification: mean cross-entropy per example, predictions by argmax. Generation: mean
    cross-entropy per label token (teacher-forced), predictions by greedy generation of the label.
    loss_only: {"loss": ...} alone (no predictions, no generation).
    """
    model = engine.module
    model.eval()
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = examples[rank::world]
    loss_sum, count, preds, truth = 0.0, 0, [], []
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        batch = _to(frame.batch(chunk), engine.device)
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        loss, n = _loss_sum(logits, labels, frame.kind)
        loss_sum, count = loss_sum + loss, count + n
        if loss_only:
            continue
        if frame.kind == "classification":
            preds += logits.argmax(-1).tolist()
        else:
            prompts = _to(frame.prompts(chunk), engine.device)
            out = model.generate(**prompts, generation_config=tf.GenerationConfig(
                max_new_tokens=frame.max_new_tokens, do_sample=False, pad_token_id=frame.tok.pad_token_id,
                eos_token_id=frame.tok.eos_token_id))
            preds += [frame.parse(row) for row in out[:, prompts["input_ids"].shape[1]:].tolist()]
        truth += [e.label for e in chunk]
    if world > 1:
        loss_sum, count = _sum_over_workers([loss_sum, float(count)], engine.device)
    if loss_only:
        return {"loss": loss_sum / max(count, 1)}
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (preds, truth))
        preds = [p for g in gathered for p in g[0]]
        truth = [y for g in gathered for y in g[1]]
    return {"loss": loss_sum / max(count, 1), **classification_scores(preds, truth, num_labels)}


# -- data order ------------------------------------------------------------------------------------
class _Batches:
    """The training examples of each micro-batch: the run reads a stream of one seeded permutation
    per epoch after another; each optimizer step takes the next `batch * accumulation * world`
    examples, and worker r takes its own slice of each micro-batch. A pure function of the step, so
    a resumed run reads exactly what the interrupted one would have."""

    def __init__(self, examples: list, batch: int, accumulation: int, rank: int, world: int, seed: int):
        self.examples, self.batch, self.accumulation = examples, batch, accumulation
        self.rank, self.world, self.seed = rank, world, seed
        self._epoch, self._perm = -1, []

    def micro_batch(self, step: int, micro: int) -> list:
        start = ((step * self.accumulation + micro) * self.world + self.rank) * self.batch
        return [self.examples[self._index(pos)] for pos in range(start, start + self.batch)]

    def _index(self, pos: int) -> int:
        n = len(self.examples)
        if pos // n != self._epoch:
            self._epoch = pos // n
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self._epoch)
            self._perm = torch.randperm(n, generator=g).tolist()
        return self._perm[pos % n]


# -- checkpoints -----------------------------------------------------------------------------------
def _save_checkpoint(folder: Path, cfg: TrainConfig, handle, engine, state: dict, rank: int) -> Path:
    """adapter/ (safetensors + json; adapter/peft/ the same adapter in PEFT's LoRA format, all methods but
    full), deepspeed/ (trainable weights, optimizer and ZeRO partitions, engine counters; frozen weights
    excluded: the adapter file rebuilds them), trainer_state.json (step, history, config) and
    rng-rank<r>.json (each worker's torch RNG)."""
    if rank == 0 and folder.exists():
        raise FileExistsError(f"{folder} exists: each checkpoint goes to a fresh folder")
    engine.save_checkpoint(str(folder / "deepspeed"), tag="state", exclude_frozen_parameters=True)
    (folder / f"rng-rank{rank}.json").write_text(json.dumps(_rng_state()))
    if rank == 0:
        handle.save(folder / "adapter")
        if cfg.method != "full":   # full has no low-rank form; see docs/adapters.md, "PEFT format"
            handle.save(folder / "adapter" / "peft", format="peft")
        (folder / "trainer_state.json").write_text(json.dumps(
            {**state, "adapter_dir": None, "config": cfg.to_dict()}, indent=1))
    dist.barrier()
    return folder


def _read_trainer_state(folder: Path, cfg: TrainConfig) -> dict:
    path = folder / "trainer_state.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint of workers.training.loop (no trainer_state.json)")
    state = json.loads(path.read_text())
    saved, now = state.pop("config"), cfg.to_dict()
    differ = [k for k in _RESUME_KEYS if saved.get(k) != now.get(k)]
    if differ:
        raise ValueError(f"cannot resume from {folder}: the config differs in {', '.join(differ)} "
                         f"({', '.join(f'{k}={saved.get(k)!r}' for k in differ)} in the checkpoint)")
    state["adapter_dir"] = str(folder / "adapter")
    return state


def _rng_state() -> dict:
    enc = lambda t: base64.b64encode(t.numpy().tobytes()).decode()   # noqa: E731
    return {"torch": enc(torch.get_rng_state()),
            "cuda": [enc(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def _set_rng_state(saved: dict) -> None:
    dec = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)   # noqa: E731
    torch.set_rng_state(dec(saved["torch"]))
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([dec(s) for s in saved["cuda"]])


# -- small helpers ---------------------------------------------------------------------------------
def _init_distributed() -> None:
    """Join torch.distributed through DeepSpeed: gloo on a CPU, the accelerator's backend (NCCL) on
    GPUs. A process group the launcher (Ray Train) already made is reused."""
    accel = get_accelerator()
    backend = "gloo" if accel.device_name() == "cpu" else accel.communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _sum_over_workers(values: list[float], device) -> list[float]:
    if dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _mean_over_workers(values: list[float], device) -> float:
    total, count = _sum_over_workers([sum(values), float(len(values))], device)
    return total / count
