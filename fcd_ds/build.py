"""Build the student and teacher DeepSpeed engines.

* student: trains under the user's DeepSpeed JSON (ZeRO 0-3, optimizer, scheduler, clipping,
  accumulation, precision all from it); activation checkpointing from ``--gradient_checkpointing`` or
  the JSON's ``activation_checkpointing`` section.
* teacher: its own optimizer-less engine from :func:`~fcd_ds.ds_config.teacher_ds_config`: ZeRO-3
  sharded over the ranks when the student runs stage 3 (built already partitioned through
  ``HfDeepSpeedConfig``, so no rank ever holds it whole), stage 0 otherwise; ``eval()``, no gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .ds_config import bf16_enabled, fp16_enabled, teacher_ds_config, zero_stage
from .models import load_config, load_model, prune_teacher
from .projections import attach_hidden_projection

__all__ = [
    "model_dtype",
    "uses_activation_checkpointing",
    "student_model",
    "teacher_model",
    "build_student_engine",
    "build_teacher_engine",
    "local_param_numel",
    "gather_param_shares",
    "current_loss_scale",
]


def model_dtype(ds_cfg: dict) -> torch.dtype:
    """The models' parameter dtype: bfloat16 or float16 when the JSON enables bf16 or fp16 (``--bf16``,
    ``--fp16``; DeepSpeed keeps the float32 master weights), else float32."""
    return torch.bfloat16 if bf16_enabled(ds_cfg) else torch.float16 if fp16_enabled(ds_cfg) else torch.float32


def uses_activation_checkpointing(model_args, ds_cfg: dict) -> bool:
    """Whether the student recomputes its blocks in backward: ``--gradient_checkpointing`` or the JSON's
    ``activation_checkpointing`` section."""
    return bool(model_args.gradient_checkpointing) or "activation_checkpointing" in ds_cfg


def _enable_activation_checkpointing(model, ds_cfg: dict) -> None:
    import deepspeed

    if "activation_checkpointing" in ds_cfg:
        # DeepSpeed's own checkpointing, configured by the JSON section. Its non-reentrant form: the
        # reentrant one runs blocks under no_grad, so the features our forward hooks capture inside a
        # block would carry no gradient and FCD would silently not train the student.
        deepspeed.checkpointing.configure(None, deepspeed_config=ds_cfg)
        model._set_gradient_checkpointing(
            enable=True, gradient_checkpointing_func=deepspeed.checkpointing.non_reentrant_checkpoint
        )
        model.enable_input_require_grads()
    else:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def student_model(model_args, teacher_path: str | None, teacher_config, dtype: torch.dtype, task):
    """The student module, before DeepSpeed: pretrained (``--student``), fresh from a config
    (``--student_config``) or the depth-pruned teacher (``--student_num_layers``), with the task's Auto class
    and config updates, in ``dtype``, with ``--attn_implementation``, ``--revision``, ``--trust_remote_code``
    and ``--use_safetensors`` applied. A ZeRO-3 ``HfDeepSpeedConfig`` alive around the call partitions a
    pretrained or config-built student as it is built."""
    updates = task.config_updates()
    common = {"trust_remote_code": model_args.trust_remote_code, "revision": model_args.revision}
    attn = model_args.attn_implementation
    if model_args.student is not None:
        return load_model(model_args.student, task.auto_class, dtype, "--student", updates, use_safetensors=model_args.use_safetensors,
                          attn_implementation=attn, **common)
    if model_args.student_config is not None:
        cfg = load_config(model_args.student_config, "--student_config", **common)
        for key, value in updates.items():
            setattr(cfg, key, value)
        return task.auto_class.from_config(cfg, dtype=dtype, trust_remote_code=model_args.trust_remote_code, attn_implementation=attn)
    # pruned: built whole on CPU (smaller than the teacher), partitioned by deepspeed.initialize
    return prune_teacher(teacher_path, teacher_config, model_args.student_num_layers, dtype, task.auto_class, updates,
                         revision=model_args.revision, attn_implementation=attn)


def teacher_model(teacher_path: str, dtype: torch.dtype, task, model_args=None):
    """The teacher module, before DeepSpeed: ``from_pretrained`` with the task's Auto class in ``dtype``;
    ``model_args`` gives ``--attn_implementation``, ``--revision``, ``--trust_remote_code`` and
    ``--use_safetensors`` (default: transformers' choice, main, off, on)."""
    return load_model(teacher_path, task.auto_class, dtype, "--teacher",
                      trust_remote_code=getattr(model_args, "trust_remote_code", False), use_safetensors=getattr(model_args, "use_safetensors", True),
                      revision=getattr(model_args, "revision", None), attn_implementation=getattr(model_args, "attn_implementation", None))


def build_student_engine(model_args, teacher_path: str | None, teacher_config, ds_cfg: dict, task, projection_width: int | None = None):
    """Student model (pretrained, fresh from a config, or depth-pruned teacher) wrapped by ``deepspeed.initialize``.

    Args:
        model_args: :class:`~fcd_ds.config.ModelArguments` with exactly one student source set.
        teacher_path: teacher folder (for pruning). teacher_config: its config. ds_cfg: resolved JSON.
        task: the :class:`~fcd_ds.tasks.Task`: its Auto class and config updates (labels) build the model.
        projection_width: hidden-MSE is on: the teacher's width, which the student's hidden states are
            projected to by a learned linear layer (:mod:`fcd_ds.projections`) when it differs from the student's.

    Returns:
        The student ``DeepSpeedEngine`` (optimizer and LR scheduler inside).
    """
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds = HfDeepSpeedConfig(ds_cfg) if zero_stage(ds_cfg) == 3 and model_args.student_num_layers is None else None
    model = student_model(model_args, teacher_path, teacher_config, model_dtype(ds_cfg), task)
    del hf_ds  # later models are built whole unless they ask for ZeRO-3 themselves
    model.config.use_cache = False
    if projection_width is not None:
        attach_hidden_projection(model, model.config.hidden_size, projection_width)
    if uses_activation_checkpointing(model_args, ds_cfg):
        _enable_activation_checkpointing(model, ds_cfg)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_cfg)
    return engine


