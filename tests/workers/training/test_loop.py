"""workers.training.loop: the trial's training loop under real DeepSpeed (gloo, one process, no Ray).

Tiny random models where only plumbing matters; the packaged MiniLM where behaviour does (dropout for
the resume test, real learning in the slow test). The chain-step tests drive DeepSpeed's optimizer
wrappers directly to check what the loop relies on."""
import json
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers as tf
from safetensors.torch import load_file

import deepspeed
import adapters
from adapters import apply
from workers.data.assets import load_model, resolve_model_path
from workers.data.datasets import ByteTokenizer, ClassificationFraming, Example, GenerationFraming, load_task
from workers.training.metrics import classification_scores
from workers.training.deepspeed_setup import adapter_masters, chain_step, engine_config
from workers.training.loop import (TrainConfig, _init_distributed,
                           resolve_framing, train)

BINARY_TRAIN = 8033   # movie-reviews-binary training split (tests/workers/data/test_datasets.py)


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """One gloo process group, as a launcher would set it up; torn down after the module."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                         WORLD_SIZE="1").items():
            mp.setenv(k, v)
        yield
        if dist.is_initialized():
            dist.destroy_process_group()


def tiny(**overrides) -> TrainConfig:
    base = dict(model="random:llama-tiny", dataset="movie-reviews-binary", method="lora", rank=4, lr=1e-2, steps=4,
                batch_size=4, max_length=128, eval_every=2, eval_examples=8)
    return TrainConfig(**{**base, **overrides})


def run(cfg: TrainConfig, folder: Path, resume_from=None):
    reports = []
    result = train(cfg, report=lambda m, d: reports.append((m, d)), checkpoint_dir=folder, resume_from=resume_from)
    return result, reports


def zero(stage: int) -> dict:
    return {"zero_optimization": {"stage": stage}}


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


# -- (1) short runs: every key, finite, at the right steps -----------------------------------------
# Trainable counts (q and v, r = 4, head excluded): llama-tiny has q 32->32 and v 32->16 in 2 layers;
# MiniLM q and v 384->384 in 6 layers.
@pytest.mark.parametrize("model,method,max_length,trainable,framing", [
    ("random:llama-tiny", "lora", 128, 2 * 4 * ((32 + 32) + (32 + 16)), "generation"),
    ("random:llama-tiny", "cla", 128, 2 * 4 * (32 + 16), "generation"),
    ("minilm-l6", "lora", 32, 6 * 2 * 4 * (384 + 384), "classification"),
    ("minilm-l6", "cla", 32, 6 * 2 * 4 * 384, "classification"),
])
def test_short_run_reports_every_metric(tmp_path, model, method, max_length, trainable, framing):
    cfg = tiny(model=model, method=method, max_length=max_length)
    assert resolve_framing(cfg) == framing
    result, reports = run(cfg, tmp_path)

    assert [m["step"] for m, _ in reports] == [2, 4]
    keys = {"step", "epoch", "train_loss", "val_loss", "val_accuracy", "val_mcc", "test_loss", "test_accuracy",
            "test_mcc", "metric", "precision", "gen_gap", "samples_per_s", "wall_s", "peak_mem_mib", "trainable_params"}
    for metrics, folder in reports:
        assert set(metrics) == keys
        assert metrics["metric"] == "accuracy"
        assert metrics["precision"] in ("fp32", "bf16")   # what precision="auto" came to on this machine
        assert all(math.isfinite(v) for k, v in metrics.items() if k not in ("metric", "precision")), metrics
        assert metrics["trainable_params"] == trainable
        assert metrics["epoch"] == pytest.approx(metrics["step"] * 4 / BINARY_TRAIN)
        assert metrics["gen_gap"] == pytest.approx(metrics["test_loss"] - metrics["train_loss"])
        assert 0 <= metrics["val_accuracy"] <= 1 and metrics["samples_per_s"] > 0 and metrics["peak_mem_mib"] > 50
        assert Path(folder) == tmp_path / f"step-{metrics['step']:06d}"
        assert (Path(folder) / "adapter" / "adapter_config.json").is_file()
        peft_cfg = json.loads((Path(folder) / "adapter" / "peft" / "adapter_config.json").read_text())
        assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == cfg.rank   # the PEFT export beside it
        assert json.loads((Path(folder) / "trainer_state.json").read_text())["step"] == metrics["step"]
    assert reports[1][0]["wall_s"] > reports[0][0]["wall_s"]
    assert result["history"] == [m for m, _ in reports]
    assert {k: result[k] for k in keys} == reports[-1][0]
    assert result["adapter_dir"] == str(tmp_path / "step-000004" / "adapter")


def test_analysis_gap_at_every_evaluation_and_the_rest_at_the_end(tmp_path):
    """"gap": the fixed training slice's loss beside the test loss at each evaluation; the others once, at the
    end, on the final adapter: metrics in the last report and files in its checkpoint's analysis/ folder."""
    from adapters.analysis import bound_terms
    from workers.training.loop import fixed_loss

    cfg = tiny(model="random:bert-tiny", method="cla", analysis=("gap", "bounds", "spectrum", "intruders"),
               precision="fp32")   # the loss is recomputed below in fp32
    result, reports = run(cfg, tmp_path)
    for metrics, _ in reports:
        assert metrics["gap"] == pytest.approx(metrics["test_loss"] - metrics["train_eval_loss"])
        assert metrics["train_eval_loss"] != metrics["train_loss"]   # eval mode on fixed examples, not the running loss
    first, last = reports[0][0], reports[-1][0]
    assert not any(k.startswith("analysis/") for k in first)
    assert last["analysis/bound_term"] == pytest.approx(
        bound_terms("cla", [(32, 32), (32, 32)] * 2, rank=4, n_examples=BINARY_TRAIN, bits=32).term)
    assert 1 <= last["analysis/effective_rank_mean"] <= 4
    assert set(p.name for p in (Path(reports[-1][1]) / "analysis").iterdir()) == {
        "spectrum.csv", "spectrum.png", "intruders.csv", "intruders.png"}
    assert result["analysis/bound_term"] == last["analysis/bound_term"]
    # the gap's training loss is the final model's fixed_loss over the first len(validation) training examples
    torch.manual_seed(cfg.seed)   # the random base, as the loop draws it
    model, tok = load_model("random:bert-tiny", task="classification", num_labels=2)
    adapters.load(model, result["adapter_dir"])
    frame = ClassificationFraming(tok or ByteTokenizer(), cfg.max_length)
    train_fixed = load_task("movie-reviews-binary").train[:8]
    assert fixed_loss(model, frame, train_fixed, 4) == pytest.approx(last["train_eval_loss"], rel=1e-5)


