"""Check every input of a run before any work: files, DeepSpeed JSON, output directory, configs,
tokenizers, data (files, columns, the first row of each split, chat template, a prepared folder's
settings), labels, layer map, sequence length. Only configs, tokenizers, first rows and (for
classification) the label column are read (seconds); each problem raises one
:class:`~fcd_ds.errors.UsageError` naming the flag and the fix."""

from __future__ import annotations

import sys
from dataclasses import MISSING, asdict, dataclass, fields

from .runtime.checkpoint import auto_resume_action, check_checkpoint_files, check_output_dir, check_resume_layout, read_trainer_state
from .data import TextCorpus
from .runtime.distributed import world_size
from .ds_config import load_ds_config, resolve_ds_config, validate_ds_config, zero_stage
from .errors import UsageError
from .layer_map import LayerPair, parse_layer_map
from .models import (check_attn_implementation, check_same_tokenizer, check_weight_files, kept_teacher_blocks, load_config, load_tokenizer,
                     max_positions, pruned_student_config, revision_unused_warning)
from .tasks import CausalLMTask, MaskedLMTask, SequenceClassificationTask, has_mlm_head, read_label_spec
from .tasks.classification import load_raw

__all__ = ["RunPlan", "plan_run", "student_num_params", "check_minilm"]


@dataclass
class RunPlan:
    """Everything checked and resolved for a run (the four argument groups with their defaults filled)."""

    launcher: object  # fcd_ds.defaults.Launcher
    task: object  # a fcd_ds.tasks.Task
    teacher: str | None  # None when fine-tuning
    teacher_config: object | None
    student_config: object
    tokenizer: object
    pairs: list[LayerPair]  # --layer_map: fcd, hidden_mse
    attention_pairs: list[LayerPair]  # --minilm_layer_map: minilm
    ds_config: dict
    model_args: object
    data_args: object
    distill_args: object
    train_args: object
    resume_universal: bool = False  # --resume on another number of ranks with ZeRO: load the universal form

    def layout(self, world_size: int) -> dict:
        """What a checkpoint's data position and LR schedule count in (micro-batch, world size, sequence
        length, seed, steps, accumulation, the resolved scheduler, and the global batch
        ``train_batch_size``); a resume must match it, but for the split of the global batch
        (:func:`~fcd_ds.runtime.checkpoint.check_resume_layout`)."""
        t, ds = self.train_args, self.ds_config
        schedule = dict(ds.get("scheduler") or {})
        if "params" in schedule:  # total_num_steps is --max_steps, compared on its own
            schedule["params"] = {k: v for k, v in schedule["params"].items() if k != "total_num_steps"}
        accumulation = ds.get("gradient_accumulation_steps", 1)
        return {"micro_batch_size": ds["train_micro_batch_size_per_gpu"], "world_size": world_size,
                "max_seq_length": self.data_args.max_seq_length, "seed": t.seed, "max_steps": t.max_steps,
                "gradient_accumulation_steps": accumulation, "lr_schedule": schedule or None,
                "train_batch_size": ds["train_micro_batch_size_per_gpu"] * accumulation * world_size}

    def argument_defaults(self) -> dict[str, dict]:
        """``{group: {argument: default}}`` of the four argument dataclasses as :meth:`run_config` names them
        (fields without a default left out), for :func:`~fcd_ds.runtime.checkpoint.auto_resume_action`."""
        out = {}
        for group, args in (("model", self.model_args), ("data", self.data_args), ("distill", self.distill_args), ("train", self.train_args)):
            out[group] = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(args)
                          if f.default is not MISSING or f.default_factory is not MISSING}
        return out

    def run_config(self, world_size: int | None = None) -> dict:
        """What ``run_config.json`` records: the launcher, the task, the four argument groups as
        resolved, the layer map, the world size and the resolved DeepSpeed JSON."""
        from .layer_map import layer_map_to_str

        return {"launcher": self.launcher.name, "task": self.task.name, "model": asdict(self.model_args),
                "data": asdict(self.data_args), "distill": asdict(self.distill_args), "train": asdict(self.train_args),
                "layer_map": layer_map_to_str(self.pairs) if self.pairs else None, "world_size": world_size,
                "deepspeed_config": self.ds_config}


def _student_config(model_args, teacher_config):
    if model_args.student is not None:
        return load_config(model_args.student, "--student", trust_remote_code=model_args.trust_remote_code, revision=model_args.revision)
    if model_args.student_config is not None:
        return load_config(model_args.student_config, "--student_config", trust_remote_code=model_args.trust_remote_code, revision=model_args.revision)
    return pruned_student_config(teacher_config, model_args.student_num_layers)


