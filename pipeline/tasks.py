"""Tasks: one class per task a model can learn, registered in `TASKS`.

    task = task_of(model.task)              # "classification", "sequence" or "colocalisation"
    loss = task.loss(outputs, targets)      # the training loss (the batch mean)

A task owns what differs between tasks: the target read from a sample (the loaders), the loss
(training takes its batch mean, the evaluation its batch sum), the evaluation's sums and metrics,
and the metric whose increase makes a checkpoint the best one. A model names its task in its
`task` attribute and a manifest in its "task" key; the trainer, the evaluation and the loaders
ask the task. A new task is one registered subclass (tests/test_tasks.py adds one end to end);
its name must also be one the manifest reader accepts (`data_prep.contract.TASKS`, with the sample fields it requires).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from data_prep.registry import Registry
from pipeline.data.augment import View
from pipeline.data.decode import classification_target, sequence_target
from pipeline.data.manifest import DataError
from pipeline.metrics import PAD_DIGIT, box_iou, sequence_correct, top1_correct


class Task:
    """One task. Subclasses set `name`, `best_metric` and `sum_keys` and implement the methods."""

    name: str = ""
    best_metric: str = ""           # the metric (a key of `metrics`) whose increase makes a checkpoint the best
    sum_keys: Tuple[str, ...] = ()  # the evaluation's own sums, besides count, skipped, loss and correct
    classifies = False              # the model's output is class logits (B, C): its argmax names a class

    def target(self, sample: Dict[str, Any], meta: Dict[str, Any], max_length: int):
        """The training target of one decoded sample (its files and its parsed json `meta`)."""
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The batch's loss: `mean` (training) or `sum` (the evaluation adds batches up) over its samples."""
        raise NotImplementedError

    def score(self, outputs: torch.Tensor, targets: torch.Tensor, boxes, metas: List[dict]) -> Dict[str, Any]:
        """The batch's contribution to the evaluation sums: `loss`, `correct` and the task's `sum_keys`."""
        raise NotImplementedError

    def metrics(self, sums: Dict[str, float], count: float) -> Dict[str, float]:
        """The task's metrics from the summed values over `count` samples (at least 1)."""
        raise NotImplementedError

    def prediction(self, output: torch.Tensor, names: List[str], top_k: int) -> Dict[str, Any]:
        """What `python -m pipeline.predict` reports of one image's output (`names`: the class names)."""
        raise ValueError(f"task {self.name}: its models' outputs are not predictions")


TASKS: Registry[Task] = Registry("task")


def task_of(name: str) -> Task:
    """The registered task called `name`; a ValueError naming the known tasks otherwise."""
    return TASKS.get(name)


class _CrossEntropy(Task):
    """Cross-entropy over class logits; a sample's loss is the mean over its positions."""

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        total = F.cross_entropy(outputs.float().flatten(0, -2), targets.flatten(), reduction=reduction)
        return total if reduction == "mean" else total / targets[0].numel()


@TASKS.register
class Classification(_CrossEntropy):
    """Logits (B, C) against the 0-based class; top-1 accuracy."""

    name = "classification"
    best_metric = "top1"
    classifies = True

    def target(self, sample, meta, max_length):
        return classification_target(sample, meta)

    def score(self, outputs, targets, boxes, metas):
        return {"loss": self.loss(outputs, targets, "sum"), "correct": top1_correct(outputs, targets)}

    def metrics(self, sums, count):
        return {"top1": sums["correct"] / count}

    def prediction(self, output, names, top_k):
        probs = output.float().softmax(-1)
        top = probs.topk(min(top_k, len(probs)))
        return {"top": [{"class": names[i] if i < len(names) else str(i), "index": i, "prob": round(float(p), 4)}
                        for p, i in zip(top.values.tolist(), top.indices.tolist())]}


@TASKS.register
class Sequence(_CrossEntropy):
    """Logits (B, L, 11) against L digits padded with PAD_DIGIT (SVHN, paper A.4); every position counts."""

    name = "sequence"
    best_metric = "sequence_accuracy"
    sum_keys = ("digits", "digits_correct")

    def target(self, sample, meta, max_length):
        return sequence_target(meta, max_length)

    def score(self, outputs, targets, boxes, metas):
        digits_ok, digits, seq_ok = sequence_correct(outputs, targets)
        return {"loss": self.loss(outputs, targets, "sum"), "digits_correct": digits_ok, "digits": digits,
                "correct": seq_ok}

    def metrics(self, sums, count):
        accuracy = sums["correct"] / count
        return {"digit_accuracy": sums["digits_correct"] / max(sums["digits"], 1.0),
                "sequence_accuracy": accuracy, "sequence_error": 1.0 - accuracy}

    def prediction(self, output, names, top_k):
        digits = output.argmax(-1).tolist()  # (positions, digit classes): PAD_DIGIT ends the number
        digits = digits[:digits.index(PAD_DIGIT)] if PAD_DIGIT in digits else digits
        return {"digits": digits, "number": "".join(map(str, digits))}


@TASKS.register
class Colocalisation(Task):
    """The model returns each image's own loss (B,) (its triplet hinge, no targets); scored by the
    share of images whose crop overlaps the object's json bbox with IoU > `iou_localised` (paper Table 5)."""

    name = "colocalisation"
    best_metric = "iou50"
    sum_keys = ("iou",)
    iou_localised = 0.5  # a crop whose IoU with the object's box exceeds this localises it

    def target(self, sample, meta, max_length):
        # the target is the class (`cls`), as for classification; the boxes are read by the evaluation only
        return classification_target(sample, meta)

    def loss(self, outputs, targets, reduction="mean"):
        return outputs.float().mean() if reduction == "mean" else outputs.float().sum()

    def score(self, outputs, targets, boxes, metas):
        iou = box_iou(boxes[:, 0].double().cpu(), meta_boxes(metas))
        return {"loss": self.loss(outputs, targets, "sum"), "correct": (iou > self.iou_localised).sum(),
                "iou": iou.sum()}

    def metrics(self, sums, count):
        return {"iou50": sums["correct"] / count, "mean_iou": sums["iou"] / count}


def meta_boxes(metas: List[dict]) -> torch.Tensor:
    """(B, 4) [x0, y0, x1, y1] in [-1, 1] input coordinates of each sample's json bbox [x, y, w, h] (pixels)."""
    boxes = np.zeros((len(metas), 4))
    for i, meta in enumerate(metas):
        if meta.get("bbox") is None:
            raise DataError(f"shard {meta.get('shard')} key {meta.get('key')}: no json bbox to score the localisation against")
        x, y, w, h = meta["bbox"]
        boxes[i] = View(*meta["view"]).to_normalized([[x, y], [x + w, y + h]]).reshape(4)
    return torch.from_numpy(boxes)
