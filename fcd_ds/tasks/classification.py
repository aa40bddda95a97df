"""Sequence classification and regression, single sentences or pairs, in the format of transformers'
``examples/pytorch/text-classification/run_glue.py``: csv / tsv / json / jsonl / parquet files (or
:mod:`fcd_ds.data.sources`' other forms) with a text column, an optional pair column and a label column,
or a dataset with ``--dataset_name`` (+ ``--task_name`` for GLUE).

Labels: strings (e.g. ``fresh`` / ``rotten``) or integers are classes, named by their own values
(sorted), which become the exported model's ``id2label`` / ``label2id``; floats that are not all
integers make a regression task (one output, MSE), as ``run_glue.py`` decides from the label dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from ..data import pad_rows
from ..errors import UsageError
from ..losses import logit_kd_loss
from .glue_metrics import GLUE_TASK_KEYS, compute_metrics, metric_names

__all__ = ["LabelSpec", "read_label_spec", "load_raw", "SequenceClassificationTask"]


@dataclass(frozen=True)
class LabelSpec:
    """The label set read from the training data: class names (id order) or regression."""

    names: tuple[str, ...]  # empty for regression
    is_regression: bool

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.names)


def load_raw(data_args):
    """``datasets.DatasetDict`` with ``train`` and ``validation`` splits, from files in any format of
    :mod:`fcd_ds.data.sources` (csv / tsv / json / jsonl / parquet, several or a glob, a save_to_disk
    folder) or ``--dataset_name`` (a GLUE ``--task_name`` is its config, mnli's held-out split
    ``validation_matched``). Without held-out data the last ``validation_split_percentage`` percent of
    train rows are held out.

    Raises:
        UsageError: as :func:`~fcd_ds.data.sources.load_split`; a .txt file (no label column).
    """
    from datasets import DatasetDict

    from ..data.sources import load_split, resolve_source

    splits = {}
    for which in ("train", "validation"):
        source = resolve_source(data_args, which)
        if source is not None and source.builder == "text":
            raise UsageError(f"{source.flag}: {source.described} is plain text, without a label column; pass csv, tsv, json, jsonl "
                             "or parquet files with text and label columns, as run_glue.py expects")
        ds = load_split(source, data_args)[0] if source is not None else None
        if which == "train" and ds is None:
            raise UsageError(f"{source.flag}: {source.described} has no split {source.split!r}; pass --train_split")
        if ds is not None:
            splits[which] = ds
    if "validation" not in splits:
        split = splits["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, shuffle=False)
        splits = {"train": split["train"], "validation": split["test"]}
    return DatasetDict(splits)


def text_columns(data_args) -> tuple[str, str | None]:
    """``(text, pair)`` columns: the flags, or run_glue's ``task_to_keys`` for a GLUE ``--task_name``."""
    if data_args.task_name is not None and data_args.text_column is None:
        return GLUE_TASK_KEYS[data_args.task_name]
    return data_args.text_column or "text", data_args.text_pair_column


