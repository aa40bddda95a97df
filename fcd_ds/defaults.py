"""Each launcher's defaults: its task, output folder and schedule (``parse_args`` defaults), and the
embedded teacher and data it uses when none are given (prepared offline by :mod:`fcd_ds.assets`).

A launcher is these two things plus the same library calls; nothing else differs between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .assets import assets_home, prepare_default_assets, prepare_encoder_assets
from .errors import UsageError

__all__ = ["Launcher", "GPT", "BERT", "ROBERTA", "FINETUNE", "default_bert_teacher", "fill_default_text_data"]

BERT_TEACHER_RUN = "minilm-l6-rotten-tomatoes"  # under $FCD_DS_HOME: finetune_teacher.py's output folder


def default_bert_teacher() -> Path:
    """The embedded encoder teacher: all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes by ``make teacher-bert``."""
    return assets_home() / BERT_TEACHER_RUN / "model"


def fill_default_text_data(data_args, documents: bool = False) -> None:
    """The default corpus where no data flag is given (and no existing prepared folder is the data): BBC
    News, one article per document (JSON lines) for decoders, or the plain-text file for encoders."""
    if data_args.train_file is None and data_args.dataset_name is None:
        if data_args.validation_file is not None:
            raise UsageError("--validation_file: given without --train_file; pass both, or neither for the default corpus")
        prepared = data_args.dataset_prepared_path
        if prepared is not None and Path(prepared).exists():
            return  # the prepared folder is the data (its own metadata says what it was made from)
        assets = prepare_default_assets()
        train, valid = (assets.train_documents, assets.validation_documents) if documents else (assets.train_file, assets.validation_file)
        data_args.train_file, data_args.validation_file = str(train), str(valid)


def _rotten_tomatoes(data_args) -> None:
    if data_args.task != "sequence_classification":  # task-agnostic: raw English text
        fill_default_text_data(data_args)
    elif data_args.train_file is None and data_args.dataset_name is None:
        if data_args.validation_file is not None:
            raise UsageError("--validation_file: given without --train_file; pass both, or neither for the default data")
        assets = prepare_encoder_assets()
        data_args.train_file = str(assets.rotten_tomatoes_train)
        data_args.validation_file = str(assets.rotten_tomatoes_validation)


def _gpt(model_args, data_args) -> None:
    if model_args.teacher is None:
        model_args.teacher = str(prepare_default_assets().teacher)
    fill_default_text_data(data_args, documents=True)


def _bert(model_args, data_args) -> None:
    if model_args.teacher is None:
        if data_args.task == "masked_lm":  # task-agnostic: the pretrained encoder itself
            model_args.teacher = str(prepare_encoder_assets().minilm)
        else:
            teacher = default_bert_teacher()
            if not (teacher / "config.json").is_file():
                raise UsageError(
                    f"--teacher: the default teacher (all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes) is not prepared in {teacher}; "
                    "run `make teacher-bert` once, or pass --teacher"
                )
            model_args.teacher = str(teacher)
    _rotten_tomatoes(data_args)


def _roberta(model_args, data_args) -> None:
    if model_args.teacher is None:
        raise UsageError(
            "--teacher: distill_roberta.py needs a RoBERTa teacher folder or hub name (none ships offline); "
            "pass --teacher PATH (fine-tune it first with launchers/finetune_teacher.py)"
        )
    _rotten_tomatoes(data_args)


def _finetune(model_args, data_args) -> None:
    if model_args.student is None:
        model_args.student = str(prepare_encoder_assets().minilm)
    _rotten_tomatoes(data_args)


@dataclass(frozen=True)
class Launcher:
    """One launcher's defaults.

    Attributes:
        name: the launcher (logs, model card).
        flags: ``parse_args`` defaults (task, output_dir, schedule, ...), under the command line.
        fill: fills the embedded teacher / data into ``(model_args, data_args)`` where none were given.
        export_name: the folder under output_dir the trained model is exported to.
        student_depth: default depth-pruned student, as a fraction of the teacher's blocks (when no
            student flag is given).
        finetune: no teacher, task loss only (``launchers/finetune_teacher.py``).
        micro_batch: the micro-batch per rank when neither ``--per_device_train_batch_size`` nor the
            DeepSpeed JSON (a number in place of "auto") gives one.
    """

    name: str
    flags: dict
    fill: Callable
    export_name: str = "student"
    student_depth: float = 1 / 3
    finetune: bool = False
    micro_batch: int = 4  # an 'auto' train_micro_batch_size_per_gpu without --per_device_train_batch_size


_ENCODER_FLAGS = {
    "task": "sequence_classification",
    "max_seq_length": 64,
    "max_eval_samples": 0,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "learning_rate": 1e-4,
}

# 8 sequences of 128 tokens per micro-batch: on one rank (`make run`, the fastest launch on a 2-core CPU,
# benchmarks/threads.py) that is the 1,024 tokens per step that 2 ranks x 4 gave before.
GPT = Launcher("distill_gpt", {"task": "causal_lm", "output_dir": "outputs/distill_gpt"}, _gpt, micro_batch=8)
# Encoder students default to half the teacher's blocks (6 -> 3 for all-MiniLM-L6-v2, 12 -> 6 as DistilRoBERTa).
BERT = Launcher("distill_bert", {**_ENCODER_FLAGS, "output_dir": "outputs/distill_bert", "max_steps": 360}, _bert, student_depth=1 / 2)
ROBERTA = Launcher("distill_roberta", {**_ENCODER_FLAGS, "output_dir": "outputs/distill_roberta", "max_steps": 360}, _roberta,
                   student_depth=1 / 2)
FINETUNE = Launcher(
    "finetune_teacher",
    {**_ENCODER_FLAGS, "output_dir": "outputs/finetune_teacher", "max_steps": 360, "learning_rate": 5e-5},
    _finetune,
    export_name="model",
    finetune=True,
)
