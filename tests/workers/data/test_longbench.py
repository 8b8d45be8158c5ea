"""LongBench from a local folder: the official JSONL fields read back, the errors (missing folder or file,
unknown and Chinese tasks, malformed lines with file:line and field), LongBench's templates and budgets, and
middle truncation in token space (head and tail kept), with the byte tokenizer and SmolLM2's chat template."""
import json

import pytest

from workers.data import longbench as lb
from workers.data.datasets import ByteTokenizer
from workers.data.haystack import encode, frame_ids
from workers.serving.codec import load_tokenizer


def record(i: int = 0, **changes) -> dict:
    """An example with every field of the official files."""
    out = {"input": f"Who wrote book {i}?", "context": f"Passage {i}: Book {i} was written by Ann.", "answers": ["Ann"],
           "length": 9, "dataset": "hotpotqa", "language": "en", "all_classes": None, "_id": f"id{i}"}
    return out | changes


def write(folder, name: str, lines) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def test_reads_the_official_fields_in_file_order_and_the_limit(tmp_path):
    write(tmp_path, "hotpotqa", [record(0), "", record(1, answers=["Ann", "Ann Lee"], length=4100)])
    write(tmp_path, "trec_e", [record(2, all_classes=["Animal", "Food"], answers=["Food"], dataset="trec_e")])
    x0, x1 = lb.load_task(tmp_path, "hotpotqa")
    assert (x0.task, x0.id, x0.input, x0.answers, x0.length, x0.all_classes, x0.line) == (
        "hotpotqa", "id0", "Who wrote book 0?", ("Ann",), 9, None, 1)
    assert x0.context == "Passage 0: Book 0 was written by Ann." and (x0.dataset, x0.language) == ("hotpotqa", "en")
    assert (x1.id, x1.answers, x1.length, x1.line) == ("id1", ("Ann", "Ann Lee"), 4100, 3)   # the blank line counted
    assert [x.id for x in lb.load_task(tmp_path, "hotpotqa", limit=1)] == ["id0"]
    [e] = lb.load_task(tmp_path, "trec", e=True)
    assert (e.id, e.all_classes, e.answers, e.dataset) == ("id2", ("Animal", "Food"), ("Food",), "trec_e")


def test_a_missing_folder_or_file_says_what_to_download(tmp_path):
    url = r"https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip"
    with pytest.raises(FileNotFoundError, match=r"LongBench folder .*/nowhere does not exist: download " + url):
        lb.load_task(tmp_path / "nowhere", "hotpotqa")
    write(tmp_path, "qasper", [record()])
    with pytest.raises(FileNotFoundError, match=r"hotpotqa.jsonl does not exist; the folder has: qasper "):
        lb.load_task(tmp_path, "hotpotqa")
    with pytest.raises(FileNotFoundError, match=r"qasper_e.jsonl does not exist"):
        lb.load_task(tmp_path, "qasper", e=True)


def test_unknown_and_chinese_tasks_are_refused_with_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown LongBench task 'hotpot'; valid: narrativeqa, qasper, "
                                         "multifieldqa_en, hotpotqa, .*, lcc, repobench-p$"):
        lb.load_task(tmp_path, "hotpot")
    with pytest.raises(ValueError, match="unknown LongBench-E task 'musique'; valid: qasper, "):
        lb.load_task(tmp_path, "musique", e=True)   # in v1, not in LongBench-E
    with pytest.raises(ValueError, match=r"Chinese LongBench task 'dureader' is not supported \(its metrics need jieba "
                                         r"word segmentation; unsupported: multifieldqa_zh, dureader, vcsum, lsht, "
                                         r"passage_retrieval_zh\); English tasks: narrativeqa"):
        lb.load_task(tmp_path, "dureader")


@pytest.mark.parametrize("line, message", [
    ('{"input": "q"', r"hotpotqa.jsonl:2: not valid JSON"),
    (json.dumps({k: v for k, v in record().items() if k != "answers"}), r"hotpotqa.jsonl:2: missing field 'answers'"),
    (json.dumps({k: v for k, v in record().items() if k != "_id"}), r"hotpotqa.jsonl:2: missing field '_id'"),
    (json.dumps(record(length="9")), r"hotpotqa.jsonl:2: field 'length' has the wrong type \(str\)"),
    (json.dumps(record(answers="Ann")), r"hotpotqa.jsonl:2: field 'answers' has the wrong type \(str\)"),
    (json.dumps(record(answers=[])), r"hotpotqa.jsonl:2: field 'answers' must be a non-empty list of strings"),
    ("[1, 2]", r"hotpotqa.jsonl:2: expected a JSON object, got list"),
])
def test_a_malformed_line_names_file_line_and_field(tmp_path, line, message):
    write(tmp_path, "hotpotqa", [record(0), line, record(2)])
    with pytest.raises(ValueError, match=message):
        lb.load_task(tmp_path, "hotpotqa")


