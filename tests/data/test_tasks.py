import pytest

from slimtune.data.tasks import TASKS, bleu, exact_or_contains, first_number_exact


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_loads_offline_with_fixed_split(name):
    task = TASKS[name]
    train, evald = task.load(0)
    assert len(train) > 200 and len(evald) >= 150
    assert all(set(r) == {"instruction", "input", "output"} and r["output"] for r in train[:50] + evald[:50])
    again = task.load(0)
    assert again == (train, evald)
    if name != "trivia":  # trivia is a recall task: its eval questions are the trained ones (documented)
        assert not {(r["instruction"], r["input"]) for r in evald} & {
            (r["instruction"], r["input"]) for r in train
        }
        assert task.load(1)[1] != evald


def test_sentiment_labels_balanced_enough():
    train, evald = TASKS["sentiment"].load(0)
    share = sum(r["output"] == "positive" for r in evald) / len(evald)
    assert 0.45 < share < 0.65 and len(train) > 10000


def test_metrics():
    assert exact_or_contains(["The answer is Paris."], ["paris"]) == {"contains": 1.0, "exact_match": 0.0}
    assert first_number_exact(["1,234 apples", "x"], ["1234", "5"]) == {"exact_match": 0.5}
    assert bleu(["Das ist ein gutes Beispiel\nextra"], ["Das ist ein gutes Beispiel"])[
        "bleu"
    ] == pytest.approx(100.0)