def test_epochs_set_the_step_count_and_the_last_report(tmp_path):
    # 0.001 epochs of 8,033 examples at batch 4: ceil(2.008) = 3 steps; eval_every 2 -> reports at 2 and 3.
    result, reports = run(tiny(steps=None, epochs=0.001, eval_examples=2), tmp_path)
    assert [m["step"] for m, _ in reports] == [2, 3] and result["step"] == 3


def test_eval_at_start_scores_the_untrained_model(tmp_path):
    result, _ = run(tiny(steps=2, eval_every=None, eval_at_start=True, eval_examples=4), tmp_path)
    assert result["initial"]["step"] == 0 and math.isfinite(result["initial"]["val_loss"])
    assert result["initial"]["val_loss"] != result["val_loss"]
    assert [m["step"] for m in result["history"]] == [2]


# -- (2) resume -----------------------------------------------------------------------------------
DETERMINISTIC = ("step", "epoch", "train_loss", "val_loss", "val_accuracy", "val_mcc", "test_loss",
                 "test_accuracy", "test_mcc", "gen_gap", "trainable_params")


@pytest.mark.parametrize("cfg", [
    # MiniLM has dropout: the RNG state must come back too. c3la's boundaries (2 and 4 of 6) fall on
    # either side of the checkpoint at step 3, so resuming replays one merge and performs the next.
    pytest.param(dict(model="minilm-l6", method="c3la", max_length=32, steps=6, eval_every=3), id="minilm-c3la-zero0"),
    pytest.param(dict(method="c3la", steps=6, eval_every=3, deepspeed=zero(2)), id="llama-c3la-zero2"),
    pytest.param(dict(method="lora", steps=6, eval_every=3, deepspeed=zero(1)), id="llama-lora-zero1"),
])
def test_resume_equals_an_uninterrupted_run(tmp_path, cfg):
    cfg = tiny(**cfg)
    full, reports = run(cfg, tmp_path / "full")
    assert [m["step"] for m, _ in reports] == [3, 6]
    resumed, resumed_reports = run(cfg, tmp_path / "resumed", resume_from=reports[0][1])

    assert [m["step"] for m, _ in resumed_reports] == [6]          # only the steps left
    assert [m["step"] for m in resumed["history"]] == [3, 6]       # the history goes on
    assert {k: resumed[k] for k in DETERMINISTIC} == {k: full[k] for k in DETERMINISTIC}   # bit-exact
    a, b = adapter_tensors(full["adapter_dir"]), adapter_tensors(resumed["adapter_dir"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a.keys() != adapter_tensors(Path(reports[0][1]) / "adapter").keys() or cfg.method == "lora"


def test_resume_refuses_a_different_run(tmp_path):
    _, reports = run(tiny(steps=2, eval_every=1, eval_examples=2), tmp_path / "a")
    with pytest.raises(ValueError, match="differs in rank"):
        run(tiny(steps=2, eval_every=1, eval_examples=2, rank=8), tmp_path / "b", resume_from=reports[0][1])


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    result, reports = run(tiny(steps=2, eval_every=1, eval_examples=2, deepspeed={"gradient_accumulation_steps": 2}),
                          tmp_path)
    assert [m["step"] for m, _ in reports] == [1, 2]
    assert result["epoch"] == pytest.approx(2 * 4 * 2 / BINARY_TRAIN)   # two micro-batches per step


def _worker(rank: int, world: int, port: int, cfg: TrainConfig, folder: str) -> None:
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    result = train(cfg, checkpoint_dir=Path(folder) / f"rank{rank}")
    (Path(folder) / f"result{rank}.json").write_text(json.dumps({k: v for k, v in result.items() if k != "history"}))


@pytest.mark.parametrize("stage", [0, 2])
def test_two_workers_equal_one_worker_with_their_joint_batch(tmp_path, stage):
    """Data parallel over two gloo processes, as Ray Train runs it: each worker reads its half of the
    global batch, DeepSpeed averages the gradients, evaluation is sharded and gathered. With a
    per-example loss (classification) that is the same training as one worker with the whole batch."""
    import torch.multiprocessing as mp
    common = dict(framing="classification", method="c3la", steps=4, eval_every=None, eval_examples=6,
                  deepspeed=zero(stage), precision="fp32")   # equal to 1e-5: fp32 (auto is bf16 on AVX-512 BF16 CPUs)
    two = tiny(batch_size=2, **common)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, two, str(tmp_path)), nprocs=2, start_method="spawn")
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in (0, 1)]
    one, _ = run(tiny(batch_size=4, **common), tmp_path / "one")

    assert results[0] == {**results[1], "adapter_dir": results[0]["adapter_dir"], "wall_s": results[0]["wall_s"],
                          "samples_per_s": results[0]["samples_per_s"], "peak_mem_mib": results[0]["peak_mem_mib"]}
    for key in ("train_loss", "val_loss", "test_loss"):
        assert results[0][key] == pytest.approx(one[key], rel=1e-5), key
    assert results[0]["epoch"] == one["epoch"]
    a, b = adapter_tensors(results[0]["adapter_dir"]), adapter_tensors(one["adapter_dir"])
    # Adam divides by sqrt(v): where an element's gradient is near zero, the ~1e-7 rounding difference of
    # averaging over two processes becomes up to ~1% of one step (lr 1e-2: 1e-4); seen 2e-5 on one element of
    # 128 after 4 steps. A wrong reduction would move every element by a whole step, and the losses above.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-2 * two.lr)
    assert (tmp_path / "rank1" / "step-000004" / "rng-rank1.json").is_file()


