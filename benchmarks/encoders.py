"""Encoder quality at a fixed budget: a fine-tuned teacher, its 3-block student distilled with task loss
+ FCD, and the same student trained on the task loss alone (no distillation), over several seeds.

    python benchmarks/encoders.py                                  # Rotten Tomatoes and BBC News topics, 3 seeds
    python benchmarks/encoders.py --tasks rotten_tomatoes --seeds 1 2 3 --steps 120

For each task: the embedded all-MiniLM-L6-v2 (6 x 384) is fine-tuned once (launchers/finetune_teacher.py,
``--teacher_steps``; for Rotten Tomatoes the default teacher of ``make teacher-bert`` is used when it is
prepared, so that the benchmark and the default run share it); then for each seed, launchers/distill_bert.py runs twice with identical flags (same
teacher, same pruned 3-block student initialisation, data, steps and seed), once as is (task loss + FCD)
and once with ``--fcd_weight 0`` (the teacher is not run: plain fine-tuning of the pruned student).
Held-out accuracy from each run's metrics.json; mean and sample standard deviation over seeds, and the
per-seed (paired) difference. Runs are kept under ``--out``: a finished run (its metrics.json) is not
run again, so an interrupted benchmark resumes. The table, the machine's measured fp32 matmul rate and
the command are appended to benchmarks/RESULTS.md. Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from launch import REPO, launch  # benchmarks/launch.py (python puts benchmarks/ on sys.path)
from results import command_line, machine, matmul_rate, publish, utc_stamp  # benchmarks/results.py
METHODS = {"task loss + FCD": [], "task loss only (no distillation)": ["--fcd_weight", "0"]}


def task_flags(task: str) -> list[str]:
    """Data flags of a task, from the prepared encoder assets."""
    from fcd_ds.assets import prepare_encoder_assets

    a = prepare_encoder_assets()
    if task == "rotten_tomatoes":
        return ["--train_file", a.rotten_tomatoes_train, "--validation_file", a.rotten_tomatoes_validation, "--max_seq_length", "64",
                "--per_device_train_batch_size", "16"]
    return ["--train_file", a.bbc_topics_train, "--validation_file", a.bbc_topics_validation, "--max_seq_length", "128",
            "--per_device_train_batch_size", "8"]


def mean_std(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["rotten_tomatoes", "bbc_topics"], choices=["rotten_tomatoes", "bbc_topics"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=120, help="student optimizer steps per run")
    parser.add_argument("--teacher_steps", type=int, default=240, help="teacher fine-tuning steps (once per task)")
    parser.add_argument("--num_gpus", type=int, default=2, help="ranks (CPU: processes)")
    parser.add_argument("--out", default="outputs/bench_encoders", help="parent folder of every run (resumable)")
    args = parser.parse_args()

    from fcd_ds.defaults import default_bert_teacher
    from fcd_ds.runtime.metrics import measure_matmul_tflops

    peak = measure_matmul_tflops()
    root = REPO / args.out
    sections = []
    for task in args.tasks:
        data = task_flags(task)
        default = default_bert_teacher()
        if task == "rotten_tomatoes" and (default / "config.json").is_file():
            teacher = default
            teacher_metrics = json.loads((default.parent / "metrics.json").read_text())
        else:
            teacher_metrics, _ = launch("finetune_teacher", root / task / "teacher",
                                        [*data, "--max_steps", args.teacher_steps, "--seed", 0], args.num_gpus, reuse=True)
            teacher = root / task / "teacher" / "model"
        results = {m: [] for m in METHODS}
        for seed in args.seeds:
            for method, extra in METHODS.items():
                name = "fcd" if not extra else "ce_only"
                m, wall = launch("distill_bert", root / task / f"{name}_seed{seed}",
                                 ["--teacher", teacher, *data, "--max_steps", args.steps, "--seed", seed, *extra], args.num_gpus,
                                 reuse=True)
                results[method].append((seed, m, wall))
        sections.append((task, teacher, teacher_metrics, results))

    lines = [f"\n## Encoders: FCD distillation vs no distillation — {utc_stamp()}",
             f"\nCommand: `{command_line('encoders.py')}` ({machine()}, {args.num_gpus} ranks; "
             f"{matmul_rate(peak)}, torch's default threads).",
             f"Teacher: all-MiniLM-L6-v2 (6 x 384) fine-tuned on the task; students: its blocks 0, 2, 5 "
             f"(pruned, 3 x 384), {args.steps} steps, seeds {args.seeds}. Accuracy on the held-out split.\n"]
    for task, teacher, tm, results in sections:
        lines += [f"\n### {task}\n", f"Teacher `{teacher}`: accuracy {tm['student_eval_accuracy']:.4f} (fine-tuning: {tm['steps']} steps, "
                  f"{tm['train_tokens_per_second']:.0f} tokens/s, {tm['train_tflops_per_device'] * 1e3:.1f} GFLOP/s per rank).\n",
                  "| student | accuracy (mean ± std) | per seed | student before | tokens/s | GFLOP/s per rank (fraction of the matmul rate) |",
                  "|---|---|---|---|---|---|"]
        for method, runs in results.items():
            acc = [m["student_eval_accuracy"] for _, m, _ in runs]
            gflops = np.mean([m["train_tflops_per_device"] for _, m, _ in runs]) * 1e3
            lines.append(f"| {method} | {mean_std(acc)} | {', '.join(f'{a:.4f}' for a in acc)} | "
                         f"{runs[0][1]['student_eval_accuracy_initial']:.4f} | "
                         f"{np.mean([m['train_tokens_per_second'] for _, m, _ in runs]):.0f} | {gflops:.1f} ({gflops / (peak * 1e3):.2f}) |")
        fcd, ce = ([m["student_eval_accuracy"] for _, m, _ in results[k]] for k in METHODS)
        diff = np.asarray(fcd) - np.asarray(ce)
        lines.append(f"\nPaired difference FCD - no distillation (same seed): {', '.join(f'{d:+.4f}' for d in diff)}; "
                     f"mean {diff.mean():+.4f}, FCD ahead in {(diff > 0).sum()} of {len(diff)} seeds.\n")
    publish(lines, write=True)


if __name__ == "__main__":
    main()
