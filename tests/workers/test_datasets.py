"""BIG-bench tasks read offline from the sdist: labels, deterministic disjoint splits."""
import pytest

from workers.datasets import TASKS, load_task


def test_multiemo_has_four_labels_and_clean_splits():
    t = load_task("multiemo")
    assert t.label_names == ["negative", "neutral", "positive", "ambivalent"]
    assert len(t.train) + len(t.validation) + len(t.test) == 8215
    assert len(t.validation) == len(t.test) == 821
    texts = [{e.text for e in split} for split in (t.train, t.validation, t.test)]
    assert not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert {e.label for e in t.train} == {0, 1, 2, 3}
    assert load_task("multiemo").test == t.test
    assert load_task("multiemo", seed=1).test != t.test


def test_binary_multiemo_drops_neutral_and_ambivalent():
    t = load_task("multiemo-binary")
    assert t.num_labels == 2 and {e.label for e in t.train} == {0, 1}
    assert 5000 < len(t.train) + len(t.validation) + len(t.test) < 8215
    pos = next(e for e in t.train if e.label == 1)
    assert pos.text


@pytest.mark.parametrize("name,labels", [("strategyqa", ["No", "Yes"]),
                                         ("vitaminc", ["False", "True", "Neither"])])
def test_other_tasks(name, labels):
    t = load_task(name, max_examples=500)
    assert t.label_names == labels
    assert len(t.train) == 400 and {e.label for e in t.train} == set(range(len(labels)))


def test_unknown_task_lists_the_choices():
    with pytest.raises(ValueError) as e:
        load_task("sst2")
    assert all(n in str(e.value) for n in TASKS)
