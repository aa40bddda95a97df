"""FCD in a ``transformers.Trainer``: :class:`FCDTrainer` and :class:`FCDConfig`.

For teams that already train with the Hugging Face Trainer or TRL on DeepSpeed. Conventions follow
TRL's ``GKDTrainer`` / ``DistillationTrainer``: ``FCDTrainer(model=student, teacher_model=teacher,
args=FCDConfig(...), train_dataset=..., processing_class=tokenizer)``; the teacher is frozen and, under
the Trainer's ``deepspeed`` integration, wrapped in its own optimizer-less DeepSpeed engine (as TRL's
``prepare_deepspeed``), ZeRO-3 sharded over the ranks when the student runs ZeRO-3
(:func:`~fcd_ds.ds_config.teacher_ds_config`, the same rule as fcd_ds's launchers).

The loss is :class:`~fcd_ds.objective.DistillObjective`'s, the code fcd_ds's own engine runs: the same
capture hooks, layer maps, fused logit head and pure loss functions, so the same batch and weights give
the same values. Causal-LM students only (the SFT case); batches are the Trainer's usual ``input_ids``,
``attention_mask`` and ``labels`` (-100 = not a target), or a flattened batch with ``position_ids``
(``DataCollatorWithFlattening``).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from ..config import DistillArguments
from ..runtime.distributed import release_deepspeed_shm_buffer
from ..ds_config import teacher_ds_config
from ..layer_map import parse_layer_map
from ..objective import DistillObjective
from ..plan import check_minilm
from ..projections import attach_hidden_projection
from ..tasks import CausalLMTask

__all__ = ["FCDConfig", "FCDTrainer", "hf_batch", "prepare_teacher"]

IGNORE_INDEX = -100  # transformers' label for "not a target"


@dataclass
class FCDConfig(TrainingArguments, DistillArguments):
    """``transformers.TrainingArguments`` plus fcd_ds's loss settings (:class:`~fcd_ds.config.DistillArguments`:
    ``loss``, the ``<term>_weight`` fields, ``layer_map``, ``fcd_alpha``, ``fcd_beta``,
    ``fcd_sequence_relation``, ``fcd_global_batch``, ``kd_temperature``, ``fused_logit_loss``, ...), as
    TRL's ``GKDConfig`` extends ``SFTConfig``. Parses from the command line with ``HfArgumentParser``
    like any ``TrainingArguments``.

    Raises:
        UsageError (a ``ValueError``): a loss setting out of range (one line naming the field), and
            whatever ``TrainingArguments`` raises.
    """

    def __post_init__(self):
        TrainingArguments.__post_init__(self)
        DistillArguments.__post_init__(self)


def hf_batch(inputs: dict) -> dict:
    """A Trainer batch as :class:`~fcd_ds.tasks.CausalLMTask`'s batch.

    Args:
        inputs: ``input_ids`` (B, N); optional ``attention_mask`` (B, N) (absent: all ones),
            ``labels`` (B, N) with -100 where a token is not a target (transformers' convention: label j
            is the target of position j - 1, the model shifts), and ``position_ids`` (B, N) of a flattened
            batch without an attention mask (packed documents).

    Returns:
        ``input_ids``, ``attention_mask`` and, when labels mask some tokens out, ``loss_mask`` (B, N)
        (1 = token j is a counted target), plus ``position_ids`` for flattened batches.

    Raises:
        ValueError: labels that differ from ``input_ids`` where they are targets (a causal LM's targets
            are its next input ids; fcd_ds's fused loss reads them from ``input_ids``).
    """
    ids = inputs["input_ids"]
    attention = inputs.get("attention_mask")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids) if attention is None else attention}
    if attention is None and inputs.get("position_ids") is not None:
        batch["position_ids"] = inputs["position_ids"]  # flattened documents: transformers' packed-sequence masks
    labels = inputs.get("labels")
    if labels is not None:
        keep = labels != IGNORE_INDEX  # (B, N)
        if bool((labels[keep] != ids[keep]).any()):
            raise ValueError("FCDTrainer: labels differ from input_ids where they are targets; a causal LM's targets are its "
                             "next input ids: set labels to input_ids with -100 where a token is not a target")
        if not bool(keep[batch["attention_mask"].bool()].all()):
            batch["loss_mask"] = keep.to(ids.dtype)
    return batch


def prepare_teacher(teacher: torch.nn.Module, trainer: Trainer):
    """Freeze the teacher and place it for ``trainer``'s run.

    Under the Trainer's DeepSpeed integration: an optimizer-less DeepSpeed engine from
    :func:`~fcd_ds.ds_config.teacher_ds_config` of the Trainer's resolved JSON (ZeRO-3 sharded over the
    ranks when the student runs ZeRO-3, else stage 0; the student's precision), as TRL's
    ``prepare_deepspeed``; "auto" values the Trainer resolves only at ``train()`` are taken from its
    arguments. Otherwise accelerate's ``prepare_model(evaluation_mode=True)`` (device placement, no DDP wrap).

    Returns:
        What runs the teacher's forward: its ``DeepSpeedEngine`` or the placed model.
    """
    teacher.eval()
    teacher.requires_grad_(False)
    accelerator, args = trainer.accelerator, trainer.args
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return accelerator.prepare_model(teacher, evaluation_mode=True)
    import deepspeed

    cfg = copy.deepcopy(plugin.deepspeed_config)
    cfg["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
    cfg["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    cfg["zero_optimization"] = {k: v for k, v in cfg.get("zero_optimization", {}).items() if v != "auto"}  # DeepSpeed's defaults
    for precision in ("bf16", "fp16"):
        if cfg.get(precision, {}).get("enabled") == "auto":
            cfg[precision] = {**cfg[precision], "enabled": bool(getattr(args, precision))}
    engine, *_ = deepspeed.initialize(model=teacher, config=teacher_ds_config(cfg))
    engine.eval()
    return engine


class FCDTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is fcd_ds's distillation objective (CE + FCD by default).

    Args:
        model: the student, a causal LM (``AutoModelForCausalLM``); under ZeRO-3 load it after creating
            the ``FCDConfig`` (``deepspeed=...``) so that ``from_pretrained`` builds it partitioned.
        teacher_model: the frozen teacher (same tokenizer); needed unless ``--loss ce``.
        args: :class:`FCDConfig`. data_collator: default ``DataCollatorForLanguageModeling(mlm=False)``
            of ``processing_class`` (pads, labels -100 on padding).
        train_dataset, eval_dataset, processing_class, **kwargs: as ``transformers.Trainer``.

    Logged with the Trainer's own loss: the mean of every term over the logging interval, averaged over
    ranks, as ``loss/<term>`` (``eval_loss/<term>`` in evaluation), the names fcd_ds's engine uses.

    Raises:
        TypeError: ``args`` is not an :class:`FCDConfig`.
        ValueError: a distillation term without ``teacher_model``; a student that is not a causal LM;
            reentrant gradient checkpointing with a feature loss (its blocks run without autograd, so
            FCD would not train them); from :func:`~fcd_ds.layer_map.parse_layer_map` a layer map
            the two models do not fit.
    """

    def __init__(self, model=None, teacher_model=None, args: FCDConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, **kwargs):
        if not isinstance(args, FCDConfig):
            raise TypeError(f"FCDTrainer: args must be an FCDConfig (TrainingArguments plus the loss settings), got {type(args).__name__}")
        if teacher_model is None and args.uses_teacher:
            raise ValueError(f"FCDTrainer: the loss {'+'.join(t for t, w in args.weights.items() if w)} needs teacher_model; pass it or use loss='ce'")
        if model is None or not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
            raise ValueError("FCDTrainer: model must be a causal LM student (AutoModelForCausalLM) with an LM head")
        # transformers 5 names it activation_checkpointing (gradient_checkpointing: its deprecated alias, mirrored)
        if (getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing) and (args.uses_block_features or args.uses_attention):
            kw = dict(getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs or {})
            if kw.get("use_reentrant", False):
                raise ValueError("FCDTrainer: activation_checkpointing_kwargs use_reentrant=True runs each block without autograd, so "
                                 "feature losses would not train it; use use_reentrant=False")
            for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
                if hasattr(args, name):
                    setattr(args, name, {**kw, "use_reentrant": False})
        if data_collator is None and processing_class is not None:
            data_collator = DataCollatorForLanguageModeling(processing_class, mlm=False)
        n_s = model.config.num_hidden_layers
        n_t = teacher_model.config.num_hidden_layers if teacher_model is not None else n_s
        pairs = parse_layer_map(args.layer_map, n_s, n_t) if args.uses_block_features else []
        attention_pairs = parse_layer_map(args.minilm_layer_map, n_s, n_t, flag="minilm_layer_map") if args.uses_attention else []
        task = CausalLMTask()
        if args.uses_attention:
            check_minilm(args, teacher_model.config, model.config, task)
        if args.hidden_mse_weight:  # a learned projection when the widths differ: trained with the student, saved with it
            attach_hidden_projection(model, model.config.hidden_size, teacher_model.config.hidden_size)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self.loss_is_scaled_for_ga = False  # a per-micro-batch mean, as DistillEngine's: the Trainer divides by accumulation
        self.objective = DistillObjective(model, teacher_model if args.uses_teacher else None, pairs, args, task, attention_pairs)
        self.teacher = prepare_teacher(teacher_model, self) if args.uses_teacher else None
        if self.is_deepspeed_enabled:
            release_deepspeed_shm_buffer()  # DeepSpeed's CPU comm op leaves 66 MiB per rank in /dev/shm otherwise (collective)
        tok = processing_class if processing_class is not None else getattr(data_collator, "tokenizer", None)
        self.pad_id = getattr(tok, "pad_token_id", None) or 0
        self._terms: dict[str, dict[str, list[torch.Tensor]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """The distillation loss of one micro-batch (a per-micro-batch mean: ``loss_is_scaled_for_ga`` is
        False), from :meth:`DistillObjective.losses <fcd_ds.objective.DistillObjective.losses>`.

        Returns:
            The 0-dim loss, or ``(loss, outputs)`` with ``return_outputs``; under the fused logit head
            the outputs carry no logits (``{"loss": loss}``).
        """
        batch = self.objective.equal_lengths(hf_batch(inputs), self.pad_id)  # Trainer batches differ in N
        view = self.objective.teacher_forward(self.teacher, batch) if self.teacher is not None else None
        self.objective.progress = self.state.global_step / max(1, self.state.max_steps)  # --fcd_weight_schedule
        total, terms, outputs = self.objective.losses(model, batch, view)
        mode = "train" if model.training else "eval"
        for key, value in terms.items():
            if key.startswith("loss/") and key != "loss/total":
                self._terms[mode][key].append(value.detach().float())
        if not return_outputs:
            return total
        return total, ({"loss": total} if self.objective.fused_head is not None else outputs)

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        """As ``Trainer.prediction_step``; under the fused logit head (no logits exist) the loss alone."""
        if self.objective.fused_head is None and not prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of each loss term since the last log (averaged over ranks) to the Trainer's logs.
        Collective when a process group is up: every rank logs at the same steps, as the Trainer does."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        buffer = self._terms[mode]
        if buffer:
            keys = sorted(buffer)
            means = torch.stack([torch.stack(buffer[k]).mean() for k in keys])  # (terms,)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(means)
                means = means / dist.get_world_size()
            prefix = "eval_" if mode == "eval" else ""
            logs = {**logs, **{f"{prefix}{k}": v for k, v in zip(keys, means.tolist())}}
            buffer.clear()
        super().log(logs, start_time)
