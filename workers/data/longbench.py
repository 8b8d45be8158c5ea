"""LongBench (THUDM/LongBench, v1 and LongBench-E) read from a local folder of the official JSONL files, and
its prompts built as LongBench's pred.py builds them (plain Python: no Ray, no MLflow, nothing downloaded).

The folder is the official data.zip unpacked: `<task>.jsonl` (v1) and `<task>_e.jsonl` (LongBench-E), one
example per line with `input`, `context`, `answers` (list), `length`, `all_classes` (list or null), `_id`
(and `dataset`, `language`). English tasks only: the Chinese ones are scored on jieba word segmentation,
which sparta does not install.

    examples = load_task(folder, "hotpotqa", limit=20)
    prompt = build_prompt(tokenizer, examples[0], max_length=3500)   # token ids, middle truncated
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from workers.data.haystack import encode, frame_ids

# LongBench's config/dataset2prompt.json (English tasks), verbatim: the published scores use these, so
# their quirks stay ("asconcisely" in narrativeqa, the leading space in qasper's second paragraph).
PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
                   "question asconcisely as you can, using a single phrase if possible. Do not provide any "
                   "explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as "
                   "you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: "
                   "{input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using "
              "a single phrase or sentence if possible. If the question cannot be answered based on the information "
              "in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", "
              "or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question "
              "based on the above article as concisely as you can, using a single phrase or sentence if possible. If "
              "the question cannot be answered based on the information in the article, write \"unanswerable\". If "
              "the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any "
              "explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
                       "based on the above text, only give me the answer and do not output any other words.\n\n"
                       "Question: {input}\nAnswer:",
    **{task: "Answer the question based on the given passages. Only give me the answer and do not output any other "
             "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given "
             "passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
       for task in ("hotpotqa", "2wikimqa", "musique")},
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
                  "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
             "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
             "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
                  "Now, write a one-page summary of all the news.\n\nSummary:",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n"
            "{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other "
                "words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n"
              "{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
                     "carefully read these paragraphs and determine how many unique paragraphs there are after "
                     "removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n"
                     "{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The "
                     "output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer "
                     "is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
                            "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}"
                            "\n\nPlease enter the number of the paragraph that the abstract is from. The answer format "
                            "must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
# LongBench's config/dataset2maxlen.json: the answer budget per task, in tokens.
MAX_NEW_TOKENS = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32,
                  "musique": 32, "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32,
                  "samsum": 128, "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64}
TASKS = tuple(PROMPTS)   # the English LongBench v1 tasks, in LongBench's order
CHINESE_TASKS = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")
E_TASKS = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
           "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")
# Few-shot and code-completion prompts go to the model as they are: LongBench wraps only the others in
# the chat template ("chat models are better off without" it on these).
PLAIN_TASKS = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")
DATA_URL = "https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip"
_REQUIRED = {"input": str, "context": str, "answers": list, "length": int, "all_classes": (list, type(None)),
             "_id": str}


@dataclass(frozen=True)
class Example:
    """One LongBench example; `line` is its 1-based line in `<task>[_e].jsonl`."""

    task: str
    id: str
    input: str
    context: str
    answers: tuple[str, ...]
    length: int                          # LongBench's length of the context (words; characters for Chinese)
    all_classes: tuple[str, ...] | None  # the label set of the classification tasks
    dataset: str
    language: str
    line: int


@dataclass(frozen=True)
class Prompt:
    """An example's prompt as token ids (what the model reads), and its answer budget."""

    example: Example
    prompt: tuple[int, ...]
    full_tokens: int       # the formatted prompt's tokens before middle truncation (chat frame excluded)
    max_tokens: int

    @property
    def truncated(self) -> bool:
        return self.full_tokens > len(self.prompt)


