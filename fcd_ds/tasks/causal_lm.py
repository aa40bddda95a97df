"""Causal LM: next-token cross-entropy on text blocks (packed documents, or one padded document per
sequence), held-out perplexity over the tokens the loss reads (the assistant's with ``--assistant_only_loss``)."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM

from ..data import pad_rows, position_ids_from_starts
from ..losses import causal_lm_loss, logit_kd_loss

__all__ = ["CausalLMTask"]


class CausalLMTask:
    """Decoder distillation on text (transformers' ``run_clm.py`` data, TRL's chat forms).

    Args:
        corpus: the run's :class:`~fcd_ds.data.TextCorpus` (None for a task used on given batches).
        pad_id: the padding token (``--packing false``). max_seq_length: N, every batch's width.
        per_document_attention: position ids restart at every document start and no attention mask is
            passed, so transformers attends within documents; the target that starts a document is not counted.

    Batches: ``input_ids`` (B, N), ``attention_mask`` (B, N) (0 on padding), and where needed
    ``loss_mask`` (B, N) (1 = this token is a target the loss reads: assistant tokens, not a document
    start under per-document attention) and ``position_ids`` (B, N); at evaluation ``example_mask`` (B,).
    """

    name = "causal_lm"
    auto_class = AutoModelForCausalLM
    metric_names = ("loss", "perplexity")
    vocab_head = True
    fused_logit_loss = True  # CE on the shifted ids and KD inside the LM head: fcd_ds.fused_head

    def __init__(self, corpus=None, *, pad_id: int = 0, max_seq_length: int = 128, per_document_attention: bool = False):
        self.corpus, self.pad_id, self.max_seq_length = corpus, pad_id, max_seq_length
        self.per_document_attention = per_document_attention

    def check_teacher(self, teacher_config, teacher: str, distill_args) -> None:
        """Any causal LM teacher with the student's tokenizer serves (checked by the plan)."""

    def check_finetune(self, model: str) -> None:
        """Every causal LM has its task loss: nothing to refuse."""

    def config_updates(self) -> dict:
        return {}

    def load_datasets(self, tokenizer, data_args, *, rank: int = 0, world: int = 1, seed: int = 0):
        return self.corpus.load(rank, world, seed)

    def collate(self, rows, *, train: bool) -> dict:
        ids, attention = pad_rows(rows["input_ids"], self.max_seq_length, self.pad_id)  # (B, N), (B, N)
        batch = {"input_ids": ids, "attention_mask": attention}
        loss_mask = pad_rows(rows["loss_mask"], self.max_seq_length, 0)[0] if "loss_mask" in rows else None  # (B, N)
        if self.per_document_attention:
            starts = rows["document_starts"]
            batch["position_ids"] = position_ids_from_starts(starts, self.max_seq_length)  # (B, N)
            loss_mask = attention.clone() if loss_mask is None else loss_mask
            for i, doc_starts in enumerate(starts):
                loss_mask[i, list(doc_starts)] = 0  # predicted from the previous document, which it cannot see
        if loss_mask is not None:
            batch["loss_mask"] = loss_mask
        return batch

    def model_inputs(self, batch: dict, *, logits: bool = True) -> dict:
        inputs = {"input_ids": batch["input_ids"], "use_cache": False}
        if "position_ids" in batch:  # no attention mask: transformers finds the documents from the position ids
            inputs["position_ids"] = batch["position_ids"]
        else:
            inputs["attention_mask"] = batch["attention_mask"]
        if not logits:
            inputs["logits_to_keep"] = 1  # the (B, N, V) logits would be computed for nothing
        return inputs

    @staticmethod
    def ce_mask(batch: dict) -> torch.Tensor:
        """(B, N): 1 where token j is a counted next-token target (real, and in the loss mask)."""
        mask = batch["attention_mask"]
        return mask * batch["loss_mask"] if "loss_mask" in batch else mask

    @classmethod
    def kd_mask(cls, batch: dict) -> torch.Tensor:
        """(B, N): positions logit KD reads: every attended position, or with a loss mask the positions
        whose next token is a counted target (the positions the task loss reads)."""
        if "loss_mask" not in batch:
            return batch["attention_mask"]
        targets = cls.ce_mask(batch)
        return torch.cat([targets[:, 1:], torch.zeros_like(targets[:, :1])], dim=1)  # position i predicts token i + 1

    def loss_tokens(self, batch: dict) -> int:
        """Next-token targets the task loss reads in the batch."""
        return int(self.ce_mask(batch)[:, 1:].sum())

    def task_loss(self, outputs, batch: dict) -> torch.Tensor:
        return causal_lm_loss(outputs.logits, batch["input_ids"], self.ce_mask(batch))

    def kd_loss(self, student_outputs, teacher_outputs, batch: dict, temperature: float) -> torch.Tensor:
        return logit_kd_loss(student_outputs.logits, teacher_outputs.logits, self.kd_mask(batch), temperature=temperature)

    def distill_logits(self, outputs, batch: dict):
        return outputs.logits, self.kd_mask(batch)  # (B, N, V), (B, N)

    def eval_mask(self, batch: dict) -> torch.Tensor:
        """(B, N): the held-out targets counted: :meth:`ce_mask` of the real rows (``example_mask``)."""
        return self.ce_mask(batch) * batch["example_mask"][:, None]  # (B, N): padding rows count nothing

    def eval_stats(self, outputs, batch: dict, loss_sum: torch.Tensor | None = None) -> dict:
        """``loss_sum`` and ``targets`` of the batch; ``loss_sum`` (0-dim) given when the head already summed
        the cross-entropy over :meth:`eval_mask` (:func:`~fcd_ds.fused_head.fused_loss_sum`: no logits)."""
        mask = self.eval_mask(batch)
        if loss_sum is None:
            loss_sum = causal_lm_loss(outputs.logits, batch["input_ids"], mask, reduction="sum")
        return {"loss_sum": loss_sum.double().reshape(1), "targets": mask[:, 1:].sum().double().reshape(1)}

    def metrics(self, stats: dict) -> dict:
        loss = (stats["loss_sum"].sum() / stats["targets"].sum()).item()
        return {"loss": loss, "perplexity": math.exp(loss)}
