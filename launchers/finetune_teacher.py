"""Fine-tune a pretrained model on a task, with the same DeepSpeed engine and no teacher: the step
before distillation when a teacher is pretrained but not task-tuned, or the step after a task-agnostic
distillation to specialise the general student.

    deepspeed --num_gpus 2 launchers/finetune_teacher.py

fine-tunes the embedded all-MiniLM-L6-v2 on Rotten Tomatoes sentiment and writes
outputs/finetune_teacher/{model/, metrics.json, runs/, checkpoints/}. Your own model and data:

    deepspeed --num_gpus 8 launchers/finetune_teacher.py --model_name_or_path roberta-large \
        --train_file train.csv --validation_file dev.csv --max_steps 2000 --output_dir out/teacher

Then pass ``--teacher out/teacher/model`` to launchers/distill_bert.py or distill_roberta.py.
"""

from __future__ import annotations

from fcd_ds import defaults, trainer
from fcd_ds.config import parse_args
from fcd_ds.errors import UsageError
from fcd_ds.plan import plan_run

LAUNCHER = defaults.FINETUNE


def main(argv: list[str] | None = None) -> int:
    # 1. Parse and check everything before any work (one-line errors, output dir untouched).
    try:
        plan = plan_run(*parse_args(argv, LAUNCHER.flags, finetune=LAUNCHER.finetune), LAUNCHER)
    except UsageError as exc:
        return trainer.usage_error(exc)
    # 2. Process group, data, engines; resume or measure the starting point.
    try:
        job = trainer.setup(plan)
        # 3. Train, evaluate, export the model with its model card, report.
        trainer.train(job)
        trainer.save(job, trainer.evaluate(job))
    except trainer.STOPS as exc:  # bad input found late, preemption (checkpoint saved), non-finite loss
        return trainer.finish(exc=exc)
    return trainer.finish()


if __name__ == "__main__":
    trainer.exit_now(main())
