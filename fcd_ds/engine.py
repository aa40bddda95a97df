"""The distillation engine: one optimizer step of student + frozen teacher, and held-out evaluation.

Composition, not inheritance: :class:`DistillEngine` holds the student ``DeepSpeedEngine``, the
teacher ``DeepSpeedEngine``, the layer map and the loss settings. DeepSpeed owns backward, gradient
accumulation, clipping and the optimizer step (``engine.backward(loss); engine.step()`` per
micro-batch, as DeepSpeedExamples' ``train_bert_ds.py``).

Training loss per micro-batch::

    ce_weight * CE(next token) + fcd_weight * sum_p w_p * (alpha * L_tok_p + beta * L_seq_p) / sum_p w_p
                               + kd_weight * T^2 * KL(teacher || student at temperature T)
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .features import FeatureCapture
from .layer_map import LayerPair
from .losses import fcd_terms, logit_kd_loss

__all__ = ["DistillEngine", "causal_lm_loss"]


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: position i predicts token i + 1, padded targets ignored.

    Args:
        logits: (B, N, V). input_ids: (B, N). mask: (B, N).
        reduction: ``"mean"`` over counted targets or ``"sum"``.

    Returns:
        float32 scalar (nats).
    """
    targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (B, N-1)
    flat_logits = logits[:, :-1].flatten(0, 1).float()  # (B * (N-1), V)
    return F.cross_entropy(flat_logits, targets.flatten(), ignore_index=-100, reduction=reduction)


def _sync() -> None:
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()


class DistillEngine:
    """Student engine + teacher engine + layer map + loss weights.

    Args:
        student: student ``DeepSpeedEngine`` (training). teacher: teacher ``DeepSpeedEngine`` (frozen).
        pairs: the layer map (:class:`~fcd_ds.layer_map.LayerPair` list).
        distill: :class:`~fcd_ds.config.DistillArguments`.
    """

    def __init__(self, student, teacher, pairs: list[LayerPair], distill):
        self.student = student
        self.teacher = teacher
        self.pairs = pairs
        self.args = distill
        self.student_capture = FeatureCapture(student.module, [p.student for p in pairs]) if distill.uses_fcd else None
        self.teacher_capture = FeatureCapture(teacher.module, [p.teacher for p in pairs]) if distill.uses_fcd else None

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.student.device) for k, v in batch.items()}

    @property
    def needs_teacher(self) -> bool:
        """Whether training runs the teacher at all (False for cross-entropy alone)."""
        return self.args.uses_fcd or self.args.uses_kd

    @torch.no_grad()
    def teacher_forward(self, batch: dict) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """Teacher features of the layer map's blocks, and logits only when logit KD is on (otherwise the
        base model runs without the LM head). Returns ``({block: (B, N, C_t)}, (B, N, V) or None)``."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        capture = self.teacher_capture
        with capture.recording() if capture is not None else nullcontext():
            if self.args.uses_kd:
                logits = self.teacher(**inputs).logits
            else:
                self.teacher.module.base_model(**inputs)
                logits = None
        return (dict(capture.features) if capture is not None else {}), logits

    def losses(self, batch: dict, teacher_feats: dict, teacher_logits) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Student forward and every loss term. Returns ``(total, terms)``; ``terms`` holds the unweighted
        scalars: ``loss/ce``, ``loss/fcd``, ``loss/kd``, ``fcd/<pair>/token``, ``fcd/<pair>/sequence``."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        capture = self.student_capture
        with capture.recording() if capture is not None else nullcontext():
            logits = self.student(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, N, V)
        a = self.args
        terms: dict[str, torch.Tensor] = {}
        total = logits.new_zeros((), dtype=torch.float32)
        if a.ce_weight:
            terms["loss/ce"] = causal_lm_loss(logits, ids, mask)
            total = total + a.ce_weight * terms["loss/ce"]
        if a.uses_fcd:
            weighted, weight_sum = 0.0, sum(p.weight for p in self.pairs)
            for p in self.pairs:
                t = fcd_terms(
                    capture.features[p.student],
                    teacher_feats[p.teacher],
                    mask,
                    alpha=a.fcd_alpha,
                    beta=a.fcd_beta,
                    sequence_relation=a.fcd_sequence_relation,
                    global_batch=a.fcd_global_batch,
                    chunk_size=a.fcd_chunk_size,
                )
                terms[f"fcd/{p.name}/token"], terms[f"fcd/{p.name}/sequence"] = t.token, t.sequence
                weighted = weighted + p.weight * (a.fcd_alpha * t.token + a.fcd_beta * t.sequence)
            terms["loss/fcd"] = weighted / weight_sum
            total = total + a.fcd_weight * terms["loss/fcd"]
            capture.features = {}  # the graph keeps what backward needs
        if a.uses_kd:
            terms["loss/kd"] = logit_kd_loss(logits, teacher_logits, mask, temperature=a.kd_temperature)
            total = total + a.kd_weight * terms["loss/kd"]
        terms["loss/total"] = total
        return total, terms

    def train_step(self, micro_batches) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches from ``micro_batches``.

        Returns:
            Mean of every loss term over the micro-batches, plus seconds spent in ``time/teacher_forward``,
            ``time/student_forward_backward`` and ``time/optimizer_step`` (accelerator-synchronised),
            and ``tokens`` (this rank's tokens in the step).
        """
        gas = self.student.gradient_accumulation_steps()
        sums: dict[str, float] = defaultdict(float)
        for _ in range(gas):
            batch = self._to_device(next(micro_batches))
            _sync()
            t0 = time.perf_counter()
            feats, t_logits = self.teacher_forward(batch) if self.needs_teacher else ({}, None)
            _sync()
            t1 = time.perf_counter()
            total, terms = self.losses(batch, feats, t_logits)
            self.student.backward(total)
            _sync()
            t2 = time.perf_counter()
            self.student.step()  # optimizer step and zero_grad only on the accumulation boundary
            _sync()
            t3 = time.perf_counter()
            for k, v in terms.items():
                sums[k] += v.item() / gas
            sums["time/teacher_forward"] += t1 - t0
            sums["time/student_forward_backward"] += t2 - t1
            sums["time/optimizer_step"] += t3 - t2
            sums["tokens"] += batch["attention_mask"].sum().item()
        return dict(sums)

    @torch.no_grad()
    def evaluate(self, which: str, batches: list[dict]) -> float:
        """Mean next-token cross-entropy (nats/token) of ``"student"`` or ``"teacher"`` over every rank's
        ``batches`` (token-weighted, all-reduced). Perplexity is ``exp`` of it. Collective."""
        engine = self.student if which == "student" else self.teacher
        was_training = engine.module.training
        engine.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.student.device)  # (loss sum, target count)
        for batch in batches:
            batch = self._to_device(batch)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            logits = engine(input_ids=ids, attention_mask=mask, use_cache=False).logits
            totals[0] += causal_lm_loss(logits, ids, mask, reduction="sum").double()
            totals[1] += mask[:, 1:].sum().double()
        if dist.is_initialized():
            dist.all_reduce(totals)
        if was_training:
            engine.train()
        return (totals[0] / totals[1]).item()
