"""The task registry: a new task is one registered class, used end to end by the loaders' targets,
the training loss and the evaluation's scorer; the names match what the manifest reader accepts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.data.manifest import TASKS as MANIFEST_TASKS
from pipeline.evaluation import _Scorer
from pipeline.tasks import TASKS, Task, task_of
from pipeline.train.trainer import task_loss

from shard_fixtures import tiny_config


class TopTwo(Task):
    """A test-only task: classification scored by top-2 accuracy."""

    name = "top2_classification"
    best_metric = "top2"
    sum_keys = ("seen",)

    def target(self, sample, meta, max_length):
        return int(sample["cls"])

    def loss(self, outputs, targets, reduction="mean"):
        return F.cross_entropy(outputs.float(), targets, reduction=reduction)

    def score(self, outputs, targets, boxes, metas):
        hits = (outputs.topk(2, -1).indices == targets[:, None]).any(-1).sum()
        return {"loss": self.loss(outputs, targets, "sum"), "correct": hits, "seen": len(targets)}

    def metrics(self, sums, count):
        return {"top2": sums["correct"] / count}


@pytest.fixture
def top_two():
    TASKS.register(TopTwo)
    yield task_of("top2_classification")
    TASKS.unregister("top2_classification")


def test_the_registry_names_the_manifest_tasks():
    assert TASKS.names() == MANIFEST_TASKS


@pytest.mark.parametrize("name", MANIFEST_TASKS)
def test_each_task_reports_its_best_metric(name):
    task = task_of(name)
    sums = dict.fromkeys(("count", "skipped", "loss", "correct", *task.sum_keys), 0.0)
    assert task.best_metric in task.metrics(sums, 1.0)


def test_an_unknown_task_names_the_choices():
    with pytest.raises(ValueError, match="unknown task 'regression'; expected one of classification, sequence, "
                                         "colocalisation$"):
        task_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), "regression")


def test_sequence_loss_sums_what_training_averages():
    logits, targets = torch.randn(4, 5, 11), torch.randint(0, 11, (4, 5))
    task = task_of("sequence")
    torch.testing.assert_close(task.loss(logits, targets, "sum") / 4, task_loss(logits, targets, "sequence"))
    torch.testing.assert_close(task_loss(logits, targets, "sequence"),
                               F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def test_a_new_task_is_one_class_end_to_end(top_two):
    from pipeline.data.loaders import _Decode

    assert _Decode(tiny_config(), "top2_classification", 5)._target({"cls": b"2"}, {}) == 2
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    targets = torch.tensor([0, 1, 2])
    torch.testing.assert_close(task_loss(logits, targets, "top2_classification"), F.cross_entropy(logits, targets))
    scorer = _Scorer("top2_classification", 0, [])
    scorer.add_batch(logits, targets, None, [{}] * 3)
    result = scorer.result()
    assert result["top2"] == pytest.approx(2 / 3) and scorer.sums.values["seen"] == 3
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, targets).item())
    assert top_two.best_metric in result


def test_each_task_says_what_predict_reports_of_one_output():
    from pipeline.metrics import PAD_DIGIT

    logits = torch.tensor([0.1, 3.0, 2.0, -1.0])
    top = task_of("classification").prediction(logits, ["a", "b", "c"], top_k=2)["top"]
    assert [t["class"] for t in top] == ["b", "c"] and [t["index"] for t in top] == [1, 2]
    assert top[0]["prob"] == round(float(logits.softmax(-1)[1]), 4)
    unnamed = task_of("classification").prediction(logits, ["a"], top_k=4)["top"]  # more classes than names
    assert [t["class"] for t in unnamed] == ["1", "2", "a", "3"]
    positions = torch.full((4, 11), -5.0)
    for position, digit in enumerate([4, 2, PAD_DIGIT, 7]):  # PAD_DIGIT ends the number
        positions[position, digit] = 5.0
    assert task_of("sequence").prediction(positions, [], top_k=5) == {"digits": [4, 2], "number": "42"}
    with pytest.raises(ValueError, match="colocalisation"):
        task_of("colocalisation").prediction(logits, [], top_k=5)