# -- (3) chain steps under DeepSpeed --------------------------------------------------------------
def build_engine(stage: int, precision: str = "fp32", method: str = "c3la", lr: float = 1e-2, **ds):
    """What train() builds, on a tiny classifier (a head whose optimizer state must survive)."""
    torch.manual_seed(0)
    cfg = tiny(method=method, lr=lr, precision=precision, deepspeed={**zero(stage), **ds})
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model, _ = load_model("random:llama-tiny", task="classification", num_labels=2, dtype=dtype)
    handle = apply(model, cfg.adapter_config())
    optimizer = torch.optim.AdamW(handle.param_groups(lr=cfg.lr))
    _init_distributed()
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=engine_config(cfg.deepspeed, cfg.batch_size, cfg.precision))
    return handle, engine


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (4, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (4,), generator=g)}


def take_step(engine, seed):
    engine.train()
    loss = engine(**batch(seed)).loss
    engine.backward(loss)
    engine.step()


def inner_optimizer(engine):
    opt = engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer


def adam_steps(engine) -> dict[str, set[int]]:
    """Adam's step count per optimizer group name (the groups of handle.param_groups)."""
    inner = inner_optimizer(engine)
    return {g["name"]: {int(inner.state[p]["step"]) if p in inner.state else 0 for p in g["params"]}
            for g in inner.param_groups}


