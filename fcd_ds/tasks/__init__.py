"""Tasks: what differs between distilling a decoder, an encoder on raw text and an encoder on labels.

The distillation engine, the losses, the layer map, the checkpoints and the logging never branch on
the model kind (TextBrewer's adaptor idea): a task owns the data (files -> tokenised datasets ->
batches), the head (the transformers Auto class of teacher, student and export), the task loss on the
data, the logit-KD form for its head, and the held-out metrics. Three tasks ship:

* ``causal_lm``: next-token cross-entropy on text blocks, perplexity (:class:`CausalLMTask`);
* ``masked_lm``: task-agnostic encoder distillation on text blocks, with the masked-LM loss when the
  teacher has an MLM head (:class:`MaskedLMTask`);
* ``sequence_classification``: single sentences or pairs, classification or regression, GLUE metrics
  (:class:`SequenceClassificationTask`).

Every task implements the :class:`Task` protocol (structural typing, no base class).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .causal_lm import CausalLMTask
from .classification import LabelSpec, SequenceClassificationTask, read_label_spec
from .masked_lm import MaskedLMTask, has_mlm_head

__all__ = [
    "TASK_NAMES",
    "Task",
    "CausalLMTask",
    "MaskedLMTask",
    "SequenceClassificationTask",
    "LabelSpec",
    "read_label_spec",
    "has_mlm_head",
]

TASK_NAMES = ("causal_lm", "masked_lm", "sequence_classification")


class Task(Protocol):
    """What the engine asks of a task. Batches are dicts of tensors with a leading batch dim B."""

    name: str
    auto_class: Any  # transformers Auto class that loads teacher and student and reloads the export
    metric_names: tuple[str, ...]  # held-out metrics, e.g. ("loss", "perplexity") or ("accuracy", "f1")
    vocab_head: bool  # whether the head projects onto the vocabulary (counted in FLOPs)
    fused_logit_loss: bool  # whether task loss and logit KD are next-token CE / KL on every position of a vocabulary head (fcd_ds.fused_head)
    # Optional: ``variable_length`` (True: batches are padded to their longest row, so N differs between
    # ranks and the engine pads to the longest of the global batch) and ``pad_id`` (what pads input_ids).

    def check_teacher(self, teacher_config, teacher: str, distill_args) -> None:
        """The task's rules for the teacher's head against the loss terms (e.g. a classifier teacher
        fine-tuned on this label set). Raises :class:`~fcd_ds.errors.UsageError` naming the flag."""

    def check_finetune(self, model: str) -> None:
        """The task's rules for fine-tuning ``model`` alone (no teacher): raises :class:`~fcd_ds.errors.UsageError`."""

    def config_updates(self) -> dict:
        """Attributes set on the student's (and export's) config, e.g. ``num_labels``, ``id2label``."""

    def load_datasets(self, tokenizer, data_args, *, rank: int = 0, world: int = 1, seed: int = 0) -> tuple[Any, Any]:
        """``(train, validation)``: map-style ``datasets.Dataset`` objects (or, streaming, a
        :class:`~fcd_ds.data.StreamEpochs` for this rank and the held-out blocks)."""

    def collate(self, rows: dict[str, list], *, train: bool) -> dict[str, torch.Tensor]:
        """Rows ``dataset[indices]`` (a dict of column lists) -> a model batch (pads, adds masks, masking,
        labels). Runs in DataLoader workers: any randomness is seeded from the rows themselves."""

    def loss_tokens(self, batch: dict) -> int:
        """Targets the task loss reads in the batch (tokens for language models, sequences for classifiers)."""

    def model_inputs(self, batch: dict, *, logits: bool = True) -> dict:
        """The keyword arguments of the model's forward; ``logits=False``: no loss reads the head's
        output, so the task may ask for less of it (a causal LM computes one position's logits)."""

    def task_loss(self, outputs, batch: dict) -> torch.Tensor | None:
        """Loss on the data's own targets (float32 scalar), or None when the head cannot give one."""

    def kd_loss(self, student_outputs, teacher_outputs, batch: dict, temperature: float) -> torch.Tensor:
        """Logit distillation between the two heads' outputs (float32 scalar)."""

    def distill_logits(self, outputs, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits (..., K), sample mask (...) or None)`` over which logit relations (DIST) are taken:
        one sample per real token for language models, per sequence for classifiers."""

    def eval_stats(self, outputs, batch: dict) -> dict[str, torch.Tensor]:
        """Per-batch 1-D tensors, concatenated over batches and ranks and passed to :meth:`metrics`. A task
        with ``fused_logit_loss`` also takes ``loss_sum=`` (the head's summed cross-entropy over its
        ``eval_mask(batch)``, :func:`~fcd_ds.fused_head.fused_loss_sum`) in place of logits."""

    def metrics(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        """Held-out metrics from the concatenated :meth:`eval_stats`."""
