"""Masked LM: task-agnostic encoder distillation on raw text (FCD on block outputs, + the masked-LM
loss when the teacher has an MLM head), giving a general student to fine-tune afterwards."""

from __future__ import annotations

import hashlib
import math

import torch
from transformers import AutoModel, AutoModelForMaskedLM, DataCollatorForLanguageModeling

from ..data import pad_rows
from ..errors import UsageError
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

    Training masks are drawn from a generator seeded by the batch's own token ids and ``seed``, so a
    batch gets the same masks in a DataLoader worker, in the training process and after a resume.

    Batches: ``input_ids`` (B, N), ``attention_mask`` (B, N) (0 on padding), with ``mlm`` also ``labels`` (B, N).
    """

    name = "masked_lm"
    vocab_head = True
    fused_logit_loss = False

    def __init__(self, tokenizer, *, mlm: bool, mlm_probability: float = 0.15, corpus=None, max_seq_length: int = 128, seed: int = 0):
        self.mlm, self.corpus, self.max_seq_length, self.seed = mlm, corpus, max_seq_length, seed
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.auto_class = AutoModelForMaskedLM if mlm else AutoModel
        self.metric_names = ("loss", "perplexity") if mlm else ()
        self.vocab_head = mlm
        if mlm:
            self._train_masking = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability)
            self._eval_masking = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=EVAL_MASK_SEED)

    def check_teacher(self, teacher_config, teacher: str, distill_args) -> None:
        """A teacher without an MLM head trains the student by feature-level terms alone: no logit term
        (kd, dist), and at least one of fcd, hidden_mse, minilm.

        Raises:
            UsageError: naming the loss flag and the fix.
        """
        if self.mlm:
            return
        for term in ("kd", "dist"):
            if distill_args.weights[term]:
                raise UsageError(f"--{term}_weight: the teacher {teacher} has no MLM head to distil logits from; drop {term} from --loss")
        if not any(distill_args.weights[t] for t in ("fcd", "hidden_mse", "minilm")):
            raise UsageError(f"--loss: the teacher {teacher} has no MLM head, so only fcd, hidden_mse or minilm can train; add one")

    def check_finetune(self, model: str) -> None:
        """Fine-tuning (no teacher) needs the task loss, so an MLM head. Raises :class:`UsageError`."""
        if not self.mlm:
            raise UsageError(f"--model_name_or_path: {model} has no MLM head, so --task masked_lm has no loss to fine-tune on")

    def config_updates(self) -> dict:
        return {}

    def load_datasets(self, tokenizer, data_args, *, rank: int = 0, world: int = 1, seed: int = 0):
        return self.corpus.load(rank, world, seed)

    def collate(self, rows, *, train: bool) -> dict:
        ids, attention = pad_rows(rows["input_ids"], self.max_seq_length, self.pad_id)  # (B, N), (B, N)
        if not self.mlm:
            return {"input_ids": ids, "attention_mask": attention}
        masking = self._train_masking if train else self._eval_masking
        if train:
            digest = hashlib.blake2b(ids.numpy().tobytes() + self.seed.to_bytes(8, "little", signed=True), digest_size=8).digest()
            masking.generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        batch = masking([{"input_ids": row} for row in ids])  # input_ids masked (padding never), labels -100 where not
        return {"input_ids": batch["input_ids"], "attention_mask": attention, "labels": batch["labels"]}

    def loss_tokens(self, batch: dict) -> int:
        """Masked tokens the MLM loss reads (0 without an MLM head)."""
        return int((batch["labels"] != -100).sum()) if self.mlm else 0

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
