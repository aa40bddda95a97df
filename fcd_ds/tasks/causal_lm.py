"""Causal LM: next-token cross-entropy on fixed-length text blocks, held-out perplexity."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM

from ..data import load_blocks
from ..losses import causal_lm_loss, logit_kd_loss

__all__ = ["CausalLMTask"]


class CausalLMTask:
    """Decoder distillation on text (transformers' ``run_clm.py`` data). Batches:
    ``input_ids`` (B, N), ``attention_mask`` (B, N), ``example_mask`` (B,) (eval padding rows are 0)."""

    name = "causal_lm"
    auto_class = AutoModelForCausalLM
    metric_names = ("loss", "perplexity")
    vocab_head = True
    fused_logit_loss = True  # CE on the shifted ids and KD on every attended position: fcd_ds.fused_head

    def config_updates(self) -> dict:
        return {}

    def load_datasets(self, tokenizer, data_args):
        return load_blocks(tokenizer, data_args.train_file, data_args.validation_file, data_args.max_seq_length,
                           data_args.validation_split_percentage)

    def collate(self, rows, *, train: bool) -> dict:
        ids = rows["input_ids"]  # (B, N)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def model_inputs(self, batch: dict, *, logits: bool = True) -> dict:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        if not logits:
            inputs["logits_to_keep"] = 1  # the (B, N, V) logits would be computed for nothing
        return inputs

    def task_loss(self, outputs, batch: dict) -> torch.Tensor:
        return causal_lm_loss(outputs.logits, batch["input_ids"], batch["attention_mask"])

    def kd_loss(self, student_outputs, teacher_outputs, batch: dict, temperature: float) -> torch.Tensor:
        return logit_kd_loss(student_outputs.logits, teacher_outputs.logits, batch["attention_mask"], temperature=temperature)

    def distill_logits(self, outputs, batch: dict):
        return outputs.logits, batch["attention_mask"]  # (B, N, V), (B, N)

    def eval_stats(self, outputs, batch: dict) -> dict:
        mask = batch["attention_mask"] * batch["example_mask"][:, None]  # (B, N): padding rows count nothing
        loss_sum = causal_lm_loss(outputs.logits, batch["input_ids"], mask, reduction="sum").double()
        return {"loss_sum": loss_sum.reshape(1), "targets": mask[:, 1:].sum().double().reshape(1)}

    def metrics(self, stats: dict) -> dict:
        loss = (stats["loss_sum"].sum() / stats["targets"].sum()).item()
        return {"loss": loss, "perplexity": math.exp(loss)}
