"""Masked LM: task-agnostic encoder distillation on raw text (FCD on block outputs, + the masked-LM
loss when the teacher has an MLM head), giving a general student to fine-tune afterwards."""

from __future__ import annotations

import math

import torch
from transformers import AutoModel, AutoModelForMaskedLM, DataCollatorForLanguageModeling

from ..data import load_blocks
from ..losses import logit_kd_loss, masked_lm_loss

__all__ = ["MaskedLMTask", "has_mlm_head", "EVAL_MASK_SEED"]

EVAL_MASK_SEED = 1234  # held-out masking is drawn once from this seed: every eval sees the same masks


def has_mlm_head(config) -> bool:
    """Whether a checkpoint's config names an architecture with an MLM head (``*ForMaskedLM`` or BERT's
    ``*ForPreTraining``); sentence encoders such as all-MiniLM-L6-v2 (``BertModel``) have none."""
    return any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in (getattr(config, "architectures", None) or []))


class MaskedLMTask:
    """Encoder distillation on text blocks wrapped in special tokens (``[CLS] ... [SEP]``).

    With an MLM head (``mlm=True``): models load with ``AutoModelForMaskedLM``; inputs are masked as
    BERT does (15 %, 80/10/10, transformers' ``DataCollatorForLanguageModeling``); task loss = masked-LM
    cross-entropy; held-out loss and perplexity over masked tokens (masks drawn once, seeded).
    Without (``mlm=False``): ``AutoModel`` (no head), unmasked text, no task loss and no task metric:
    the student learns from the distillation terms alone and the engine reports held-out FCD.

    Batches: ``input_ids`` (B, N), ``attention_mask`` (B, N), with ``mlm`` also ``labels`` (B, N).
    """

    name = "masked_lm"
    vocab_head = True
    fused_logit_loss = False

    def __init__(self, tokenizer, *, mlm: bool, mlm_probability: float = 0.15):
        self.mlm = mlm
        self.auto_class = AutoModelForMaskedLM if mlm else AutoModel
        self.metric_names = ("loss", "perplexity") if mlm else ()
        self.vocab_head = mlm
        if mlm:
            self._train_masking = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability)
            self._eval_masking = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=EVAL_MASK_SEED)

    def config_updates(self) -> dict:
        return {}

    def load_datasets(self, tokenizer, data_args):
        return load_blocks(tokenizer, data_args.train_file, data_args.validation_file, data_args.max_seq_length,
                           data_args.validation_split_percentage, special_tokens=True)

    def collate(self, rows, *, train: bool) -> dict:
        ids = rows["input_ids"]  # (B, N)
        if not self.mlm:
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        masking = self._train_masking if train else self._eval_masking
        batch = masking([{"input_ids": row} for row in ids])  # input_ids masked, labels -100 where not
        return {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(ids), "labels": batch["labels"]}

    def model_inputs(self, batch: dict, *, logits: bool = True) -> dict:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def task_loss(self, outputs, batch: dict) -> torch.Tensor | None:
        return masked_lm_loss(outputs.logits, batch["labels"]) if self.mlm else None

    def kd_loss(self, student_outputs, teacher_outputs, batch: dict, temperature: float) -> torch.Tensor:
        return logit_kd_loss(student_outputs.logits, teacher_outputs.logits, batch["attention_mask"], temperature=temperature)

    def distill_logits(self, outputs, batch: dict):
        return outputs.logits, batch["attention_mask"]  # (B, N, V), (B, N)

    def eval_stats(self, outputs, batch: dict) -> dict:
        if not self.mlm:
            return {}
        labels = batch["labels"].masked_fill(batch["example_mask"][:, None] == 0, -100)  # (B, N)
        loss_sum = masked_lm_loss(outputs.logits, labels, reduction="sum").double()
        return {"loss_sum": loss_sum.reshape(1), "targets": (labels != -100).sum().double().reshape(1)}

    def metrics(self, stats: dict) -> dict:
        if not self.mlm:
            return {}
        loss = (stats["loss_sum"].sum() / stats["targets"].sum().clamp(min=1)).item()
        return {"loss": loss, "perplexity": math.exp(loss)}