def test_trec_needs_its_classes_and_an_empty_file_is_an_error(tmp_path):
    write(tmp_path, "trec", [record(all_classes=None)])
    with pytest.raises(ValueError, match=r"trec.jsonl:1: field 'all_classes' must list the classes"):
        lb.load_task(tmp_path, "trec")
    write(tmp_path, "qasper", [""])
    with pytest.raises(ValueError, match="qasper.jsonl holds no examples"):
        lb.load_task(tmp_path, "qasper")


def test_templates_and_budgets_are_longbenchs():
    assert len(lb.TASKS) == 16 and set(lb.E_TASKS) <= set(lb.TASKS)
    assert set(lb.PROMPTS) == set(lb.MAX_NEW_TOKENS) == set(lb.TASKS)
    assert (lb.MAX_NEW_TOKENS["hotpotqa"], lb.MAX_NEW_TOKENS["gov_report"], lb.MAX_NEW_TOKENS["lcc"]) == (32, 512, 64)
    x = lb.Example("hotpotqa", "a", "Who?", "P1 {braces} stay", ("Ann",), 3, None, "hotpotqa", "en", 1)
    text = lb.prompt_text(x)
    assert text.startswith("Answer the question based on the given passages. Only give me the answer")
    assert "The following are given passages.\nP1 {braces} stay\n\n" in text
    assert text.endswith("Question: Who?\nAnswer:")
    lcc = lb.Example("lcc", "b", "", "def f():\n", ("    pass",), 2, None, "lcc", "python", 1)
    assert lb.prompt_text(lcc) == "Please complete the code given below. \ndef f():\nNext line of code:\n"


def test_truncate_middle_keeps_head_and_tail():
    ids = list(range(10))
    assert lb.truncate_middle(ids, 5) == [0, 1, 7, 8, 9]        # 5 // 2 from the head, the other 3 from the tail
    assert lb.truncate_middle(ids, 4) == [0, 1, 8, 9]
    assert lb.truncate_middle(ids, 10) == ids and lb.truncate_middle(ids, 50) == ids
    with pytest.raises(ValueError, match="budget must be >= 2"):
        lb.truncate_middle(ids, 1)


def test_a_long_prompt_loses_its_middle_to_exactly_the_budget():
    tok = ByteTokenizer()   # one token per byte: positions are easy to check
    x = lb.Example("hotpotqa", "a", "Who wrote it?", "M" * 5000, ("Ann",), 5000, None, "hotpotqa", "en", 1)
    p = lb.build_prompt(tok, x, max_length=300)
    full = encode(tok, lb.prompt_text(x))
    assert p.full_tokens == len(full) > 5000 and p.truncated and len(p.prompt) == 300   # no chat template: no frame
    assert list(p.prompt) == full[:150] + full[-150:]
    text = tok.decode(p.prompt)
    assert text.startswith("Answer the question based on") and text.endswith("Question: Who wrote it?\nAnswer:")
    assert p.max_tokens == 32 and lb.build_prompt(tok, x, 300, max_tokens=7).max_tokens == 7
    short = lb.build_prompt(tok, x, max_length=6000)
    assert not short.truncated and list(short.prompt) == full


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer("smollm2-135m")


def test_the_chat_template_wraps_all_but_the_few_shot_and_code_tasks(smol):
    before, after = frame_ids(smol, "")
    assert before and after
    qa = lb.Example("hotpotqa", "a", "Who?", "Ann wrote it. " * 400, ("Ann",), 1200, None, "hotpotqa", "en", 1)
    p = lb.build_prompt(smol, qa, max_length=256)
    assert len(p.prompt) == len(before) + 256 + len(after) and p.truncated
    assert list(p.prompt[:len(before)]) == before and list(p.prompt[-len(after):]) == after
    assert smol.decode(p.prompt[len(before):-len(after)]).endswith("Question: Who?\nAnswer:")
    trec = lb.Example("trec", "b", "What is a fox?\nType:", "Question: What is a dog?\nType: Animal\n", ("Animal",), 8,
                      ("Animal", "Food"), "trec", "en", 1)
    t = lb.build_prompt(smol, trec, max_length=256)
    assert list(t.prompt) == encode(smol, lb.prompt_text(trec)) and not t.truncated   # plain: no chat frame
