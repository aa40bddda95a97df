"""Check every input of a run before any work: files, DeepSpeed JSON, output directory, configs,
tokenizers, layer map, sequence length. Only configs and tokenizers are read (seconds); each problem
raises one :class:`~fcd_ds.errors.UsageError` naming the flag and the fix."""

from __future__ import annotations

from dataclasses import dataclass

from .assets import prepare_default_assets
from .checkpoint import check_output_dir
from .data import check_data_files
from .ds_config import load_ds_config, resolve_ds_config
from .errors import UsageError
from .layer_map import LayerPair, parse_layer_map
from .models import check_same_tokenizer, load_config, load_tokenizer, max_positions, pruned_student_config

__all__ = ["RunPlan", "plan_run"]


@dataclass
class RunPlan:
    """Everything checked and resolved for a run."""

    teacher: str
    teacher_config: object
    student_config: object
    tokenizer: object
    pairs: list[LayerPair]
    ds_config: dict
    train_file: str
    validation_file: str | None


def _student_config(model_args, teacher_config):
    if model_args.student is not None:
        return load_config(model_args.student, "--student")
    if model_args.student_config is not None:
        return load_config(model_args.student_config, "--student_config")
    return pruned_student_config(teacher_config, model_args.student_num_layers)


def plan_run(model_args, data_args, distill_args, train_args) -> RunPlan:
    """Resolve defaults and validate a run. Mutates ``model_args`` (default student depth) and
    ``data_args`` (default corpus paths).

    Raises:
        UsageError: the first problem found.
    """
    if model_args.teacher is None or data_args.train_file is None:
        assets = prepare_default_assets()
        if model_args.teacher is None:
            model_args.teacher = str(assets.teacher)
        if data_args.train_file is None:
            if data_args.validation_file is not None:
                raise UsageError("--validation_file: given without --train_file; pass both, or neither for the default corpus")
            data_args.train_file, data_args.validation_file = str(assets.train_file), str(assets.validation_file)
    check_data_files(data_args.train_file, data_args.validation_file)
    ds_config = resolve_ds_config(load_ds_config(train_args.deepspeed_config), train_args)
    check_output_dir(train_args.output_dir, resume=train_args.resume, overwrite=train_args.overwrite_output_dir)

    teacher_config = load_config(model_args.teacher, "--teacher")
    tokenizer = load_tokenizer(model_args.teacher, "--teacher")
    if model_args.student is None and model_args.student_config is None and model_args.student_num_layers is None:
        model_args.student_num_layers = max(1, round(teacher_config.num_hidden_layers / 3))
    student_config = _student_config(model_args, teacher_config)
    if model_args.student is not None:
        try:
            student_tokenizer = load_tokenizer(model_args.student, "--student")
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
    for flag, cfg in (("--teacher", teacher_config), ("--student", student_config)):
        limit = max_positions(cfg)
        if limit is not None and data_args.max_seq_length > limit:
            raise UsageError(
                f"--max_seq_length: {data_args.max_seq_length} exceeds the {flag.lstrip('-')}'s {limit} positions; "
                f"use --max_seq_length {limit} or less"
            )
    pairs = parse_layer_map(distill_args.layer_map, student_config.num_hidden_layers, teacher_config.num_hidden_layers)
    return RunPlan(
        teacher=model_args.teacher,
        teacher_config=teacher_config,
        student_config=student_config,
        tokenizer=tokenizer,
        pairs=pairs,
        ds_config=ds_config,
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
    )
