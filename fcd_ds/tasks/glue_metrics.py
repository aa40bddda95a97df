"""Held-out metrics of sequence classification and regression tasks, by the GLUE convention.

As the ``glue`` metric of Hugging Face ``evaluate`` used by transformers'
``examples/pytorch/text-classification/run_glue.py``: CoLA reports Matthews correlation, STS-B Pearson
and Spearman correlation, MRPC and QQP accuracy and F1 (of class 1), the other GLUE tasks accuracy.
Tasks without a GLUE name (e.g. local CSV files) report accuracy plus F1 of class 1 when binary,
accuracy plus macro-averaged F1 when multi-class, and Pearson/Spearman when the label is a float.
All values come from scikit-learn and scipy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..data.glue import GLUE_TASK_KEYS, GLUE_VALIDATION_SPLIT
from ..errors import UsageError

__all__ = ["GLUE_TASK_KEYS", "GLUE_VALIDATION_SPLIT", "METRIC_NAMES", "compute_metrics", "metric_names"]  # the GLUE facts re-exported from fcd_ds.data.glue

METRIC_NAMES = ("accuracy", "f1", "macro_f1", "matthews_correlation", "pearson", "spearmanr")


def metric_names(task_name: str | None, is_regression: bool, num_labels: int) -> tuple[str, ...]:
    """The metrics reported for a task, GLUE convention.

    Args:
        task_name: a GLUE task (``cola``, ``mnli``, ``mrpc``, ``qnli``, ``qqp``, ``rte``, ``sst2``, ``stsb``,
            ``wnli``; any case) or ``None`` for a task from local files.
        is_regression: the label is a float (one output); used when ``task_name`` is ``None``.
        num_labels: number of classes; used when ``task_name`` is ``None`` and not regression.

    Returns:
        cola: ``("matthews_correlation",)``; stsb: ``("pearson", "spearmanr")``; mrpc, qqp:
        ``("accuracy", "f1")``; other GLUE tasks: ``("accuracy",)``. Without a task name: regression
        ``("pearson", "spearmanr")``, 2 classes ``("accuracy", "f1")``, more ``("accuracy", "macro_f1")``.

    Raises:
        UsageError: ``task_name`` is not a GLUE task, or a classification task has fewer than 2 labels.
    """
    if task_name is not None:
        task = task_name.lower()
        if task not in GLUE_TASK_KEYS:
            raise UsageError(
                f"--task_name: unknown GLUE task {task_name!r}; use one of {', '.join(GLUE_TASK_KEYS)} "
                f"(or leave it out for local files)"
            )
        if task == "cola":
            return ("matthews_correlation",)
        if task == "stsb":
            return ("pearson", "spearmanr")
        if task in ("mrpc", "qqp"):
            return ("accuracy", "f1")
        return ("accuracy",)
    if is_regression:
        return ("pearson", "spearmanr")
    if num_labels < 2:
        raise UsageError(
            f"num_labels: a classification task needs at least 2 labels, got {num_labels}; "
            f"check the label column (a float label column means regression)"
        )
    return ("accuracy", "f1") if num_labels == 2 else ("accuracy", "macro_f1")


def compute_metrics(names: Sequence[str], predictions, labels) -> dict[str, float]:
    """Compute the named metrics of predictions against labels.

    Args:
        names: metric names from :func:`metric_names` (any of ``METRIC_NAMES``).
        predictions: shape ``(n,)``; class ids (ints, e.g. ``logits.argmax(-1)``) or, for ``pearson`` and
            ``spearmanr``, floats. Array-like (list, numpy array, CPU tensor).
        labels: shape ``(n,)``; the true class ids or float targets.

    Returns:
        ``{name: value}`` as Python floats, in the order of ``names``. ``accuracy`` is the fraction of
        exact matches (``sklearn.metrics.accuracy_score``); ``f1`` the binary F1 of class 1
        (``f1_score``, default ``average="binary"``); ``macro_f1`` the unweighted mean of per-class F1
        (``average="macro"``); ``matthews_correlation`` ``matthews_corrcoef``; ``pearson`` and
        ``spearmanr`` the correlation coefficients of ``scipy.stats.pearsonr``/``spearmanr`` (NaN when
        one side is constant).

    Raises:
        ValueError: empty input, shapes that differ or are not 1-D, an unknown metric name, or ``f1``
            of labels that are not binary (from scikit-learn).
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    preds, refs = np.asarray(predictions), np.asarray(labels)
    if preds.ndim != 1 or preds.shape != refs.shape:
        raise ValueError(
            f"compute_metrics: predictions and labels must be 1-D of the same length, got shapes "
            f"{preds.shape} and {refs.shape}"
        )
    if preds.size == 0:
        raise ValueError("compute_metrics: no predictions (empty evaluation set)")
    unknown = [name for name in names if name not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"compute_metrics: unknown metric {unknown[0]!r}; use one of {', '.join(METRIC_NAMES)}")
    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            value = accuracy_score(refs, preds)
        elif name == "f1":
            value = f1_score(refs, preds)
        elif name == "macro_f1":
            value = f1_score(refs, preds, average="macro")
        elif name == "matthews_correlation":
            value = matthews_corrcoef(refs, preds)
        elif name == "pearson":
            value = pearsonr(preds.astype(np.float64), refs.astype(np.float64))[0]
        else:
            value = spearmanr(preds.astype(np.float64), refs.astype(np.float64))[0]
        out[name] = float(value)
    return out
