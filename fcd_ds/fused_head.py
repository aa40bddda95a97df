"""Run a causal LM's cross-entropy and logit KD inside its LM head, a chunk of tokens at a time.

The plain path asks the student for its (B, N, V) logits and the teacher for its (B, N, V) logits and
computes the losses on them (V = 49,152 for SmolLM2: 192 MiB of float32 logits per 1,024 tokens and
model, plus the softmax and gradient copies). With :class:`FusedLogitHead`:

* the teacher's head is an identity for its forward, so its "logits" are its last hidden states
  (B, N, C_t) (after the final norm: what the head reads);
* the student's head ``forward`` computes :func:`~fcd_ds.losses.fused.fused_linear_ce_kd` from its own
  input (the student's last hidden states), its own weight and the teacher's hidden states and head
  weight, and returns the weighted loss (a 0-dim tensor) in place of the logits.

Running the loss inside the head module's own forward is what makes it work under ZeRO-3 unchanged:
DeepSpeed's hooks gather the (possibly tied) head weight before that forward, and re-gather it for the
backward of the module's output, which here is the loss. The teacher's head weight, which the loss
needs but no teacher forward gathers, is gathered read-only around the call
(``deepspeed.zero.GatheredParameters``; a no-op when the teacher is not ZeRO-3). The gradients are
formed during the forward (:mod:`fcd_ds.losses.fused`), so nothing of the teacher is needed in backward.

Only heads that are one ``nn.Linear``-like module with ``weight`` (V, C) and optional ``bias`` (V,)
(transformers' ``get_output_embeddings()`` of Llama, Mistral, Qwen, GPT-2, ...) are covered.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.profiler import record_function

from .early_exit import path_of, swapped_modules
from .losses.fused import DEFAULT_CHUNK_SIZE, FusedLogitLosses, fused_linear_ce_kd, fused_linear_cross_entropy

__all__ = ["FusedLogitHead", "fused_head_problem", "fused_loss_sum"]


def fused_head_problem(model: nn.Module) -> str | None:
    """Why ``model``'s head cannot run the fused losses, or None when it can: it must have output
    embeddings (``get_output_embeddings()``) with a 2-D ``weight`` and a 1-D or absent ``bias``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None)"
    weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
    if not isinstance(weight, torch.Tensor) or len(getattr(weight, "ds_shape", weight.shape)) != 2:
        return f"its head {type(head).__name__} has no 2-D weight"
    if bias is not None and len(getattr(bias, "ds_shape", bias.shape)) != 1:
        return f"its head {type(head).__name__} has a bias that is not 1-D"
    return None


