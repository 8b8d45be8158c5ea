"""Offline task data. The built-in tasks are BIG-bench tasks read from the bigbench sdist tarball
(`make assets` downloads it; installing bigbench would pull tensorflow): only the task.json files of
the built-in tasks are extracted, once, into the cache."""
from __future__ import annotations

import json
import os
import random
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workers.data.assets import cache_dir

BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
_TASKS_IN_SDIST = "bigbench-1.0.0/bigbench/benchmark_tasks"
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)   # train / validation / test


@dataclass(frozen=True)
class Example:
    text: str
    label: int   # index into TaskData.label_names


@dataclass(frozen=True)
class TaskData:
    """A classification task with fixed train/validation/test splits."""

    name: str
    label_names: list[str]
    train: list[Example] = field(repr=False)
    validation: list[Example] = field(repr=False)
    test: list[Example] = field(repr=False)
    kind: str = "classification"

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass(frozen=True)
class BigBenchTask:
    path: str                    # task folder under benchmark_tasks/
    labels: tuple[str, ...]      # target_scores keys; the position is the class id
    source: str = ""             # where the examples come from, for reports


TASKS: dict[str, BigBenchTask] = {
    # 8,215 English reviews (hotels, medicine, products, school), whole texts.
    "multiemo": BigBenchTask("multiemo/all_text_en", ("negative", "neutral", "positive", "ambivalent"),
                             "MultiEmo, English reviews"),
    # Positive vs negative only (neutral and ambivalent dropped): the stand-in for SST-2.
    "multiemo-binary": BigBenchTask("multiemo/all_text_en", ("negative", "positive"),
                                    "MultiEmo, English reviews, polar only"),
    "strategyqa": BigBenchTask("strategyqa", ("No", "Yes"), "StrategyQA yes/no questions"),
    # Wikipedia passage + claim; the label says whether the passage supports, refutes or neither.
    "vitaminc": BigBenchTask("vitaminc_fact_verification", ("False", "True", "Neither"),
                             "VitaminC fact verification"),
}


# -- extraction ------------------------------------------------------------------------------------
def _sdist() -> Path:
    path = cache_dir() / "downloads" / BIGBENCH_SDIST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `make assets` (it downloads the bigbench sdist "
                                "with `pip download --no-deps --no-binary :all: bigbench==1.0.0`)")
    return path


def _cached(task_path: str) -> Path:
    return cache_dir() / "bigbench" / task_path / "task.json"


def _write_atomic(path: Path, data: bytes) -> None:
    # Concurrent workers may extract the same task: each writes its own temp file and renames it.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)   # mkstemp makes it owner-only; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def bigbench_task_json(task_path: str) -> Path:
    """The cached task.json of `task_path` (a folder under benchmark_tasks/). The first call extracts
    it together with those of every built-in task: one pass over the 358 MB tarball (~7 s) for all."""
    out = _cached(task_path)
    if out.is_file():
        return out
    wanted = {f"{_TASKS_IN_SDIST}/{p}/task.json": _cached(p)
              for p in {task_path, *(t.path for t in TASKS.values())} if not _cached(p).is_file()}
    sdist = _sdist()
    with tarfile.open(sdist, mode="r|gz") as tar:   # streaming: members are read in archive order
        for member in tar:
            if member.name in wanted:
                _write_atomic(wanted.pop(member.name), tar.extractfile(member).read())
                if not wanted:
                    break
    if not out.is_file():
        raise FileNotFoundError(f"{_TASKS_IN_SDIST}/{task_path}/task.json is not in {sdist}")
    return out


# -- examples and splits ---------------------------------------------------------------------------
def _label_of(example: dict) -> str | None:
    """The single correct answer: the target_scores key scored 1, else a plain string target."""
    scores = example.get("target_scores")
    if scores:
        winners = [k for k, v in scores.items() if v == 1]
        return winners[0] if len(winners) == 1 else None
    target = example.get("target")
    return target if isinstance(target, str) else None


