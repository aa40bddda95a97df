"""GLUE as a dataset: each task's text columns and the split run_glue.py evaluates on
(transformers' ``examples/pytorch/text-classification/run_glue.py``)."""

from __future__ import annotations

__all__ = ["GLUE_TASK_KEYS", "GLUE_VALIDATION_SPLIT"]

# task name -> (text column, pair column or None), as run_glue.py's ``task_to_keys``.
GLUE_TASK_KEYS: dict[str, tuple[str, str | None]] = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}

# task name -> the split of the GLUE dataset that run_glue.py evaluates on (MNLI: the matched genres).
GLUE_VALIDATION_SPLIT: dict[str, str] = {
    task: "validation_matched" if task == "mnli" else "validation" for task in GLUE_TASK_KEYS
}