def build_teacher_engine(teacher_path: str, student_ds_cfg: dict, task, offload: str | None = None, model_args=None):
    """Frozen teacher engine (see module docstring), loaded with the task's Auto class; ``offload`` is
    ``--teacher_offload`` (:func:`~fcd_ds.ds_config.teacher_ds_config`); ``model_args`` as
    :func:`teacher_model`. Returns the ``DeepSpeedEngine`` in eval mode."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    cfg = teacher_ds_config(student_ds_cfg, offload)
    hf_ds = HfDeepSpeedConfig(cfg) if zero_stage(cfg) == 3 else None  # from_pretrained builds it partitioned
    model = teacher_model(teacher_path, model_dtype(student_ds_cfg), task, model_args)
    del hf_ds
    model.config.use_cache = False
    model.requires_grad_(False)
    model.eval()
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    engine.eval()
    return engine


def local_param_numel(module) -> tuple[int, int]:
    """``(local, total)`` parameter elements: ``local`` is what this rank holds (its ZeRO-3 shard,
    ``ds_tensor``, for partitioned parameters), ``total`` the full model's count."""
    local = total = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):
            local += p.ds_tensor.numel()
            total += p.ds_numel
        else:
            local += p.numel()
            total += p.numel()
    return local, total


def gather_param_shares(module) -> list[int]:
    """Every rank's :func:`local_param_numel` ``local`` count (collective)."""
    local, _ = local_param_numel(module)
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, local)
    return counts


def current_loss_scale(engine) -> float | None:
    """DeepSpeed's current fp16 loss scale (the ``loss_scale`` property that its FP16 optimizers and ZeRO
    1-3 optimizers share: dynamic, so it halves on an overflow and grows after ``loss_scale_window`` clean
    steps), or None when the engine does not scale (fp32, bf16)."""
    if not engine.fp16_enabled():
        return None
    scale = getattr(engine.optimizer, "loss_scale", None)
    return None if scale is None else float(scale)