def _examples(task: BigBenchTask) -> list[Example]:
    raw = json.loads(bigbench_task_json(task.path).read_text(encoding="utf-8"))["examples"]
    labelled: dict[str, set[str]] = {}
    for ex in raw:
        label = _label_of(ex)
        if label is not None:
            labelled.setdefault(ex["input"].strip(), set()).add(label)
    # A text seen twice must not land in two splits: keep it once, or drop it if its labels disagree.
    return [Example(text, task.labels.index(label))
            for text, labels in labelled.items() if len(labels) == 1
            for label in labels if label in task.labels]


def _cut(examples: list[Example]) -> tuple[list[Example], list[Example], list[Example]]:
    """80/10/10: validation and test get floor(n/10) each, train the rest."""
    n_val = n_test = int(len(examples) * SPLIT_FRACTIONS[1])
    n_train = len(examples) - n_val - n_test
    return examples[:n_train], examples[n_train:n_train + n_val], examples[n_train + n_val:]


def load_task(name: str, seed: int = 0, max_examples: int | None = None) -> TaskData:
    """A built-in task with deterministic splits: the examples (deduplicated, in file order) are
    shuffled with `seed` and cut 80/10/10. `max_examples` keeps the first n of the shuffled examples
    before the cut, a fast stand-in for tests; the same seed always gives the same splits."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    task = TASKS[name]
    examples = _examples(task)
    random.Random(seed).shuffle(examples)
    if max_examples is not None:
        examples = examples[:max_examples]
    train, validation, test = _cut(examples)
    return TaskData(name, list(task.labels), train, validation, test)


# -- framing: examples as model inputs -------------------------------------------------------------
# Encoders read a task as sequence classification; causal LMs as generation: the prompt states the
# task and the model writes the label as text ("Review: ... \nSentiment: negative").
@dataclass(frozen=True)
class Prompt:
    """How a task reads as text: an instruction, the name of the input and the name of the answer."""

    instruction: str
    input_name: str = "Input"
    answer_name: str = "Answer"


PROMPTS: dict[str, Prompt] = {
    "multiemo": Prompt("What is the sentiment of this review?", "Review", "Sentiment"),
    "multiemo-binary": Prompt("What is the sentiment of this review?", "Review", "Sentiment"),
    "strategyqa": Prompt("Answer the question.", "Question", "Answer"),
    "vitaminc": Prompt("Does the passage support the claim?", "Passage", "Answer"),
}


class ByteTokenizer:
    """UTF-8 bytes as token ids, for the tiny random models (vocabulary 256), which have no tokenizer.
    0 is padding, 1 begins and 2 ends a text; byte b is id b + 3 (UTF-8 never uses bytes 253-255)."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False, truncation: bool = False,
               max_length: int | None = None) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        if add_special_tokens:
            ids = [self.bos_token_id, *ids]
        return ids[:max_length] if truncation and max_length else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")


def _pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[value] * (width - len(r)) + r if left else r + [value] * (width - len(r))
                         for r in rows])


class ClassificationFraming:
    """Texts as token ids for a sequence-classification head: truncated to `max_length`, right-padded."""

    kind = "classification"

    def __init__(self, tokenizer, max_length: int):
        self.tok, self.max_length = tokenizer, max_length

    def batch(self, examples: list[Example]) -> dict:
        rows = [self.tok.encode(e.text, add_special_tokens=True, truncation=True, max_length=self.max_length)
                for e in examples]
        ids = _pad(rows, self.tok.pad_token_id)
        mask = _pad([[1] * len(r) for r in rows], 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e.label for e in examples])}


