"""The distillation objective: what one micro-batch's loss is, whoever runs the optimizer.

:class:`DistillObjective` holds everything between a batch and the training loss: the capture hooks
on the two models' blocks (:mod:`fcd_ds.features`), the teacher's early exit, the fused logit head,
the layer maps, the loss settings and the task. It calls the models it is given (a ``DeepSpeedEngine``,
or the model a ``transformers.Trainer`` hands to ``compute_loss``) and never steps an optimizer, so
fcd_ds's own loop (:class:`~fcd_ds.engine.DistillEngine`) and the Hugging Face Trainer
(:class:`~fcd_ds.integrations.FCDTrainer`) compute the same losses through the same code.

Training loss per micro-batch, every weight from :class:`~fcd_ds.config.DistillArguments` (0 = off)::

    ce_weight * task loss
    + fcd_weight * sum_p w_p * (alpha * L_tok_p + beta * L_seq_p) / sum_p w_p      (--layer_map pairs p)
    + hidden_mse_weight * sum_p w_p * MSE(W h_s_p, h_t_p) / sum_p w_p              (--layer_map pairs p)
    + minilm_weight * sum_q w_q * (KL_QQ + KL_KK + KL_VV)_q / sum_q w_q            (--minilm_layer_map pairs q)
    + kd_weight * (task's logit KD, T^2 KL(teacher || student) at temperature T)
    + dist_weight * DIST(student logits, teacher logits)

With ``--fused_logit_loss`` (default) on a causal LM without DIST, the CE and KD terms are computed
inside the student's LM head a chunk of tokens at a time (:class:`~fcd_ds.fused_head.FusedLogitHead`):
same values, no (B, N, V) logits of either model. The head then returns ``ce_weight * ce + kd_weight *
kd`` itself; :func:`weighted_total` is the one place where the terms are weighted and summed.
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function

from .config import FEATURE_TERMS, LOGIT_TERMS, WEIGHT_SCHEDULES
from .data import pad_batch_to
from .early_exit import EarlyExit
from .features import AttentionCapture, FeatureCapture
from .fused_head import FusedLogitHead
from .layer_map import LayerPair
from .losses import FCD_STACK_PAIRS, dist_loss, fcd_pair_terms, hidden_mse_loss, minilm_loss
from .projections import hidden_projection
from .runtime.distributed import all_reduce_host

__all__ = ["DistillObjective", "TeacherView", "weighted_total", "balancer_scale", "FUSED_TERMS"]

FUSED_TERMS = ("ce", "kd")  # the terms the fused logit head computes and weights inside the student's head


class TeacherView(NamedTuple):
    """What one teacher forward gives the losses (no gradient)."""

    features: dict  # {block: (B, N, C_t)} of the --layer_map blocks
    attention: dict  # {block: (q, k, v)}, each (B, N, C_kind), of the --minilm_layer_map blocks
    outputs: object  # the head's outputs (logits; (B, N, C_t) hidden states under the fused head) when a logit term is on, else None


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


def balancer_scale(terms: dict[str, torch.Tensor], weights: dict[str, float], fraction: float) -> torch.Tensor | None:
    """``--loss_balancer``'s factor on the feature terms: ``fraction * logit / feature``, not differentiated, where
    ``logit`` and ``feature`` are the weighted sums of the :data:`~fcd_ds.config.LOGIT_TERMS` and
    :data:`~fcd_ds.config.FEATURE_TERMS` present in ``terms`` (0-dim float32 ``loss/<term>``). After it, the
    feature terms add ``fraction`` times the logit loss to the total, whatever their own scale; their gradient
    direction is kept. The idea of NVIDIA ModelOpt's ``LogitsAndIntermediatesLossBalancer`` (Model Optimizer,
    torch/distill/plugins/megatron.py: the intermediate loss rescaled to the logit loss, fraction 1), without
    its second rescaling of the distillation loss to the task loss.

    Returns:
        0-dim float32 tensor without gradient, or None when ``fraction`` is 0, a side is absent, or the
        feature loss is 0 (nothing to rescale: the weights apply unchanged).
    """
    if not fraction:
        return None
    def side(names):  # noqa: E306
        present = [weights[t] * terms[f"loss/{t}"].detach().float() for t in names if weights.get(t) and f"loss/{t}" in terms]
        return sum(present) if present else None
    logit, feature = side(LOGIT_TERMS), side(FEATURE_TERMS)
    if logit is None or feature is None or not feature > 0:
        return None
    return fraction * logit / feature


def weighted_total(terms: dict[str, torch.Tensor], weights: dict[str, float], fused: torch.Tensor | None = None,
                   feature_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss: ``sum_t weights[t] * terms["loss/" + t]`` over the terms that are on.

    Args:
        terms: unweighted 0-dim float32 losses ``loss/<term>`` (a term that is off or has no value is absent).
        weights: ``{term: weight}`` (:attr:`~fcd_ds.config.DistillArguments.weights`).
        fused: the fused logit head's output, already ``ce_weight * ce + kd_weight * kd`` (0-dim); when
            given, :data:`FUSED_TERMS` in ``terms`` are reported values only and are not added again.
            ZeRO-3's backward hooks sit on this tensor, so it is the one that must reach backward.
        feature_scale: a factor on the :data:`~fcd_ds.config.FEATURE_TERMS` (:func:`balancer_scale`), or None.

    Returns:
        0-dim float32 tensor.
    """
    total = fused.float() if fused is not None else None
    for term, weight in weights.items():
        key = f"loss/{term}"
        if weight and key in terms and not (fused is not None and term in FUSED_TERMS):
            value = weight * terms[key] if feature_scale is None or term not in FEATURE_TERMS else feature_scale * weight * terms[key]
            total = value if total is None else total + value
    return total if total is not None else torch.zeros((), dtype=torch.float32)


