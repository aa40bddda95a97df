"""Distil a RoBERTa teacher into a smaller student with FCD on DeepSpeed.

    deepspeed --num_gpus 2 launchers/distill_roberta.py --teacher my-roberta-finetuned-on-the-task

No RoBERTa weights ship offline, so --teacher is required (a RoBERTa fine-tuned on the task; fine-tune
one with launchers/finetune_teacher.py). Without data flags it runs on the embedded Rotten Tomatoes
sentiment data; the student defaults to half the teacher's blocks (12 -> 6, as DistilRoBERTa). The
flags, outputs (outputs/distill_roberta/) and task-agnostic mode (``--task masked_lm``) are those of
launchers/distill_bert.py; ``--help`` lists every flag.
"""

from __future__ import annotations

from fcd_ds import defaults, trainer
from fcd_ds.config import parse_args
from fcd_ds.errors import UsageError
from fcd_ds.plan import plan_run

LAUNCHER = defaults.ROBERTA


def main(argv: list[str] | None = None) -> int:
    # 1. Parse and check everything before any work (one-line errors, output dir untouched).
    try:
        plan = plan_run(*parse_args(argv, LAUNCHER.flags, finetune=LAUNCHER.finetune), LAUNCHER)
    except UsageError as exc:
        return trainer.usage_error(exc)
    # 2. Process group, data, engines; resume or measure the starting point.
    try:
        job = trainer.setup(plan)
        # 3. Train, evaluate, export the student with its model card, report.
        trainer.train(job)
        trainer.save(job, trainer.evaluate(job))
    except trainer.STOPS as exc:  # bad input found late, preemption (checkpoint saved), non-finite loss
        return trainer.finish(exc=exc)
    return trainer.finish()


if __name__ == "__main__":
    trainer.exit_now(main())