def _build_task(data_args, tokenizer, head_config, seed: int):
    if data_args.task == "causal_lm":
        pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        return CausalLMTask(TextCorpus(tokenizer, data_args, "causal_lm"), pad_id=pad, max_seq_length=data_args.max_seq_length,
                            per_document_attention=data_args.per_document_attention)
    if data_args.task == "masked_lm":
        return MaskedLMTask(tokenizer, mlm=has_mlm_head(head_config), mlm_probability=data_args.mlm_probability,
                            corpus=TextCorpus(tokenizer, data_args, "masked_lm"), max_seq_length=data_args.max_seq_length, seed=seed)
    raw = load_raw(data_args)
    return SequenceClassificationTask(raw, read_label_spec(raw, data_args), data_args)


def _attention_widths(cfg) -> tuple[int, int]:
    """(query width, key/value width) of a config: heads x head_dim, fewer key/value heads under GQA."""
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return heads * head_dim, kv_heads * head_dim


def check_minilm(distill_args, teacher_config, student_config, task) -> None:
    """Resolve ``--minilm_relation_heads`` (default: the teacher's key/value heads) and check it divides
    every query/key/value width, and that both models' attention layout is one the capture knows
    (checked on a meta-device copy: no memory, no weights read)."""
    import torch

    from .features import attention_projections, find_blocks

    widths = [*_attention_widths(teacher_config), *_attention_widths(student_config)]
    if distill_args.minilm_relation_heads is None:
        distill_args.minilm_relation_heads = getattr(teacher_config, "num_key_value_heads", None) or teacher_config.num_attention_heads
    r = distill_args.minilm_relation_heads
    if any(w % r for w in widths):
        raise UsageError(
            f"--minilm_relation_heads: {r} does not divide the query/key/value widths {sorted(set(widths))} of teacher and student; "
            "pick a common divisor"
        )
    for flag, cfg in (("--teacher", teacher_config), ("--student", student_config)):
        with torch.device("meta"):
            model = task.auto_class.from_config(cfg)
        try:
            attention_projections(find_blocks(model)[0])
        except ValueError as exc:
            raise UsageError(f"{flag}: {exc}") from None


def student_num_params(task, config) -> int:
    """Parameters of the task's model for ``config``, counted on the meta device (no memory, no weights)."""
    import torch

    with torch.device("meta"):
        model = task.auto_class.from_config(config)
    return sum(p.numel() for p in model.parameters())


def check_grad_norms(distill_args, model_args, ds_config: dict) -> None:
    """``--grad_norm_steps`` differentiates each term separately with respect to the student's block outputs
    (``torch.autograd.grad``): that needs the captured blocks of a block-feature term, and a backward that
    ZeRO-3's parameter hooks and reentrant activation checkpointing do not expect twice.

    Raises:
        UsageError: no block-feature term, ZeRO-3, or ``--gradient_checkpointing``.
    """
    if not distill_args.uses_block_features:
        raise UsageError("--grad_norm_steps: reads the --layer_map student blocks of a block-feature term; add fcd or hidden_mse to --loss, or drop the flag")
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        raise UsageError("--grad_norm_steps: not with ZeRO-3 (its parameter hooks expect one backward per micro-batch); measure at ZeRO 0-2")
    if model_args.gradient_checkpointing:
        raise UsageError("--grad_norm_steps: not with --gradient_checkpointing (its recomputation expects one backward); drop one of them")