WRAPPERS = {0: "AdamW", 1: "DeepSpeedZeroOptimizer", 2: "DeepSpeedZeroOptimizer"}


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_chain_step_under_deepspeed_resets_the_adapter_and_keeps_masters_in_step(stage):
    handle, engine = build_engine(stage)
    assert type(engine.optimizer).__name__ == WRAPPERS[stage]
    for seed in range(2):
        take_step(engine, seed)
    probe = batch(99)
    engine.eval()
    with torch.no_grad():
        before = engine(input_ids=probe["input_ids"]).logits
    window = {n: layer.idx.clone() for n, layer in handle.layers.items()}

    chain_step(handle, engine)

    with torch.no_grad():
        after = engine(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)            # the function is kept
    assert all(not torch.equal(layer.idx, window[n]) for n, layer in handle.layers.items())   # next window
    assert all(float(p.detach().abs().max()) == 0 for p in handle.adapter_parameters())  # B_{j+1} = 0
    for master, model_copy in adapter_masters(engine.optimizer, {id(p) for p in handle.adapter_parameters()}):
        assert torch.equal(master, model_copy.float())                          # masters follow the reset
    assert adam_steps(engine) == {"adapter_B": {0}, "head": {2}}                # adapter state dropped, head kept

    take_step(engine, 2)
    # A fresh Adam's first step moves each entry by lr * g / (|g| + eps) ~ lr, from B = 0: a stale fp32
    # master would put the old B back (see the next test); Adam's step count shows the state was reset.
    b = torch.cat([p.detach().flatten() for p in handle.adapter_parameters()])
    moved = b[b != 0].abs()
    assert moved.numel() > 0.9 * b.numel()
    torch.testing.assert_close(moved, torch.full_like(moved, 1e-2), rtol=2e-2, atol=0)
    assert adam_steps(engine) == {"adapter_B": {1}, "head": {3}}


