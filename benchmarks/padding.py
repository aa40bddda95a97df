"""Classification batches padded to their longest row against padded to --max_seq_length: tokens/s and
held-out accuracy of the default encoder distillation, side by side.

    python benchmarks/padding.py                 # teacher 120 steps, each distillation 60 steps; appended to RESULTS.md
    python benchmarks/padding.py --no_write      # prints only

The default encoder job (``launchers/distill_bert.py``: all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes, a
3-block pruned student, CE + FCD, 2 ranks x 16 snippets, ``--max_seq_length`` 64), shortened: the teacher
is fine-tuned for --teacher_steps (``launchers/finetune_teacher.py``), then the distillation runs for --steps
with the batches padded to their longest row (the default) and with ``--pad_to_max_length`` (before), in
that order and again in the other order (the machine's speed drifts), from the same teacher and seed.
Each finished run's metrics.json is kept under benchmarks/padding/ and reused (delete a file to measure that
run again); the runs themselves (teacher and student models) go to $FCD_DS_HOME/benchmark_padding/.
Throughput: the run's ``train_tokens_per_second`` (real tokens of both ranks) beside its measured fp32
matmul rate (``train_matmul_peak_fraction`` is of the matmul count at --max_seq_length). Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch import REPO, launch  # noqa: E402
from results import command_line, machine, publish, utc_stamp  # noqa: E402

HERE = REPO / "benchmarks" / "padding"  # each finished run's metrics.json (small), reused
RUNS = Path(os.environ.get("FCD_DS_HOME", Path.home() / ".cache" / "fcd_ds")) / "benchmark_padding"  # the runs themselves (models)


def _run(launcher: str, name: str, flags: list) -> dict:
    """``launch`` into RUNS/name, or the kept metrics of a finished run (benchmarks/padding/name.json)."""
    kept = HERE / f"{name}.json"
    if kept.is_file():
        return json.loads(kept.read_text())
    metrics, _ = launch(launcher, RUNS / name, flags, 2, reuse=True)
    HERE.mkdir(exist_ok=True)
    kept.write_text(json.dumps(metrics, indent=1))
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher_steps", type=int, default=120)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--no_write", action="store_true", help="print only, do not append to RESULTS.md")
    opts = parser.parse_args()
    teacher = RUNS / f"teacher_{opts.teacher_steps}"
    t_metrics = _run("finetune_teacher", teacher.name, ["--max_steps", opts.teacher_steps])
    rows = []
    for order, names in (("a", ("longest", "max_length")), ("b", ("max_length", "longest"))):
        for name in names:
            flags = ["--teacher", teacher / "model", "--max_steps", opts.steps, *(["--pad_to_max_length"] if name == "max_length" else [])]
            rows.append((name, order, _run("distill_bert", f"{name}_{order}_{opts.steps}", flags)))
    lines = [f"Command: `{command_line('padding.py')}`; {machine()}, 2 ranks; teacher: all-MiniLM-L6-v2 fine-tuned "
             f"{opts.teacher_steps} steps (held-out accuracy {t_metrics['student_eval_accuracy']:.4f}); distillation: the default "
             f"distill_bert job for {opts.steps} steps, 2 x 16 snippets, --max_seq_length 64.\n",
             "| batches padded to | run | train tokens/s (real) | measured fp32 matmul GFLOP/s per rank (fraction achieved) | held-out accuracy | held-out F1 | train loss tokens |",
             "|---|---|---|---|---|---|---|"]
    for name, order, m in rows:
        peak = m.get("measured_matmul_tflops_per_device")
        rate = f"{peak * 1e3:.0f} ({m['train_matmul_peak_fraction']:.3f} achieved)" if peak else "-"
        lines.append(f"| {'the longest row (default)' if name == 'longest' else '--max_seq_length 64 (before)'} | {order} | "
                     f"{m['train_tokens_per_second']:.1f} | {rate} | {m['student_eval_accuracy']:.4f} | {m['student_eval_f1']:.4f} | "
                     f"{m.get('train_loss_tokens', '-')} |")
    speed = {n: [m["train_tokens_per_second"] for name, _, m in rows if name == n] for n in ("longest", "max_length")}
    lines.append(f"\nRatio of tokens/s, longest / max_seq_length, per order: "
                 f"{speed['longest'][0] / speed['max_length'][0]:.2f} (a), {speed['longest'][1] / speed['max_length'][1]:.2f} (b).")
    publish(lines, write=not opts.no_write, heading=f"\n## Classification padded to the longest row (issue 22 item 1), {utc_stamp()}\n\n")


if __name__ == "__main__":
    main()