def plan_run(model_args, data_args, distill_args, train_args, launcher) -> RunPlan:
    """Resolve the launcher's defaults and validate a run. Mutates ``model_args`` (default teacher and
    student depth) and ``data_args`` (default data paths).

    Args:
        model_args, data_args, distill_args, train_args: from :func:`~fcd_ds.config.parse_args`.
        launcher: the :class:`~fcd_ds.defaults.Launcher` (its embedded assets, export name, fine-tune mode).

    Raises:
        UsageError: the first problem found.
    """
    launcher.fill(model_args, data_args)
    ds_config = resolve_ds_config(load_ds_config(train_args.deepspeed_config), train_args, launcher.micro_batch, world_size())
    from deepspeed.accelerator import get_accelerator

    validate_ds_config(ds_config, train_args.deepspeed_config, world_size(), get_accelerator().device_name(), fp16_flag=train_args.fp16)
    check_output_dir(train_args.output_dir, resume=train_args.resume, overwrite=train_args.overwrite_output_dir,
                     auto_resume=train_args.auto_resume, export_name=launcher.export_name)

    from .build import model_dtype
    from .runtime.distributed import is_main_process

    check_attn_implementation(model_args.attn_implementation, get_accelerator().device_name(), model_dtype(ds_config))
    teacher = None if launcher.finetune else model_args.teacher
    student_flag = "--student" if teacher is not None else "--model_name_or_path"
    unused = revision_unused_warning(model_args.revision, {"--teacher": teacher, student_flag: model_args.student,
                                                           "--student_config": model_args.student_config})
    if unused and is_main_process():
        print(unused, file=sys.stderr, flush=True)
    remote, revision = model_args.trust_remote_code, model_args.revision
    teacher_config = load_config(teacher, "--teacher", trust_remote_code=remote, revision=revision) if teacher is not None else None
    tokenizer = (load_tokenizer(teacher, "--teacher", trust_remote_code=remote, revision=revision) if teacher is not None
                 else load_tokenizer(model_args.student, "--model_name_or_path", trust_remote_code=remote, revision=revision))
    if teacher is not None and model_args.student is None and model_args.student_config is None and model_args.student_num_layers is None:
        model_args.student_num_layers = max(1, round(teacher_config.num_hidden_layers * launcher.student_depth))
    student_config = _student_config(model_args, teacher_config)
    task = _build_task(data_args, tokenizer, teacher_config if teacher is not None else student_config, train_args.seed)
    if teacher is None:
        task.check_finetune(model_args.student)
        pairs, attention_pairs = [], []
    else:
        task.check_teacher(teacher_config, teacher, distill_args)
        if model_args.student is not None:
            try:
                student_tokenizer = load_tokenizer(model_args.student, "--student", trust_remote_code=remote, revision=revision)
            except UsageError:
                student_tokenizer = None  # a student folder without tokenizer files uses the teacher's
            if student_tokenizer is not None:
                check_same_tokenizer(tokenizer, student_tokenizer)
        if student_config.vocab_size < len(tokenizer):
            flag = "--student" if model_args.student is not None else "--student_config"
            raise UsageError(
                f"{flag}: vocab_size {student_config.vocab_size} is smaller than the teacher tokenizer's {len(tokenizer)} "
                "tokens; the student must use the teacher's tokenizer"
            )
        pruned_from = (kept_teacher_blocks(teacher_config.num_hidden_layers, model_args.student_num_layers)
                       if model_args.student_num_layers is not None else None)
        pairs = parse_layer_map(distill_args.layer_map, student_config.num_hidden_layers, teacher_config.num_hidden_layers, pruned_from)
        attention_pairs = (parse_layer_map(distill_args.minilm_layer_map, student_config.num_hidden_layers, teacher_config.num_hidden_layers,
                                           pruned_from, flag="--minilm_layer_map") if distill_args.uses_attention else [])
        if distill_args.uses_attention:
            check_minilm(distill_args, teacher_config, student_config, task)
        if train_args.grad_norm_steps:
            check_grad_norms(distill_args, model_args, ds_config)
    for flag, path in (("--teacher", teacher), ("--student" if teacher is not None else "--model_name_or_path", model_args.student)):
        if path is not None:
            check_weight_files(path, flag, model_args.use_safetensors)
    models = (("--teacher", teacher_config), ("--student", student_config)) if teacher is not None else (("--model_name_or_path", student_config),)
    for flag, cfg in models:
        limit = max_positions(cfg)
        if limit is not None and data_args.max_seq_length > limit:
            raise UsageError(
                f"--max_seq_length: {data_args.max_seq_length} exceeds the {flag.lstrip('-')}'s {limit} positions; "
                f"use --max_seq_length {limit} or less"
            )
    plan = RunPlan(
        launcher=launcher,
        task=task,
        teacher=teacher,
        teacher_config=teacher_config,
        student_config=student_config,
        tokenizer=tokenizer,
        pairs=pairs,
        attention_pairs=attention_pairs,
        ds_config=ds_config,
        model_args=model_args,
        data_args=data_args,
        distill_args=distill_args,
        train_args=train_args,
    )
    if train_args.auto_resume:
        action = auto_resume_action(train_args.output_dir, plan.run_config(), plan.argument_defaults())
        train_args.resume = action == "resume"
        train_args.overwrite_output_dir = action == "restart"
    if train_args.resume:  # before any process starts: a checkpoint of another layout is refused here
        saved = read_trainer_state(train_args.output_dir)["data_layout"]
        if check_resume_layout(saved, plan.layout(world_size())):
            if data_args.streaming:
                raise UsageError(f"--resume: a streamed corpus is read in per-rank shards, and the checkpoint was written by {saved['world_size']} "
                                 f"ranks, now {world_size()}; resume streaming on {saved['world_size']} ranks, or prepare the corpus "
                                 "(--dataset_prepared_path) to resume on another number")
            # ZeRO partitions the optimizer (and at stage 3 the parameters) over the ranks: re-partitioned from
            # DeepSpeed's universal form; without ZeRO the states are whole and load as they are.
            plan.resume_universal = zero_stage(ds_config) > 0 and saved["world_size"] != world_size()
            if plan.resume_universal:
                ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        check_checkpoint_files(train_args.output_dir)
    return plan
