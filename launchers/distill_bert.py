"""Distil a BERT-style encoder teacher into a smaller student with FCD on DeepSpeed.

    deepspeed --num_gpus 2 launchers/distill_bert.py

runs the embedded default: the teacher all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes sentiment
(`make teacher-bert` prepares it), a 3-block student pruned from it, task loss + FCD, ZeRO-2; it writes
outputs/distill_bert/{student/, metrics.json, runs/, checkpoints/}. Your own task, as run_glue.py:

    deepspeed --num_gpus 8 launchers/distill_bert.py --teacher my-bert-finetuned --student_num_layers 4 \
        --train_file train.csv --validation_file dev.csv --text_column sentence1 --text_pair_column sentence2 \
        --label_column label --max_seq_length 128 --max_steps 3000 --output_dir out/bert-run

Task-agnostic distillation on raw text (FCD on block outputs, + masked-LM loss when the teacher has an
MLM head): ``--task masked_lm --train_file corpus.txt``; fine-tune the general student afterwards with
launchers/finetune_teacher.py. ``--resume`` continues a run; ``--help`` lists every flag.
"""

from __future__ import annotations

from fcd_ds import defaults, trainer
from fcd_ds.config import parse_args
from fcd_ds.errors import UsageError
from fcd_ds.plan import plan_run

LAUNCHER = defaults.BERT


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
