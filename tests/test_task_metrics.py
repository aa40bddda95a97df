"""fcd_ds.tasks.glue_metrics: GLUE-convention metric names and values checked against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fcd_ds.errors import UsageError
from fcd_ds.tasks.glue_metrics import GLUE_TASK_KEYS, GLUE_VALIDATION_SPLIT, compute_metrics, metric_names

# Binary set, 10 examples. Per position: TP TN FN TP TN TP FP TN TP FN
LABELS = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1]
PREDS = [1, 0, 0, 1, 0, 1, 1, 0, 1, 0]
TP, TN, FP, FN = 4, 3, 1, 2
ACCURACY = 7 / 10  # (TP + TN) / 10
F1 = 8 / 11  # 2TP / (2TP + FP + FN) = 8 / (8 + 1 + 2); precision 4/5, recall 4/6
# (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (12 - 2) / sqrt(5*6*4*5) = 10 / sqrt(600) = 1/sqrt(6)
MCC = 1 / math.sqrt(6)
# F1 of class 0: 2TN / (2TN + FN + FP) = 6/9; class 1: 8/11; mean = (2/3 + 8/11) / 2 = 23/33
BINARY_MACRO_F1 = 23 / 33

# 3 classes, 10 examples.
LABELS3 = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
PREDS3 = [0, 0, 1, 1, 1, 2, 2, 2, 0, 2]
# correct: positions 0 1 3 4 6 7 9 -> 7/10
# class 0: TP 2 (pos 0,1), FP 1 (pos 8), FN 1 (pos 2) -> F1 4/6 = 2/3
# class 1: TP 2 (pos 3,4), FP 1 (pos 2), FN 1 (pos 5) -> 2/3
# class 2: TP 3 (pos 6,7,9), FP 1 (pos 5), FN 1 (pos 8) -> 6/8 = 3/4
MACRO_F1 = (2 / 3 + 2 / 3 + 3 / 4) / 3  # = 25/36

# Regression, 10 examples without ties. Ranks of PRED_REG: 1 2 4 3 5 6 7 9 8 10 (labels: 1..10),
# rank differences d = 0 0 1 -1 0 0 0 1 -1 0, sum d^2 = 4 -> Spearman 1 - 6*4 / (10*(100-1)) = 161/165
LABELS_REG = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
PREDS_REG = [1.2, 1.9, 3.5, 3.1, 5.0, 6.4, 6.9, 8.8, 8.1, 10.0]
SPEARMAN = 161 / 165


def _pearson_by_formula(x, y) -> float:
    """sum((x - mean x)(y - mean y)) / sqrt(sum (x - mean x)^2 * sum (y - mean y)^2)."""
    dx, dy = np.asarray(x) - np.mean(x), np.asarray(y) - np.mean(y)
    return float(np.sum(dx * dy) / np.sqrt(np.sum(dx**2) * np.sum(dy**2)))


def test_confusion_counts_as_commented():
    pairs = list(zip(LABELS, PREDS))
    assert (pairs.count((1, 1)), pairs.count((0, 0)), pairs.count((0, 1)), pairs.count((1, 0))) == (TP, TN, FP, FN)


def test_binary_metrics_match_hand_values():
    got = compute_metrics(("accuracy", "f1", "matthews_correlation", "macro_f1"), PREDS, LABELS)
    assert list(got) == ["accuracy", "f1", "matthews_correlation", "macro_f1"]
    assert all(type(v) is float for v in got.values())
    assert got["accuracy"] == pytest.approx(ACCURACY, abs=1e-12)
    assert got["f1"] == pytest.approx(F1, abs=1e-12)
    assert got["matthews_correlation"] == pytest.approx(MCC, abs=1e-12)
    assert got["macro_f1"] == pytest.approx(BINARY_MACRO_F1, abs=1e-12)


def test_multiclass_metrics_match_hand_values():
    got = compute_metrics(("accuracy", "macro_f1"), np.array(PREDS3), np.array(LABELS3))
    assert got == pytest.approx({"accuracy": 0.7, "macro_f1": MACRO_F1}, abs=1e-12)
    assert MACRO_F1 == pytest.approx(25 / 36)


def test_regression_metrics_match_hand_values():
    got = compute_metrics(("pearson", "spearmanr"), np.array(PREDS_REG, dtype=np.float32), LABELS_REG)
    assert got["pearson"] == pytest.approx(_pearson_by_formula(PREDS_REG, LABELS_REG), abs=1e-6)
    assert got["spearmanr"] == pytest.approx(SPEARMAN, abs=1e-12)
    assert all(type(v) is float for v in got.values())


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    got = compute_metrics(("accuracy",), torch.tensor(PREDS), torch.tensor(LABELS))
    assert got == {"accuracy": pytest.approx(ACCURACY)}


@pytest.mark.parametrize(
    "preds,labels,match",
    [([], [], "empty"), ([0, 1], [0], "same length"), ([[0, 1]], [[0, 1]], "1-D")],
)
def test_bad_input_raises_value_error(preds, labels, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(("accuracy",), preds, labels)


def test_unknown_metric_raises():
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        compute_metrics(("accuracy", "bleu"), PREDS, LABELS)


@pytest.mark.parametrize(
    "task,expected",
    [
        ("cola", ("matthews_correlation",)),
        ("stsb", ("pearson", "spearmanr")),
        ("mrpc", ("accuracy", "f1")),
        ("qqp", ("accuracy", "f1")),
        ("sst2", ("accuracy",)),
        ("mnli", ("accuracy",)),
        ("qnli", ("accuracy",)),
        ("rte", ("accuracy",)),
        ("wnli", ("accuracy",)),
        ("SST2", ("accuracy",)),
    ],
)
def test_metric_names_for_glue_tasks(task, expected):
    num_labels = 1 if task == "stsb" else 3 if task == "mnli" else 2
    assert metric_names(task, is_regression=task == "stsb", num_labels=num_labels) == expected


def test_metric_names_without_task():
    assert metric_names(None, is_regression=False, num_labels=2) == ("accuracy", "f1")
    assert metric_names(None, is_regression=False, num_labels=5) == ("accuracy", "macro_f1")
    assert metric_names(None, is_regression=True, num_labels=1) == ("pearson", "spearmanr")
    with pytest.raises(UsageError, match="num_labels"):
        metric_names(None, is_regression=False, num_labels=1)


def test_unknown_task_is_a_usage_error():
    with pytest.raises(UsageError, match=r"^--task_name: .*one of cola, mnli, mrpc, qnli, qqp, rte, sst2, stsb, wnli"):
        metric_names("imdb", is_regression=False, num_labels=2)


def test_glue_keys_and_splits():
    assert sorted(GLUE_TASK_KEYS) == ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli"]
    assert GLUE_TASK_KEYS["cola"] == ("sentence", None) and GLUE_TASK_KEYS["sst2"] == ("sentence", None)
    assert GLUE_TASK_KEYS["mnli"] == ("premise", "hypothesis")
    assert GLUE_TASK_KEYS["qnli"] == ("question", "sentence")
    assert GLUE_TASK_KEYS["qqp"] == ("question1", "question2")
    for task in ("mrpc", "rte", "stsb", "wnli"):
        assert GLUE_TASK_KEYS[task] == ("sentence1", "sentence2")
    assert GLUE_VALIDATION_SPLIT["mnli"] == "validation_matched"
    assert {GLUE_VALIDATION_SPLIT[t] for t in GLUE_TASK_KEYS if t != "mnli"} == {"validation"}