class DistillObjective:
    """Hooks, layer maps and loss settings of one student-teacher pair; computes a micro-batch's loss.

    Args:
        student: the student model (``nn.Module``; a ``DeepSpeedEngine``'s ``.module``, the model given
            to a Trainer). Hooks are registered on it once; a hidden-MSE projection, when the widths
            differ, is its submodule (:mod:`fcd_ds.projections`).
        teacher: the teacher model (``nn.Module``, frozen), or None for fine-tuning (task loss only).
        pairs: the ``--layer_map`` (:class:`~fcd_ds.layer_map.LayerPair` list) of fcd and hidden_mse.
        distill: :class:`~fcd_ds.config.DistillArguments` (resolved weights). task: a :class:`~fcd_ds.tasks.Task`.
        attention_pairs: the ``--minilm_layer_map`` of minilm.

    Raises:
        ValueError: from :class:`~fcd_ds.fused_head.FusedLogitHead` when a model's head cannot run
            fused logit losses.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, pairs: list[LayerPair], distill, task,
                 attention_pairs: list[LayerPair] = ()):
        self.pairs = list(pairs)
        self.attention_pairs = list(attention_pairs)
        self.args = distill
        self.progress = 0.0  # steps done / max_steps, set by the training loop: --fcd_weight_schedule reads it
        self.task = task
        feats, attn = distill.uses_block_features, distill.uses_attention
        self.student_capture = FeatureCapture(student, [p.student for p in self.pairs]) if feats else None
        self.teacher_capture = FeatureCapture(teacher, [p.teacher for p in self.pairs]) if feats else None
        self.student_attention = AttentionCapture(student, [p.student for p in self.attention_pairs]) if attn else None
        self.teacher_attention = AttentionCapture(teacher, [p.teacher for p in self.attention_pairs]) if attn else None
        self.projection = hidden_projection(student)
        # Without a logit term the teacher runs only to the deepest block a loss reads (no norm, no head).
        needed = [p.teacher for p in self.pairs if feats] + [p.teacher for p in self.attention_pairs if attn]
        self.teacher_exit = (EarlyExit(teacher, max(needed) + 1)
                             if teacher is not None and needed and not distill.uses_teacher_logits else None)
        # Whether the student's head output feeds a loss; if not, a causal LM computes one position's logits.
        self.student_logits = bool(distill.ce_weight or distill.uses_teacher_logits)
        # CE and KD inside the heads, chunk by chunk (no B x N x V logits); DIST needs whole logits.
        fused = distill.fused_logit_loss and task.fused_logit_loss and not distill.dist_weight and (distill.ce_weight or distill.kd_weight)
        self.fused_head = (FusedLogitHead(student, teacher if distill.kd_weight else None, ce_weight=distill.ce_weight,
                                          kd_weight=distill.kd_weight, temperature=distill.kd_temperature) if fused else None)

    def term_grad_norms(self, terms: dict, weights: dict, fused: torch.Tensor | None, scale: torch.Tensor | None,
                        feats: dict) -> dict[str, torch.Tensor]:
        """L2 norm of each weighted term's gradient with respect to each ``--layer_map`` student block output,
        as it enters the total (``--loss_balancer``'s factor included): ``grad_norm/<term>/s<block>``, 0-dim
        float32; under the fused head CE and KD are one tensor, ``grad_norm/ce+kd/s<block>``. Norms over this
        rank's micro-batch, (B, N, C) each. One ``torch.autograd.grad`` per term, the graph kept for the
        training backward; a term whose gradient does not reach a block gives 0 there. ``student`` must have
        run as the model itself, not through its DeepSpeed engine (see :meth:`losses`).
        """
        blocks = sorted({p.student for p in self.pairs if p.student in feats})
        inputs = [feats[i] for i in blocks]
        parts = {"ce+kd": fused} if fused is not None else {}
        for term, weight in weights.items():
            key = f"loss/{term}"
            if weight and key in terms and not (fused is not None and term in FUSED_TERMS):
                parts[term] = weight * terms[key] * (scale if scale is not None and term in FEATURE_TERMS else 1.0)
        out = {}
        for term, value in parts.items():
            if not (inputs and value.requires_grad):
                continue
            grads = torch.autograd.grad(value, inputs, retain_graph=True, allow_unused=True)
            for i, g in zip(blocks, grads):
                out[f"grad_norm/{term}/s{i}"] = g.detach().float().norm() if g is not None else torch.zeros(())
        return out

    def equal_lengths(self, batch: dict, pad_id: int) -> dict:
        """``batch`` padded to the longest N of any rank when FCD's global-batch sequence relation is on over
        several ranks (it relates the (B, N, C) features of every rank, so N must agree); else as it is.
        Collective then (one all-reduce of N): call it on every rank for every batch.

        Args:
            batch: (B, N) tensors (``input_ids``, masks, ...). pad_id: what pads ``input_ids``
                (:func:`~fcd_ds.data.pad_batch_to`).
        """
        a = self.args
        if not (a.uses_fcd and a.fcd_global_batch and a.fcd_beta and dist.is_initialized() and dist.get_world_size() > 1):
            return batch
        n = all_reduce_host(torch.tensor([batch["input_ids"].shape[1]]), op=dist.ReduceOp.MAX)
        return pad_batch_to(batch, int(n.item()), pad_id)

    @torch.no_grad()
    def teacher_forward(self, teacher: Callable, batch: dict) -> TeacherView:
        """Teacher block features and attention vectors that the losses need, and the head's outputs
        only when a logit term (kd, dist) is on; without one, only as deep as the deepest block a loss
        reads (:class:`~fcd_ds.early_exit.EarlyExit`).

        Args:
            teacher: what runs the teacher's forward: its ``DeepSpeedEngine`` (ZeRO-3 keeps its
                parameter-fetch trace and prefetching) or the model itself.
            batch: the task's batch on the teacher's device.
        """
        logits = self.args.uses_teacher_logits
        inputs = self.task.model_inputs(batch, logits=logits)
        cut = self.teacher_exit.active() if self.teacher_exit is not None else nullcontext()
        head = self.fused_head.teacher_hidden() if self.fused_head is not None else nullcontext()  # logits -> (B, N, C_t)
        with _recording(self.teacher_capture, self.teacher_attention), cut, head:
            outputs = teacher(**inputs)
        feats = dict(self.teacher_capture.features) if self.teacher_capture is not None else {}
        attn = dict(self.teacher_attention.features) if self.teacher_attention is not None else {}
        return TeacherView(feats, attn, outputs if logits else None)

    def losses(self, student: Callable, batch: dict, teacher: TeacherView | None, *,
               grad_norms: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor], object]:
        """Student forward and every loss term that is on.

        Args:
            student: what runs the student's forward (its ``DeepSpeedEngine``, or the model).
            batch: the task's batch (``input_ids`` (B, N), ``attention_mask`` (B, N), ...).
            teacher: :meth:`teacher_forward`'s view, or None when no term reads the teacher.
            grad_norms: also return ``grad_norm/<term>/s<block>`` (:meth:`term_grad_norms`).

        Returns:
            ``(total, terms, outputs)``: the 0-dim float32 training loss; the unweighted float32 scalars
            ``loss/<term>`` (``loss/ce`` is the task loss), per layer pair ``fcd/<pair>/token``,
            ``fcd/<pair>/sequence``, ``hidden_mse/<pair>``, ``minilm/<pair>``, and ``loss/total``; and the
            student's outputs (under the fused head, ``outputs.logits`` is the weighted CE + KD loss).
        """
        norms = {}
        if grad_norms:
            # A forward of the model itself (no DeepSpeed engine: its output hooks would start the ZeRO backward
            # bookkeeping for each term), the random state forked so that its dropout masks are the training
            # forward's and training draws the same numbers as without the measurement.
            module = getattr(student, "module", student)
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices):
                norms = {k: v for k, v in self._losses(module, batch, teacher, measure=True)[1].items() if k.startswith("grad_norm/")}
        total, terms, outputs = self._losses(student, batch, teacher)
        terms.update(norms)
        return total, terms, outputs

    def _losses(self, student: Callable, batch: dict, teacher: TeacherView | None, measure: bool = False):
        """:meth:`losses`' work; with ``measure`` its terms also hold :meth:`term_grad_norms`."""
        mask = batch["attention_mask"]
        a, w = self.args, self.args.weights
        terms: dict[str, torch.Tensor] = {}
        w_now = dict(w)  # the weights of this step: --fcd_weight_schedule on fcd's, after --loss_balancer's scale
        if w["fcd"] and a.fcd_weight_schedule != "constant":
            w_now["fcd"] = w["fcd"] * WEIGHT_SCHEDULES[a.fcd_weight_schedule](self.progress)
            terms["weight/fcd"] = torch.tensor(w_now["fcd"])
        fused = nullcontext([])
        if self.fused_head is not None:  # the head returns the weighted CE + KD loss instead of logits
            t_hidden = teacher.outputs.logits if w["kd"] else None  # (B, N, C_t): the teacher's head was an identity
            fused = self.fused_head.student_loss(batch["input_ids"], self.task.ce_mask(batch), t_hidden, kd_mask=self.task.kd_mask(batch))
        with _recording(self.student_capture, self.student_attention), fused as fused_out:
            outputs = student(**self.task.model_inputs(batch, logits=self.student_logits))
        feats = self.student_capture.features if self.student_capture is not None else {}
        # The head's returned output, not fused_out[0].loss: ZeRO-3's backward hooks sit on that output.
        fused_loss = outputs.logits if fused_out else None
        used_outputs = fused_loss is not None
        if fused_out:
            for term in FUSED_TERMS:
                if getattr(fused_out[0], term) is not None:
                    terms[f"loss/{term}"] = getattr(fused_out[0], term)
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
                                            sequence_positions=a.fcd_sequence_positions or None,
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
        scale = balancer_scale(terms, w, a.loss_balancer)
        if scale is not None:
            terms["balancer/feature_scale"] = scale
        total = weighted_total(terms, w_now, fused_loss, scale).to(mask.device)
        if not used_outputs:
            # DeepSpeed starts its backward bookkeeping (ZeRO's enter_backward, the accumulation boundary)
            # from hooks on the forward's outputs; a loss of intermediate features alone would never fire
            # them. A zero-weighted tie through the (one-position, when possible) output fires them.
            tie = _first_output_tensor(outputs)
            if tie is not None:
                total = total + 0.0 * tie.float().sum()
        if measure:
            terms.update(self.term_grad_norms(terms, w_now, fused_loss, scale, feats))
        if self.student_capture is not None:
            self.student_capture.features = {}  # the graph keeps what backward needs
        if self.student_attention is not None:
            self.student_attention.features = {}
        terms["loss/total"] = total
        return total, terms, outputs