def check_task(task: str, e: bool = False) -> None:
    """ValueError for a task this module cannot evaluate, naming the valid ones."""
    valid = E_TASKS if e else TASKS
    if task in CHINESE_TASKS:
        raise ValueError(f"Chinese LongBench task {task!r} is not supported (its metrics need jieba word "
                         f"segmentation; unsupported: {', '.join(CHINESE_TASKS)}); English tasks: {', '.join(valid)}")
    if task not in valid:
        what = "LongBench-E task" if e else "LongBench task"
        raise ValueError(f"unknown {what} {task!r}; valid: {', '.join(valid)}")


def task_file(folder: str | Path, task: str, e: bool = False) -> Path:
    """The JSONL file of `task` in `folder`; FileNotFoundError saying what to download when it is not there."""
    check_task(task, e)
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"LongBench folder {folder} does not exist: download {DATA_URL} and unzip it "
                                "(it holds data/<task>.jsonl)")
    path = folder / f"{task}{'_e' if e else ''}.jsonl"
    if not path.is_file():
        present = sorted(p.stem for p in folder.glob("*.jsonl"))
        raise FileNotFoundError(f"{path} does not exist; the folder has: {', '.join(present) or 'no .jsonl files'} "
                                f"(the official files unpack from {DATA_URL})")
    return path


def _example(task: str, path: Path, n: int, line: str) -> Example:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
    for name, kind in _REQUIRED.items():
        if name not in obj:
            raise ValueError(f"{path}:{n}: missing field {name!r}")
        if isinstance(obj[name], bool) or not isinstance(obj[name], kind):
            raise ValueError(f"{path}:{n}: field {name!r} has the wrong type ({type(obj[name]).__name__})")
    answers, classes = obj["answers"], obj["all_classes"]
    if not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{path}:{n}: field 'answers' must be a non-empty list of strings")
    if classes is not None and not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{path}:{n}: field 'all_classes' must be a list of strings or null")
    if task == "trec" and not classes:
        raise ValueError(f"{path}:{n}: field 'all_classes' must list the classes (trec is scored on them)")
    return Example(task, obj["_id"], obj["input"], obj["context"], tuple(answers), obj["length"],
                   None if classes is None else tuple(classes), str(obj.get("dataset", task)),
                   str(obj.get("language", "en")), n)


def load_task(folder: str | Path, task: str, e: bool = False, limit: int | None = None) -> list[Example]:
    """The first `limit` examples (all when None) of `task` in file order; ValueError naming file:line for a
    malformed line."""
    path = task_file(folder, task, e)
    out: list[Example] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if line.strip():
                out.append(_example(task, path, n, line))
    if not out:
        raise ValueError(f"{path} holds no examples")
    return out


def prompt_text(example: Example) -> str:
    """LongBench's prompt for the example, before truncation and the chat template."""
    return PROMPTS[example.task].format(context=example.context, input=example.input)


def truncate_middle(ids: list[int], budget: int) -> list[int]:
    """`ids` cut to `budget` tokens by dropping the middle (LongBench's rule: the instructions sit at both
    ends): the first budget//2 and the last budget - budget//2 tokens."""
    if budget < 2:
        raise ValueError(f"the token budget must be >= 2, got {budget}")
    if len(ids) <= budget:
        return list(ids)
    head = budget // 2
    return list(ids[:head]) + list(ids[len(ids) - (budget - head):])


def build_prompt(tokenizer, example: Example, max_length: int, max_tokens: int | None = None) -> Prompt:
    """The prompt's token ids: LongBench's template, its middle dropped beyond `max_length` tokens, then the
    tokenizer's chat template around it (when it has one) except on PLAIN_TASKS. Built in token space (LongBench
    decodes the two halves and re-tokenizes), so the length is exact. `max_tokens`: the answer budget
    (default: LongBench's for the task)."""
    ids = encode(tokenizer, prompt_text(example))
    body = truncate_middle(ids, max_length)
    if example.task not in PLAIN_TASKS:
        before, after = frame_ids(tokenizer, "")
        body = before + body + after
    return Prompt(example, tuple(body), len(ids), max_tokens or MAX_NEW_TOKENS[example.task])