class GenerationFraming:
    """A classification task as text generation for a causal LM.

    The prompt is the tokenizer's chat template around "<instruction> Answer with one of: a, b.\\n\\n
    <Input name>: <text>" when the tokenizer has one, else the plain pattern "<instruction> ...\\n\\n
    <Input name>: <text>\\n<Answer name>:". The target is the label's name and the end-of-text token;
    the loss is taken on the target tokens only. The review text is cut (from its end) so that the
    prompt plus the longest target fit in `max_length` tokens; the cut never depends on the true label.
    A generation is scored by exact match with a label name after strip() and lower().
    """

    kind = "generation"
    _SLOT = "\x00TEXT\x00"

    def __init__(self, tokenizer, task: TaskData, max_length: int):
        self.tok, self.task, self.max_length = tokenizer, task, max_length
        prompt = PROMPTS.get(task.name, Prompt("Classify the input."))
        instruction = f"{prompt.instruction} Answer with one of: {', '.join(task.label_names)}."
        user = f"{instruction}\n\n{prompt.input_name}:{self._SLOT}"
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        if self.chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                                 add_generation_prompt=True, tokenize=False)
            label_prefix = ""
        else:
            text = f"{user}\n{prompt.answer_name}:"
            label_prefix = " "
        before, after = text.split(self._SLOT)
        # A chat template writes its own special tokens; the plain pattern takes the tokenizer's (bos).
        self.prefix = tokenizer.encode(before, add_special_tokens=not self.chat)
        self.suffix = tokenizer.encode(after, add_special_tokens=False)
        self.targets = [tokenizer.encode(label_prefix + name, add_special_tokens=False) + [tokenizer.eos_token_id]
                        for name in task.label_names]
        self.max_new_tokens = max(len(t) for t in self.targets)
        self.text_budget = max_length - len(self.prefix) - len(self.suffix) - self.max_new_tokens
        if self.text_budget < 1:
            raise ValueError(f"max_length={max_length} leaves no room for the text: the prompt takes "
                             f"{len(self.prefix) + len(self.suffix)} tokens and the longest label "
                             f"{self.max_new_tokens}")

    def prompt_ids(self, text: str) -> list[int]:
        # The leading space keeps the text's first word tokenised as it is inside a sentence.
        body = self.tok.encode(" " + text, add_special_tokens=False)[:self.text_budget]
        return self.prefix + body + self.suffix

    def batch(self, examples: list[Example]) -> dict:
        """Teacher-forced prompt + target for a causal LM's forward. Left-padded, so every target ends
        at the last position: `logits_to_keep` limits the LM head (a fifth of SmolLM2's compute) to the
        positions that predict a target token, and `labels` covers those positions only."""
        rows, labels = [], []
        for e in examples:
            p, t = self.prompt_ids(e.text), self.targets[e.label]
            rows.append(p + t)
            labels.append([-100] * len(p) + t)
        keep = self.max_new_tokens + 1
        batch = self._left_padded(rows)
        # Positions count real tokens only, so a padded row computes what it would alone.
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return {**batch, "labels": _pad(labels, -100, left=True)[:, -keep:], "logits_to_keep": keep}

    def prompts(self, examples: list[Example]) -> dict:
        """Prompts alone, left-padded, for `generate` (which derives positions from the mask)."""
        return self._left_padded([self.prompt_ids(e.text) for e in examples])

    def _left_padded(self, rows: list[list[int]]) -> dict:
        return {"input_ids": _pad(rows, self.tok.pad_token_id, left=True),
                "attention_mask": _pad([[1] * len(r) for r in rows], 0, left=True)}

    def parse(self, generated_ids) -> int:
        """The label index whose name the generation spells (strip, lower), or -1."""
        ids = [int(i) for i in generated_ids]
        if self.tok.eos_token_id in ids:
            ids = ids[:ids.index(self.tok.eos_token_id)]
        answer = self.tok.decode(ids, skip_special_tokens=True).strip().lower()
        names = [n.strip().lower() for n in self.task.label_names]
        return names.index(answer) if answer in names else -1