@pytest.mark.parametrize("stage", [1, 2])
def test_plain_chain_step_under_zero_is_undone_by_the_fp32_masters(stage):
    """Why train() has its own chain_step: the adapter's reset alone touches only the model's tensors;
    ZeRO steps its fp32 masters (and their Adam state) and copies them back over the reset."""
    handle, engine = build_engine(stage)
    for seed in range(2):
        take_step(engine, seed)
    handle.chain_step(engine.optimizer)
    assert all(float(p.detach().abs().max()) == 0 for p in handle.adapter_parameters())
    stale = adapter_masters(engine.optimizer, {id(p) for p in handle.adapter_parameters()})
    assert stale and all(float(m.detach().abs().max()) > 0 for m, _ in stale)
    assert adam_steps(engine)["adapter_B"] == {2}
    take_step(engine, 2)
    # Not the fresh first step from B = 0 (every entry at +-lr) that chain_step gives: the old B is back.
    b = torch.cat([p.detach().flatten() for p in handle.adapter_parameters()]).abs()
    assert float((b - 1e-2).abs().max()) > 5e-3


def test_chained_training_is_the_same_at_zero_stage_0_and_2(tmp_path):
    """The loop end to end: c3la with two chain boundaries trains the same adapter whether AdamW steps
    the model's tensors (stage 0) or ZeRO's flat fp32 partitions (stage 2)."""
    results = {}
    for stage in (0, 2):
        results[stage], _ = run(tiny(method="c3la", steps=6, eval_every=None, eval_examples=4, precision="fp32",
                                     deepspeed=zero(stage)), tmp_path / str(stage))
    a, b = adapter_tensors(results[0]["adapter_dir"]), adapter_tensors(results[2]["adapter_dir"])
    assert sorted(a) == sorted(b) and any("segment2" in k for k in a)   # two merges happened
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert results[0]["val_loss"] == pytest.approx(results[2]["val_loss"], rel=1e-6)


# -- (4) bf16 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage,ds,wrapper", [
    (0, {}, "FP16_UnfusedOptimizer"),
    (1, {"data_types": {"grad_accum_dtype": "fp32"}}, "BF16_Optimizer"),
    (2, {}, "DeepSpeedZeroOptimizer"),
])
def test_bf16_chain_step_keeps_fp32_masters_in_step(stage, ds, wrapper):
    handle, engine = build_engine(stage, precision="bf16", **ds)
    assert type(engine.optimizer).__name__ == wrapper
    assert all(p.dtype == torch.bfloat16 for p in handle.adapter_parameters())
    for seed in range(2):
        take_step(engine, seed)
    head_steps = adam_steps(engine)["head"]   # FP16_UnfusedOptimizer adds a zero-gradient step at start
    assert head_steps in ({2}, {3})
    chain_step(handle, engine)
    pairs = adapter_masters(engine.optimizer, {id(p) for p in handle.adapter_parameters()})
    assert pairs and all(m.dtype == torch.float32 and float(m.detach().abs().max()) == 0 for m, _ in pairs)
    assert adam_steps(engine) == {"adapter_B": {0}, "head": head_steps}
    take_step(engine, 2)
    b = torch.cat([p.detach().float().flatten() for p in handle.adapter_parameters()])
    moved = b[b != 0].abs()
    torch.testing.assert_close(moved, torch.full_like(moved, 1e-2), rtol=3e-2, atol=0)   # bf16 gradients


@pytest.mark.parametrize("method,stage", [("lora", 0), ("c3la", 2)])
def test_bf16_run(tmp_path, method, stage):
    result, reports = run(tiny(method=method, precision="bf16", deepspeed=zero(stage), steps=3, eval_every=None),
                          tmp_path)
    assert [m["step"] for m, _ in reports] == [3]
    assert all(math.isfinite(v) for k, v in result.items() if isinstance(v, float))
    tensors = adapter_tensors(result["adapter_dir"])
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert any(float(t.float().abs().max()) > 0 for k, t in tensors.items() if k.endswith("lora_B"))


