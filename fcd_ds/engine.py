"""The distillation engine: one optimizer step of student + frozen teacher, and held-out evaluation.

Composition, not inheritance: :class:`DistillEngine` holds the student ``DeepSpeedEngine``, the
teacher ``DeepSpeedEngine`` (or None: fine-tuning), the layer maps, the loss settings and the task.
It never branches on the model kind: the task turns batches into model inputs, outputs into its loss,
logit-KD and metrics (:mod:`fcd_ds.tasks`). DeepSpeed owns backward, gradient accumulation, clipping
and the optimizer step (``engine.backward(loss); engine.step()`` per micro-batch, as DeepSpeedExamples'
``train_bert_ds.py``).

Training loss per micro-batch, every weight from :class:`~fcd_ds.config.DistillArguments` (0 = off)::

    ce_weight * task loss
    + fcd_weight * sum_p w_p * (alpha * L_tok_p + beta * L_seq_p) / sum_p w_p      (--layer_map pairs p)
    + hidden_mse_weight * sum_p w_p * MSE(W h_s_p, h_t_p) / sum_p w_p              (--layer_map pairs p)
    + minilm_weight * sum_q w_q * (KL_QQ + KL_KK + KL_VV)_q / sum_q w_q            (--minilm_layer_map pairs q)
    + kd_weight * (task's logit KD, T^2 KL(teacher || student) at temperature T)
    + dist_weight * DIST(student logits, teacher logits)

With ``--fused_logit_loss`` (default) on a causal LM without DIST, the CE and KD terms are computed
inside the student's LM head a chunk of tokens at a time (:class:`~fcd_ds.fused_head.FusedLogitHead`):
same values, no (B, N, V) logits of either model.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import ExitStack, nullcontext
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.profiler import record_function

from .config import FCD_STACK_PAIRS
from .distributed import all_reduce_host
from .early_exit import EarlyExit
from .features import AttentionCapture, FeatureCapture
from .fused_head import FusedLogitHead
from .layer_map import LayerPair
from .losses import causal_lm_loss, dist_loss, fcd_pair_terms, hidden_mse_loss, minilm_loss
from .projections import hidden_projection

__all__ = ["DistillEngine", "TeacherView", "causal_lm_loss"]


def _sync() -> None:
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()


class TeacherView(NamedTuple):
    """What one teacher forward gives the losses (no gradient)."""

    features: dict  # {block: (B, N, C_t)} of the --layer_map blocks
    attention: dict  # {block: (q, k, v)}, each (B, N, C_kind), of the --minilm_layer_map blocks
    outputs: object  # the head's outputs (logits) when a logit term is on, else None


def _recording(*captures):
    stack = ExitStack()
    for c in captures:
        if c is not None:
            stack.enter_context(c.recording())
    return stack


def _first_output_tensor(outputs) -> torch.Tensor | None:
    for value in (outputs.values() if hasattr(outputs, "values") else outputs):
        if torch.is_tensor(value) and value.requires_grad:
            return value
    return None


def _pair_mean(pairs: list[LayerPair], values: list[torch.Tensor]) -> torch.Tensor:
    return sum(p.weight * v for p, v in zip(pairs, values)) / sum(p.weight for p in pairs)


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
        feats, attn = distill.uses_block_features, distill.uses_attention
        self.student_capture = FeatureCapture(student.module, [p.student for p in pairs]) if feats else None
        self.teacher_capture = FeatureCapture(teacher.module, [p.teacher for p in pairs]) if feats else None
        self.student_attention = AttentionCapture(student.module, [p.student for p in self.attention_pairs]) if attn else None
        self.teacher_attention = AttentionCapture(teacher.module, [p.teacher for p in self.attention_pairs]) if attn else None
        self.projection = hidden_projection(student.module)
        # Without a logit term the teacher runs only to the deepest block a loss reads (no norm, no head).
        needed = [p.teacher for p in pairs if feats] + [p.teacher for p in self.attention_pairs if attn]
        self.teacher_exit = (EarlyExit(teacher.module, max(needed) + 1)
                             if teacher is not None and needed and not distill.uses_teacher_logits else None)
        # Whether the student's head output feeds a loss; if not, a causal LM computes one position's logits.
        self.student_logits = bool(distill.ce_weight or distill.uses_teacher_logits)
        # CE and KD inside the heads, chunk by chunk (no B x N x V logits); DIST needs whole logits.
        fused = distill.fused_logit_loss and task.fused_logit_loss and not distill.dist_weight and (distill.ce_weight or distill.kd_weight)
        self.fused_head = (FusedLogitHead(student.module, teacher.module if distill.kd_weight else None, ce_weight=distill.ce_weight,
                                          kd_weight=distill.kd_weight, temperature=distill.kd_temperature) if fused else None)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.student.device) for k, v in batch.items()}

    @property
    def needs_teacher(self) -> bool:
        """Whether training runs the teacher at all (False for the task loss alone)."""
        return self.teacher is not None and self.args.uses_teacher

    @torch.no_grad()
    def teacher_forward(self, batch: dict) -> TeacherView:
        """Teacher block features and attention vectors that the losses need, and the head's outputs
        only when a logit term (kd, dist) is on. Always through the teacher's DeepSpeed engine (ZeRO-3
        keeps its parameter-fetch trace and prefetching); without a logit term, only as deep as the
        deepest block a loss reads (:class:`~fcd_ds.early_exit.EarlyExit`)."""
        logits = self.args.uses_teacher_logits
        inputs = self.task.model_inputs(batch, logits=logits)
        cut = self.teacher_exit.active() if self.teacher_exit is not None else nullcontext()
        head = self.fused_head.teacher_hidden() if self.fused_head is not None else nullcontext()  # logits -> (B, N, C_t)
        with _recording(self.teacher_capture, self.teacher_attention), cut, head:
            outputs = self.teacher(**inputs)
        feats = dict(self.teacher_capture.features) if self.teacher_capture is not None else {}
        attn = dict(self.teacher_attention.features) if self.teacher_attention is not None else {}
        return TeacherView(feats, attn, outputs if logits else None)

    def losses(self, batch: dict, teacher: TeacherView | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Student forward and every loss term that is on. Returns ``(total, terms)``; ``terms`` holds the
        unweighted float32 scalars ``loss/<term>`` (``loss/ce`` is the task loss), per layer pair
        ``fcd/<pair>/token``, ``fcd/<pair>/sequence``, ``hidden_mse/<pair>``, ``minilm/<pair>``, and ``loss/total``."""
        mask = batch["attention_mask"]
        a, w = self.args, self.args.weights
        fused = nullcontext([])
        if self.fused_head is not None:  # the head returns the weighted CE + KD loss instead of logits
            t_hidden = teacher.outputs.logits if w["kd"] else None  # (B, N, C_t): the teacher's head was an identity
            fused = self.fused_head.student_loss(batch["input_ids"], self.task.ce_mask(batch), t_hidden, kd_mask=self.task.kd_mask(batch))
        with _recording(self.student_capture, self.student_attention), fused as fused_out:
            outputs = self.student(**self.task.model_inputs(batch, logits=self.student_logits))
        feats = self.student_capture.features if self.student_capture is not None else {}
        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros((), dtype=torch.float32, device=mask.device)
        used_outputs = False
        if fused_out:
            logit_terms = fused_out[0]
            # The head's returned output, not logit_terms.loss: ZeRO-3's backward hooks sit on that output.
            total, used_outputs = total + outputs.logits, True  # already ce_weight * ce + kd_weight * kd
            for term in ("ce", "kd"):
                if getattr(logit_terms, term) is not None:
                    terms[f"loss/{term}"] = getattr(logit_terms, term)
        elif w["ce"]:
            with record_function("loss/ce"):
                task_loss = self.task.task_loss(outputs, batch)
            if task_loss is not None:
                terms["loss/ce"], used_outputs = task_loss, True
        if w["fcd"]:
            values = []
            with record_function("loss/fcd"):  # the pairs stacked: one set of kernels for several pairs
                pair_terms = fcd_pair_terms([feats[p.student] for p in self.pairs], [teacher.features[p.teacher] for p in self.pairs],
                                            mask, alpha=a.fcd_alpha, beta=a.fcd_beta, sequence_relation=a.fcd_sequence_relation,
                                            global_batch=a.fcd_global_batch, chunk_size=a.fcd_chunk_size,
                                            stack=FCD_STACK_PAIRS[a.fcd_stack_pairs])
            for p, t in zip(self.pairs, pair_terms):
                terms[f"fcd/{p.name}/token"], terms[f"fcd/{p.name}/sequence"] = t.token, t.sequence
                values.append(a.fcd_alpha * t.token + a.fcd_beta * t.sequence)
            terms["loss/fcd"] = _pair_mean(self.pairs, values)
        if w["hidden_mse"]:
            values = []
            for p in self.pairs:
                h_s = feats[p.student] if self.projection is None else self.projection(feats[p.student])  # (B, N, C_t)
                terms[f"hidden_mse/{p.name}"] = hidden_mse_loss(h_s, teacher.features[p.teacher], mask)
                values.append(terms[f"hidden_mse/{p.name}"])
            terms["loss/hidden_mse"] = _pair_mean(self.pairs, values)
        if w["minilm"]:
            values = []
            for p in self.attention_pairs:
                terms[f"minilm/{p.name}"] = minilm_loss(self.student_attention.features[p.student], teacher.attention[p.teacher],
                                                        mask, num_heads=a.minilm_relation_heads)
                values.append(terms[f"minilm/{p.name}"])
            terms["loss/minilm"] = _pair_mean(self.attention_pairs, values)
        if w["kd"] and not fused_out:
            with record_function("loss/kd"):
                terms["loss/kd"], used_outputs = self.task.kd_loss(outputs, teacher.outputs, batch, a.kd_temperature), True
        if w["dist"]:
            s_logits, sample_mask = self.task.distill_logits(outputs, batch)
            t_logits, _ = self.task.distill_logits(teacher.outputs, batch)
            terms["loss/dist"] = dist_loss(s_logits, t_logits, sample_mask, temperature=a.dist_temperature,
                                           inter_weight=a.dist_inter_weight, intra_weight=a.dist_intra_weight)
            used_outputs = True
        for term, weight in w.items():
            if weight and f"loss/{term}" in terms and not (fused_out and term in ("ce", "kd")):
                total = total + weight * terms[f"loss/{term}"]
        if not used_outputs:
            # DeepSpeed starts its backward bookkeeping (ZeRO's enter_backward, the accumulation boundary)
            # from hooks on the forward's outputs; a loss of intermediate features alone would never fire
            # them. A zero-weighted tie through the (one-position, when possible) output fires them.
            tie = _first_output_tensor(outputs)
            if tie is not None:
                total = total + 0.0 * tie.float().sum()
        if self.student_capture is not None:
            self.student_capture.features = {}  # the graph keeps what backward needs
        if self.student_attention is not None:
            self.student_attention.features = {}
        terms["loss/total"] = total
        return total, terms

    def train_step(self, micro_batches) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches from ``micro_batches``.

        Returns:
            Mean of every loss term over the micro-batches, plus seconds spent in ``time/teacher_forward``,
            ``time/student_forward_backward`` and ``time/optimizer_step`` (accelerator-synchronised),
            ``tokens`` (this rank's real tokens in the step, from the attention masks) and ``loss_tokens``
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
            total, terms = self.losses(batch, view)
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
            sums["loss_tokens"] += self.task.loss_tokens(batch)
        return dict(sums)

    @torch.no_grad()
    def evaluate(self, which: str, batches: list[dict], interrupt=None) -> dict[str, float]:
        """Held-out metrics of ``"student"`` or ``"teacher"`` over every rank's ``batches`` (the task's
        :meth:`~fcd_ds.tasks.Task.metrics` of the statistics gathered from all ranks). When the task has no
        metric of its own (a headless task-agnostic run), the student's held-out feature-level
        distillation losses instead: ``fcd``, ``hidden_mse``, ``minilm`` (those that are on). Collective.

        Args:
            interrupt: called after every batch on every rank (all ranks have the same number of
                batches), e.g. :meth:`fcd_ds.preemption.StopFlag.check`, which raises to stop early.
        """
        engine = self.student if which == "student" else self.teacher
        was_training = engine.module.training
        engine.eval()
        collected: dict[str, list[torch.Tensor]] = defaultdict(list)
        held_out = [t for t in ("fcd", "hidden_mse", "minilm") if self.args.weights[t]]
        held_out = held_out if not self.task.metric_names and which == "student" else []
        sums = torch.zeros(len(held_out) + 1, dtype=torch.float64)  # (sum of each term over batches, batches)
        try:
            for batch in batches:
                batch = self._to_device(batch)
                if held_out:
                    _, terms = self.losses(batch, self.teacher_forward(batch))
                    sums += torch.tensor([terms[f"loss/{t}"].item() for t in held_out] + [1.0], dtype=torch.float64)
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
