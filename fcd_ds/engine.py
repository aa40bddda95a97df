"""The distillation engine: one optimizer step of student + frozen teacher, and held-out evaluation.

Composition, not inheritance: :class:`DistillEngine` holds the student ``DeepSpeedEngine``, the
teacher ``DeepSpeedEngine`` (or None: fine-tuning), the layer map, the loss settings and the task.
It never branches on the model kind: the task turns batches into model inputs, outputs into its loss,
logit-KD and metrics (:mod:`fcd_ds.tasks`). DeepSpeed owns backward, gradient accumulation, clipping
and the optimizer step (``engine.backward(loss); engine.step()`` per micro-batch, as DeepSpeedExamples'
``train_bert_ds.py``).

Training loss per micro-batch::

    ce_weight * task loss + fcd_weight * sum_p w_p * (alpha * L_tok_p + beta * L_seq_p) / sum_p w_p
                          + kd_weight * (task's logit KD, T^2 KL(teacher || student) at temperature T)
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import nullcontext

import torch
import torch.distributed as dist

from .features import FeatureCapture
from .layer_map import LayerPair
from .losses import causal_lm_loss, fcd_terms

__all__ = ["DistillEngine", "causal_lm_loss"]


def _sync() -> None:
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()


class DistillEngine:
    """Student engine + teacher engine + layer map + loss weights + task.

    Args:
        student: student ``DeepSpeedEngine`` (training). teacher: teacher ``DeepSpeedEngine`` (frozen), or
            None for fine-tuning (then FCD and KD must be off).
        pairs: the layer map (:class:`~fcd_ds.layer_map.LayerPair` list).
        distill: :class:`~fcd_ds.config.DistillArguments`. task: a :class:`~fcd_ds.tasks.Task`.
    """

    def __init__(self, student, teacher, pairs: list[LayerPair], distill, task):
        self.student = student
        self.teacher = teacher
        self.pairs = pairs
        self.args = distill
        self.task = task
        self.student_capture = FeatureCapture(student.module, [p.student for p in pairs]) if distill.uses_fcd else None
        self.teacher_capture = FeatureCapture(teacher.module, [p.teacher for p in pairs]) if distill.uses_fcd else None

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.student.device) for k, v in batch.items()}

    @property
    def needs_teacher(self) -> bool:
        """Whether training runs the teacher at all (False for the task loss alone)."""
        return self.teacher is not None and (self.args.uses_fcd or self.args.uses_kd)

    @torch.no_grad()
    def teacher_forward(self, batch: dict):
        """Teacher features of the layer map's blocks, and the head's outputs only when logit KD is on
        (otherwise the base model runs without the head). Returns ``({block: (B, N, C_t)}, outputs or None)``."""
        inputs = self.task.model_inputs(batch)
        capture = self.teacher_capture
        with capture.recording() if capture is not None else nullcontext():
            if self.args.uses_kd:
                outputs = self.teacher(**inputs)
            else:
                self.teacher.module.base_model(**inputs)
                outputs = None
        return (dict(capture.features) if capture is not None else {}), outputs

    def losses(self, batch: dict, teacher_feats: dict, teacher_outputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Student forward and every loss term. Returns ``(total, terms)``; ``terms`` holds the unweighted
        scalars: ``loss/ce`` (the task loss), ``loss/fcd``, ``loss/kd``, ``fcd/<pair>/token``, ``fcd/<pair>/sequence``."""
        mask = batch["attention_mask"]
        capture = self.student_capture
        with capture.recording() if capture is not None else nullcontext():
            outputs = self.student(**self.task.model_inputs(batch))
        a = self.args
        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros((), dtype=torch.float32, device=mask.device)
        if a.ce_weight:
            task_loss = self.task.task_loss(outputs, batch)
            if task_loss is not None:
                terms["loss/ce"] = task_loss
                total = total + a.ce_weight * task_loss
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
            terms["loss/kd"] = self.task.kd_loss(outputs, teacher_outputs, batch, a.kd_temperature)
            total = total + a.kd_weight * terms["loss/kd"]
        terms["loss/total"] = total
        return total, terms

    def train_step(self, micro_batches) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches from ``micro_batches``.

        Returns:
            Mean of every loss term over the micro-batches, plus seconds spent in ``time/teacher_forward``,
            ``time/student_forward_backward`` and ``time/optimizer_step`` (accelerator-synchronised),
            and ``tokens`` (this rank's real tokens in the step, from the attention masks).
        """
        gas = self.student.gradient_accumulation_steps()
        sums: dict[str, float] = defaultdict(float)
        for _ in range(gas):
            batch = self._to_device(next(micro_batches))
            _sync()
            t0 = time.perf_counter()
            feats, t_outputs = self.teacher_forward(batch) if self.needs_teacher else ({}, None)
            _sync()
            t1 = time.perf_counter()
            total, terms = self.losses(batch, feats, t_outputs)
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
    def evaluate(self, which: str, batches: list[dict]) -> dict[str, float]:
        """Held-out metrics of ``"student"`` or ``"teacher"`` over every rank's ``batches`` (the task's
        :meth:`~fcd_ds.tasks.Task.metrics` of the statistics gathered from all ranks), plus ``fcd``, the
        student's held-out FCD loss against the teacher, when the task has no metric of its own (a
        headless task-agnostic run). Collective.
        """
        engine = self.student if which == "student" else self.teacher
        was_training = engine.module.training
        engine.eval()
        collected: dict[str, list[torch.Tensor]] = defaultdict(list)
        fcd_sum = torch.zeros(2, dtype=torch.float64)  # (sum of batch FCD losses, batches)
        held_out_fcd = not self.task.metric_names and which == "student" and self.student_capture is not None
        for batch in batches:
            batch = self._to_device(batch)
            if held_out_fcd:
                feats, _ = self.teacher_forward(batch)
                _, terms = self.losses(batch, feats, None)
                fcd_sum += torch.tensor([terms["loss/fcd"].item(), 1.0], dtype=torch.float64)
                continue
            outputs = engine(**self.task.model_inputs(batch))
            for k, v in self.task.eval_stats(outputs, batch).items():
                collected[k].append(v.detach().cpu())
        if was_training:
            engine.train()
        if held_out_fcd:
            if dist.is_initialized():
                dist.all_reduce(fcd_sum)  # mean over ranks' batches (equal values under the global batch)
            return {"fcd": (fcd_sum[0] / fcd_sum[1]).item()}
        local = {k: torch.cat(v) for k, v in collected.items()}
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
            local = {k: torch.cat([p[k] for p in parts]) for k in local}
        return self.task.metrics(local)