class FusedLogitHead:
    """Next-token CE and logit KD of a causal LM computed in the student's head, chunk by chunk.

    Args:
        student: the student model (a ``DeepSpeedEngine``'s ``.module``).
        teacher: the teacher model, or None when ``kd_weight`` is 0.
        ce_weight, kd_weight: the loss weights (>= 0, not both 0); the returned loss is already weighted.
        temperature: KD temperature T (> 0). chunk_size: tokens per chunk.

    Raises:
        ValueError: a head that :func:`fused_head_problem` rejects, or weights both 0.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, *, ce_weight: float, kd_weight: float,
                 temperature: float, chunk_size: int = DEFAULT_CHUNK_SIZE):
        if not (ce_weight or kd_weight):
            raise ValueError("FusedLogitHead: ce_weight and kd_weight are both 0")
        for name, model in (("student", student), ("teacher", teacher if kd_weight else None)):
            problem = model is not None and fused_head_problem(model)
            if problem:
                raise ValueError(f"FusedLogitHead: the {name} cannot run fused logit losses: {problem}")
        if kd_weight and teacher is None:
            raise ValueError("FusedLogitHead: kd_weight > 0 needs the teacher")
        self.student_head = student.get_output_embeddings()
        self.teacher = teacher if kd_weight else None
        self.ce_weight, self.kd_weight = float(ce_weight), float(kd_weight)
        self.temperature, self.chunk_size = float(temperature), int(chunk_size)

    @contextmanager
    def teacher_hidden(self):
        """While active, the teacher's head is an identity: its outputs' ``logits`` are its last hidden
        states (B, N, C_t), and ZeRO-3 gathers no head weight during its forward. A no-op without KD."""
        if self.teacher is None:
            yield
            return
        with swapped_modules(self.teacher, [(path_of(self.teacher, self.teacher.get_output_embeddings()), nn.Identity())]):
            yield

    @contextmanager
    def student_loss(self, input_ids: torch.Tensor, mask: torch.Tensor, teacher_hidden: torch.Tensor | None,
                     kd_mask: torch.Tensor | None = None):
        """While active, the student's head forward returns the weighted loss (0-dim) instead of logits.

        Args:
            input_ids: (B, N) the batch's token ids (CE targets, shifted by one inside).
            mask: (B, N), 1 = a counted CE target (a real token; with a loss mask, one the loss reads).
            kd_mask: (B, N) positions KD reads (default ``mask``: every attended position).
            teacher_hidden: (B, N, C_t) from a teacher forward under :meth:`teacher_hidden`, or None
                without KD.

        Yields:
            A one-element list that holds the :class:`~fcd_ds.losses.fused.FusedLogitLosses` of the
            forward once it has run (``ce``/``kd`` detached, None when off). Back-propagate the model's
            output ``logits`` (the loss as the head returned it), not ``loss`` from this list: under ZeRO-3
            DeepSpeed's forward hook wraps the returned tensor so that its backward re-gathers the head.
        """
        if self.kd_weight and teacher_hidden is None:
            raise ValueError("FusedLogitHead.student_loss: kd_weight > 0 needs teacher_hidden")
        head, result = self.student_head, []
        t_head = self.teacher.get_output_embeddings() if self.teacher is not None else None

        def forward(hidden: torch.Tensor) -> torch.Tensor:  # hidden: (B, N, C_s), after the final norm
            t_params = [p for p in (t_head.weight, t_head.bias) if p is not None] if t_head is not None else []
            gather = _gathered(t_params) if t_params else nullcontext()
            with gather, record_function("loss/fused_logits"):
                out: FusedLogitLosses = fused_linear_ce_kd(
                    hidden, head.weight, teacher_hidden, t_head.weight if t_head is not None else None,
                    input_ids, mask, temperature=self.temperature, ce_weight=self.ce_weight, kd_weight=self.kd_weight, kd_mask=kd_mask,
                    student_bias=head.bias, teacher_bias=t_head.bias if t_head is not None else None,
                    chunk_size=self.chunk_size)
            result.append(out)
            return out.loss

        head.forward = forward  # an instance attribute: nn.Module.__call__ (and its ZeRO-3 hooks) still run
        try:
            yield result
        finally:
            del head.forward


@contextmanager
def fused_loss_sum(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """While active, ``model``'s LM head returns the summed next-token cross-entropy (0-dim, nats) of
    ``input_ids`` over the targets ``mask`` counts, computed chunk by chunk from its input
    (:func:`~fcd_ds.losses.fused.fused_linear_cross_entropy`, ``reduction="sum"``) instead of its
    (B, N, V) logits: held-out evaluation of a causal LM without the logits. As :meth:`FusedLogitHead.student_loss`,
    the head module itself still runs, so ZeRO-3 gathers its (possibly tied) weight for the call.

    Args:
        model: a causal LM whose head :func:`fused_head_problem` accepts (a ``DeepSpeedEngine``'s ``.module``).
        input_ids: (B, N) token ids. mask: (B, N), 1 = token j is a counted target.

    Raises:
        ValueError: a head :func:`fused_head_problem` rejects.
    """
    problem = fused_head_problem(model)
    if problem:
        raise ValueError(f"fused_loss_sum: {problem}")
    head = model.get_output_embeddings()

    def forward(hidden: torch.Tensor) -> torch.Tensor:  # hidden: (B, N, C), after the final norm
        with record_function("eval/fused_logits"):
            return fused_linear_cross_entropy(hidden, head.weight, input_ids, mask, bias=head.bias, reduction="sum", chunk_size=chunk_size)

    head.forward = forward  # an instance attribute: nn.Module.__call__ (and its ZeRO-3 hooks) still run
    try:
        yield
    finally:
        del head.forward


def _gathered(params: list):
    """Read-only gather of ZeRO-3 partitioned parameters for a ``with`` (a no-op for ordinary ones)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