def test_auto_precision_is_what_this_machine_runs_natively(tmp_path):
    from workers.hardware import resolve_precision

    want = resolve_precision("auto", "cuda" if torch.cuda.is_available() else "cpu")
    assert tiny().precision == "auto"
    result, reports = run(tiny(steps=1, eval_every=None), tmp_path)
    assert result["precision"] == want and all(m["precision"] == want for m, _ in reports)
    dtypes = {t.dtype for t in adapter_tensors(result["adapter_dir"]).values()}
    assert dtypes == {torch.bfloat16 if want == "bf16" else torch.float32}


# -- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (dict(deepspeed=zero(3)), "ZeRO stage 3"),
    (dict(deepspeed={"optimizer": {"type": "AdamW"}}), "optimizer"),
    (dict(deepspeed={"fp16": {"enabled": True}}), "fp16"),
    (dict(deepspeed={"bf16": {"enabled": True}}), "precision"),
    (dict(deepspeed={"train_micro_batch_size_per_gpu": 8}), "batch_size"),
    (dict(epochs=1.0), "exactly one of steps and epochs"),
    (dict(precision="fp16"), "precision"),
    (dict(method="dora"), "unknown method"),
    (dict(dataset="sst2"), "unknown task"),
    (dict(analysis=("gap", "hessian")), "TrainConfig.analysis: unknown analysis 'hessian'; valid: gap, bounds"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_framing_choice():
    assert resolve_framing(tiny(model="random:bert-tiny")) == "classification"
    assert resolve_framing(tiny(model="random:llama-tiny", framing="classification")) == "classification"
    with pytest.raises(ValueError, match="encoder"):
        resolve_framing(tiny(model="minilm-l6", framing="generation"))
    cfg = tiny(precision="bf16", deepspeed={"zero_optimization": {"stage": 1}})
    ds = engine_config(cfg.deepspeed, cfg.batch_size, cfg.precision)
    assert ds["bf16"]["enabled"] and ds["train_micro_batch_size_per_gpu"] == 4 and ds["zero_optimization"]["stage"] == 1


def test_classification_scores():
    binary = classification_scores([1, 1, 0, -1], [1, 0, 0, 1], num_labels=2)
    assert binary["accuracy"] == 0.5 and set(binary) == {"accuracy", "mcc"}
    assert classification_scores([0, 1, 1, 0], [0, 1, 1, 0], 2)["mcc"] == 1.0
    multi = classification_scores([0, 1, 2, 3, -1, -1], [0, 1, 2, 3, 3, 0], num_labels=4)
    assert set(multi) == {"accuracy", "f1"} and multi["accuracy"] == pytest.approx(4 / 6)
    # macro F1 over the task's 4 labels; -1 (no label generated) is a miss, not a fifth class
    assert multi["f1"] == pytest.approx((2 / 3 + 1 + 1 + 2 / 3) / 4)


# -- generation framing -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm_tokenizer():
    return tf.AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"), local_files_only=True)


def test_generation_framing_with_a_chat_template(smollm_tokenizer):
    tok = smollm_tokenizer
    task = load_task("movie-reviews", max_examples=40)
    frame = GenerationFraming(tok, task, max_length=96)
    examples = task.train[:4]
    b = frame.batch(examples)
    assert b["input_ids"].shape[1] <= 96
    for row, labels, e in zip(b["input_ids"], b["labels"], examples):
        target = labels[labels != -100].tolist()
        assert tok.decode(target) == task.label_names[e.label] + "<|im_end|>"   # the label, then eos
        start = len(row) - len(labels) + int((labels != -100).nonzero()[0])   # labels: the last positions
        prompt = tok.decode(row[:start])
        assert prompt.endswith("<|im_start|>assistant\n") and "Review:" in prompt
        assert "negative, neutral, positive" in prompt
    p = frame.prompts(examples)
    assert (p["attention_mask"][:, -1] == 1).all()                       # left-padded
    assert frame.parse(tok.encode(" Positive ") + [tok.eos_token_id] + tok.encode("junk")) == 2
    assert frame.parse(tok.encode("very positive")) == -1


def test_generation_framing_plain_pattern_and_truncation():
    tok = ByteTokenizer()
    task = load_task("movie-reviews-binary", max_examples=40)
    frame = GenerationFraming(tok, task, max_length=128)
    long = max(task.train, key=lambda e: len(e.text))
    b = frame.batch([long])
    assert b["input_ids"].shape[1] == 128 - frame.max_new_tokens + len(frame.targets[long.label])
    text = tok.decode(b["input_ids"][0].tolist())
    assert text.startswith("What is the sentiment of this review?") and "\nSentiment: " in text
    assert text.endswith("Sentiment: " + task.label_names[long.label])
    assert tok.decode(tok.encode("négatif")) == "négatif"
    with pytest.raises(ValueError, match="no room"):
        GenerationFraming(tok, task, max_length=40)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])   # rotary and absolute positions
