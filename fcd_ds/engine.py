"""The distillation engine: one optimizer step of student + frozen teacher, and held-out evaluation.

Composition, not inheritance: :class:`DistillEngine` holds the student ``DeepSpeedEngine``, the
teacher ``DeepSpeedEngine`` (or None: fine-tuning), the layer maps, the loss settings and the task.
It never branches on the model kind: the task turns batches into model inputs, outputs into its loss,
logit-KD and metrics (:mod:`fcd_ds.tasks`). DeepSpeed owns backward, gradient accumulation, clipping
and the optimizer step (``engine.backward(loss); engine.step()`` per micro-batch, as DeepSpeedExamples'
``train_bert_ds.py``).

The loss of a micro-batch is :class:`~fcd_ds.objective.DistillObjective`'s (the same code that
:class:`~fcd_ds.integrations.FCDTrainer` runs inside a ``transformers.Trainer``).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.profiler import record_function

from .fused_head import fused_head_problem, fused_loss_sum
from .layer_map import LayerPair
from .losses import causal_lm_loss
from .objective import DistillObjective, TeacherView
from .runtime.distributed import all_reduce_host

__all__ = ["DistillEngine", "TeacherView", "causal_lm_loss"]


def _sync() -> None:
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()


class DistillEngine:
    """Student engine + teacher engine + layer maps + loss weights + task.

    Args:
        student: student ``DeepSpeedEngine`` (training); a hidden-MSE projection, when the widths differ,
            is a submodule of its model (:mod:`fcd_ds.projections`).
        teacher: teacher ``DeepSpeedEngine`` (frozen), or None for fine-tuning (task loss only).
        pairs: the ``--layer_map`` (:class:`~fcd_ds.layer_map.LayerPair` list) of fcd and hidden_mse.
        distill: :class:`~fcd_ds.config.DistillArguments` (resolved weights). task: a :class:`~fcd_ds.tasks.Task`.
        attention_pairs: the ``--minilm_layer_map`` of minilm.
    """

    def __init__(self, student, teacher, pairs: list[LayerPair], distill, task, attention_pairs: list[LayerPair] = ()):
        self.student = student
        self.teacher = teacher
        self.pairs = pairs
        self.attention_pairs = list(attention_pairs)
        self.args = distill
        self.task = task
        self.objective = DistillObjective(student.module, teacher.module if teacher is not None else None, pairs, distill, task, attention_pairs)
        self.student_logits = self.objective.student_logits  # whether the student's head output feeds a loss (FLOP count)

    def _to_device(self, batch: dict) -> dict:
        """The batch on the student's device; a variable-length task's batch padded to the longest N of any
        rank when FCD's global relation needs it (:meth:`~fcd_ds.objective.DistillObjective.equal_lengths`)."""
        batch = {k: v.to(self.student.device) for k, v in batch.items()}
        if getattr(self.task, "variable_length", False):
            batch = self.objective.equal_lengths(batch, getattr(self.task, "pad_id", 0))
        return batch

    @property
    def needs_teacher(self) -> bool:
        """Whether training runs the teacher at all (False for the task loss alone)."""
        return self.teacher is not None and self.args.uses_teacher

    def teacher_forward(self, batch: dict) -> TeacherView:
        """:meth:`DistillObjective.teacher_forward <fcd_ds.objective.DistillObjective.teacher_forward>`
        through the teacher's DeepSpeed engine (ZeRO-3 keeps its parameter-fetch trace and prefetching)."""
        return self.objective.teacher_forward(self.teacher, batch)

    def losses(self, batch: dict, teacher: TeacherView | None, grad_norms: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Student forward through its engine and every loss term that is on: ``(total, terms)`` of
        :meth:`DistillObjective.losses <fcd_ds.objective.DistillObjective.losses>`."""
        total, terms, _ = self.objective.losses(self.student, batch, teacher, grad_norms=grad_norms)
        return total, terms

    def train_step(self, micro_batches, grad_norms: bool = False) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches from ``micro_batches``;
        with ``grad_norms`` also each term's gradient norm at the student's blocks (``--grad_norm_steps``:
        :meth:`~fcd_ds.objective.DistillObjective.term_grad_norms`, averaged over the micro-batches).

        Returns:
            Mean of every loss term over the micro-batches, plus seconds spent in ``time/teacher_forward``,
            ``time/student_forward_backward`` and ``time/optimizer_step`` (accelerator-synchronised),
            ``tokens`` (this rank's real tokens in the step, from the attention masks), ``padded_tokens`` (B x N
            of the micro-batches as run) and ``loss_tokens``
            (the targets the task loss read, :meth:`~fcd_ds.tasks.Task.loss_tokens`).
        """
        gas = self.student.gradient_accumulation_steps()
        sums: dict[str, float] = defaultdict(float)
        for _ in range(gas):
            batch = self._to_device(next(micro_batches))
            _sync()
            t0 = time.perf_counter()
            with record_function("teacher_forward"):
                view = self.teacher_forward(batch) if self.needs_teacher else None
            _sync()
            t1 = time.perf_counter()
            total, terms = self.losses(batch, view, grad_norms)
            self.student.backward(total)
            _sync()
            t2 = time.perf_counter()
            with record_function("optimizer_step"):
                self.student.step()  # optimizer step and zero_grad only on the accumulation boundary
            _sync()
            t3 = time.perf_counter()
            for k, v in terms.items():
                sums[k] += v.item() / gas
            sums["time/teacher_forward"] += t1 - t0
            sums["time/student_forward_backward"] += t2 - t1
            sums["time/optimizer_step"] += t3 - t2
            sums["tokens"] += batch["attention_mask"].sum().item()
            sums["padded_tokens"] += batch["input_ids"].numel()  # B x N as run: what the matmuls processed
            sums["loss_tokens"] += self.task.loss_tokens(batch)
        return dict(sums)

    @torch.no_grad()
    def evaluate(self, which: str, batches: list[dict], interrupt=None) -> dict[str, float]:
        """Held-out metrics of ``"student"`` or ``"teacher"`` over every rank's ``batches`` (the task's
        :meth:`~fcd_ds.tasks.Task.metrics` of the statistics gathered from all ranks). When the task has no
        metric of its own (a headless task-agnostic run), the student's held-out feature-level
        distillation losses instead: ``fcd``, ``hidden_mse``, ``minilm`` (those that are on). With
        ``--fused_logit_loss`` a causal LM's cross-entropy is summed inside its head a chunk at a time
        (:func:`~fcd_ds.fused_head.fused_loss_sum`), so evaluation holds no (B, N, V) logits. Collective.

        Args:
            interrupt: called after every batch on every rank (all ranks have the same number of
                batches), e.g. :meth:`fcd_ds.runtime.preemption.StopFlag.check`, which raises to stop early.
        """
        engine = self.student if which == "student" else self.teacher
        was_training = engine.module.training
        engine.eval()
        collected: dict[str, list[torch.Tensor]] = defaultdict(list)
        held_out = [t for t in ("fcd", "hidden_mse", "minilm") if self.args.weights[t]]
        held_out = held_out if not self.task.metric_names and which == "student" else []
        sums = torch.zeros(len(held_out) + 1, dtype=torch.float64)  # (sum of each term over batches, batches)
        # --fused_logit_loss covers evaluation too: a causal LM's held-out cross-entropy inside its head.
        fused = self.args.fused_logit_loss and self.task.fused_logit_loss and fused_head_problem(engine.module) is None
        try:
            for batch in batches:
                batch = self._to_device(batch)
                if held_out:
                    _, terms = self.losses(batch, self.teacher_forward(batch))
                    sums += torch.tensor([terms[f"loss/{t}"].item() for t in held_out] + [1.0], dtype=torch.float64)
                elif fused:  # the head sums the cross-entropy chunk by chunk: no (B, N, V) logits
                    with fused_loss_sum(engine.module, batch["input_ids"], self.task.eval_mask(batch)):
                        outputs = engine(**self.task.model_inputs(batch))
                    for k, v in self.task.eval_stats(outputs, batch, loss_sum=outputs.logits).items():
                        collected[k].append(v.detach().cpu())
                else:
                    outputs = engine(**self.task.model_inputs(batch))
                    for k, v in self.task.eval_stats(outputs, batch).items():
                        collected[k].append(v.detach().cpu())
                if interrupt is not None:
                    interrupt()
        finally:
            if was_training:
                engine.train()
        if held_out:
            sums = all_reduce_host(sums)  # mean over ranks' batches (unchanged without a process group)
            return {t: (sums[i] / sums[-1]).item() for i, t in enumerate(held_out)}
        local = {k: torch.cat(v) for k, v in collected.items()}
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
            local = {k: torch.cat([p[k] for p in parts]) for k in local}
        return self.task.metrics(local)