def label_name(value) -> str:
    """A label's class name: integral floats as integers (a CSV column of 0/1 read as float64 because of
    a missing cell elsewhere names its classes ``0`` and ``1``, as the same column read as int64)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _check_cells(ds, split: str, text_columns: list, label: tuple) -> None:
    """Refuse empty cells (null, or an empty or blank text) in the text columns and null labels, with
    their count and the first row. Reads the Arrow columns (no Python rows).

    Raises:
        UsageError: names the flag, the split, the count and the first row (0-based, as datasets counts).
    """
    import pyarrow.compute as pc

    for flag, col in [*text_columns, label]:
        if col is None:
            continue
        column = ds.data.column(col)
        bad = pc.is_null(column)
        if flag != "--label_column" and (column.type == "string" or column.type == "large_string"):
            bad = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(column), ""), True)  # null cells count as empty
        count = pc.sum(bad).as_py() or 0
        if count:
            first = pc.index(bad, True).as_py()
            what = "no label" if flag == "--label_column" else f"an empty {col!r}"
            raise UsageError(f"{flag}: {count} row(s) of the {split} data have {what} (the first: row {first}); fill them or drop those rows")


def read_label_spec(raw, data_args) -> LabelSpec:
    """Label names (or regression) from the train split; checks columns and validation labels.

    Raises:
        UsageError: a column is missing, the validation split has a label unseen in training, or a class
            label column has a single value.
    """
    text, pair = text_columns(data_args)
    label = data_args.label_column
    for split in ("train", "validation"):
        columns = raw[split].column_names
        for flag, col in (("--text_column", text), ("--text_pair_column", pair), ("--label_column", label)):
            if col is not None and col not in columns:
                raise UsageError(f"{flag}: no column {col!r} in the {split} data (columns: {', '.join(columns)}); pass {flag} NAME")
    for split in ("train", "validation"):
        _check_cells(raw[split], split, [("--text_column", text), ("--text_pair_column", pair)], ("--label_column", label))
    feature = raw["train"].features[label]
    if hasattr(feature, "names"):  # datasets.ClassLabel (hub datasets such as GLUE)
        return LabelSpec(tuple(feature.names), False)
    values = raw["train"].unique(label)
    if all(isinstance(v, float) for v in values) and not all(float(v).is_integer() for v in values):
        return LabelSpec((), True)
    names = tuple(sorted(label_name(v) for v in values))
    if len(names) < 2:
        raise UsageError(f"--label_column: {label!r} has a single value {names}; a classifier needs 2 or more classes")
    unseen = sorted({label_name(v) for v in raw["validation"].unique(label)} - set(names))
    if unseen:
        raise UsageError(f"--validation_file: labels {unseen} do not occur in the training data; fix the files")
    return LabelSpec(names, False)


class SequenceClassificationTask:
    """GLUE-style classification or regression (see module docstring).

    Batches: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the tokenizer makes them)
    (B, N), padded to ``max_seq_length`` so that every rank's features have the same N for the
    global-batch sequence relation; ``labels`` (B,) long class ids, or float targets for regression.
    """

    name = "sequence_classification"
    auto_class = AutoModelForSequenceClassification
    vocab_head = False
    fused_logit_loss = False

    def __init__(self, raw, labels: LabelSpec, data_args):
        self.raw = raw
        self.labels = labels
        self.args = data_args
        self.pad_id = 0  # the tokenizer's, once load_datasets has run
        self.variable_length = not data_args.pad_to_max_length  # batches padded to their longest row
        self.metric_names = metric_names(data_args.task_name, labels.is_regression, labels.num_labels)

    def check_teacher(self, teacher_config, teacher: str, distill_args) -> None:
        """The teacher must be fine-tuned for sequence classification on this label set (same count, same
        names unless generic ``LABEL_i``); DIST needs class distributions, which a regression head lacks.

        Raises:
            UsageError: naming ``--teacher`` (or ``--dist_weight``) and the fix.
        """
        archs = getattr(teacher_config, "architectures", None) or []
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise UsageError(
                f"--teacher: {teacher} is not fine-tuned for sequence classification (architectures {archs}); "
                "fine-tune it on the task first with launchers/finetune_teacher.py"
            )
        if teacher_config.num_labels != self.labels.num_labels:
            raise UsageError(
                f"--teacher: its head has {teacher_config.num_labels} labels, the data {self.labels.num_labels} "
                f"({', '.join(self.labels.names) or 'regression'}); use a teacher fine-tuned on this task"
            )
        names = [teacher_config.id2label[i] for i in range(teacher_config.num_labels)]
        generic = all(n == f"LABEL_{i}" for i, n in enumerate(names))
        if not self.labels.is_regression and not generic and tuple(names) != self.labels.names:
            raise UsageError(f"--teacher: its labels {names} differ from the data's {list(self.labels.names)}; fix --label_column or the teacher")
        if self.labels.is_regression and distill_args.dist_weight:
            raise UsageError("--dist_weight: DIST relates class distributions and a regression head has none; drop dist from --loss (use kd: MSE on predictions)")

    def check_finetune(self, model: str) -> None:
        """The classification head is built for the data's labels: nothing to refuse."""

    def config_updates(self) -> dict:
        if self.labels.is_regression:
            return {"num_labels": 1, "problem_type": "regression"}
        names = self.labels.names
        return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)},
                "problem_type": "single_label_classification"}

    def load_datasets(self, tokenizer, data_args, *, rank: int = 0, world: int = 1, seed: int = 0):
        text, pair = text_columns(data_args)
        label = data_args.label_column
        ids = {n: i for i, n in enumerate(self.labels.names)}
        feature = self.raw["train"].features[label]

        def encode(batch):
            enc = tokenizer(batch[text], batch[pair] if pair else None, truncation=True, max_length=data_args.max_seq_length)
            if self.labels.is_regression:
                enc["labels"] = [float(v) for v in batch[label]]
            elif hasattr(feature, "names"):
                enc["labels"] = list(batch[label])
            else:
                enc["labels"] = [ids[label_name(v)] for v in batch[label]]
            return enc

        out = []
        for split in ("train", "validation"):
            ds = self.raw[split]
            ds = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenize {split}")
            out.append(ds)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return tuple(out)

    def collate(self, rows, *, train: bool) -> dict:
        """Rows of token lists -> ``input_ids``, ``attention_mask`` (and ``token_type_ids``) (B, N) padded to the
        longest row (``--pad_to_max_length``: to ``max_seq_length``), ``labels`` (B,)."""
        length = self.args.max_seq_length if self.args.pad_to_max_length else max(len(r) for r in rows["input_ids"])
        ids, attention = pad_rows(rows["input_ids"], length, self.pad_id)  # (B, N), (B, N)
        batch = {"input_ids": ids, "attention_mask": attention}
        if "token_type_ids" in rows:
            batch["token_type_ids"] = pad_rows(rows["token_type_ids"], length, 0)[0]  # (B, N)
        dtype = torch.float32 if self.labels.is_regression else torch.long
        batch["labels"] = torch.tensor(rows["labels"], dtype=dtype)  # (B,)
        return batch

    def loss_tokens(self, batch: dict) -> int:
        """Sequences the task loss reads (one target each)."""
        return int(batch["labels"].shape[0])

    def model_inputs(self, batch: dict, *, logits: bool = True) -> dict:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}

    def task_loss(self, outputs, batch: dict) -> torch.Tensor:
        logits = outputs.logits.float()  # (B, K)
        if self.labels.is_regression:
            return F.mse_loss(logits.squeeze(-1), batch["labels"].float())
        return F.cross_entropy(logits, batch["labels"])

    def kd_loss(self, student_outputs, teacher_outputs, batch: dict, temperature: float) -> torch.Tensor:
        """KL at temperature on class logits (as one 'token' per sequence); MSE on predictions for regression."""
        s, t = student_outputs.logits.float(), teacher_outputs.logits.float()  # (B, K)
        if self.labels.is_regression:
            return F.mse_loss(s, t)
        ones = torch.ones(s.shape[0], 1, device=s.device)  # (B, 1)
        return logit_kd_loss(s[:, None], t[:, None], ones, temperature=temperature)  # (B, 1, K)

    def distill_logits(self, outputs, batch: dict):
        """Class logits (B, K), one sample per sequence; regression has no distribution (refused by the plan)."""
        return outputs.logits, None

    def eval_stats(self, outputs, batch: dict) -> dict:
        keep = batch["example_mask"].bool()  # (B,)
        logits = outputs.logits.float()[keep]  # (B', K)
        preds = logits.squeeze(-1) if self.labels.is_regression else logits.argmax(-1)
        return {"predictions": preds.double(), "labels": batch["labels"][keep].double()}

    def metrics(self, stats: dict) -> dict:
        preds, labels = stats["predictions"].numpy(), stats["labels"].numpy()
        if not self.labels.is_regression:
            preds, labels = preds.astype(np.int64), labels.astype(np.int64)
        return compute_metrics(self.metric_names, preds, labels)