def test_left_padded_generation_batch_equals_each_example_alone(arch):
    model, _ = load_model(f"random:{arch}-tiny", task="causal_lm")
    model.eval()
    frame = GenerationFraming(ByteTokenizer(), load_task("movie-reviews-binary", max_examples=40), max_length=128)
    examples = [Example("good", 1), Example("bad stuff here, all of it", 0), Example("x", 0)]
    b = frame.batch(examples)
    assert b["labels"].shape[1] == b["logits_to_keep"] == frame.max_new_tokens + 1
    with torch.no_grad():
        together = model(**b)
        alone = [model(**frame.batch([e])) for e in examples]
        shifted = model(**{k: v for k, v in b.items() if k != "position_ids"}).logits
    for i, out in enumerate(alone):
        torch.testing.assert_close(together.logits[i], out.logits[0], rtol=1e-5, atol=1e-5)
    n = [len(t) for t in (frame.targets[e.label] for e in examples)]   # loss is per label token
    expected = sum(o.loss.item() * k for o, k in zip(alone, n)) / sum(n)
    assert together.loss.item() == pytest.approx(expected, rel=1e-5)
    if arch == "gpt2":   # absolute positions: without position_ids the padded rows would shift
        assert not torch.allclose(shifted, together.logits, atol=1e-4)


# -- (5) learning -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_lora_on_minilm_learns_movie_reviews_binary(tmp_path):
    cfg = TrainConfig(model="minilm-l6", dataset="movie-reviews-binary", method="lora", rank=8, lr=1e-3, steps=50,
                      batch_size=16, max_length=64, eval_examples=200, eval_at_start=True)
    result, _ = run(cfg, tmp_path)
    before, after = result["initial"]["val_accuracy"], result["val_accuracy"]
    print(f"val accuracy {before:.3f} -> {after:.3f} in {result['wall_s']:.0f} s")
    task = load_task("movie-reviews-binary")
    shown = task.validation[:200]
    majority = max(sum(e.label == c for e in shown) for c in (0, 1)) / len(shown)
    assert after >= before + 0.10 and after >= majority + 0.15


# -- (5) the user's own table ---------------------------------------------------------------------
def test_trains_on_a_csv_table(tmp_path):
    words = {"yes": ["lovely", "wonderful", "great", "superb"], "no": ["awful", "terrible", "bad", "dreadful"]}
    rows = [(f"the stay was {words[label][i % 4]} and the room {i}", label) for i in range(48) for label in words]
    table = tmp_path / "stays.csv"
    table.write_text("body,verdict\n" + "".join(f"{text},{label}\n" for text, label in rows))
    ref = {"name": "stays", "path": str(table), "train": None, "validation": None, "test": None,
           "text": "body", "label": "verdict", "split": None}
    cfg = TrainConfig(model="minilm-l6", dataset=ref, method="lora", rank=4, lr=5e-3, steps=24, batch_size=8,
                      max_length=16, eval_every=24, eval_examples=9, eval_at_start=True)
    result, _ = run(cfg, tmp_path / "ckpt")
    assert result["initial"]["val_accuracy"] < 0.9   # untrained head: not yet separating yes from no
    assert result["val_accuracy"] == 1.0 and result["test_accuracy"] == 1.0
