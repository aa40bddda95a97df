"""What FCD adds: the default run, and the same run with the FCD term off (cross-entropy only), back to back.

    python benchmarks/fcd_vs_ce.py                       # default budget (120 steps), 2 ranks
    python benchmarks/fcd_vs_ce.py --num_gpus 1 -- --bf16 --max_steps 1000

Each variant is the real launcher (``deepspeed --num_gpus N launchers/distill_gpt.py``) with identical
flags except ``--fcd_weight 0``; the table of metrics.json values and wall times is appended to
benchmarks/RESULTS.md with the command that produced it. Measures, asserts nothing.
"""

from __future__ import annotations

import argparse

from launch import REPO, launch  # benchmarks/launch.py (python puts benchmarks/ on sys.path)
from results import command_line, machine, publish, utc_stamp  # benchmarks/results.py
VARIANTS = {"FCD + CE (default)": [], "CE only (--fcd_weight 0)": ["--fcd_weight", "0"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_gpus", type=int, default=2, help="ranks (CPU: processes)")
    parser.add_argument("--out", default="outputs/bench_fcd_vs_ce", help="parent folder of the two runs")
    parser.add_argument("extra", nargs="*", help="flags passed to both runs (after --)")
    args = parser.parse_args()
    rows = []
    for name, variant in VARIANTS.items():
        metrics, wall = launch("distill_gpt", REPO / args.out / name.split()[0].lower(), [*args.extra, *variant], args.num_gpus)
        rows.append((name, metrics, wall))
    lines = [
        f"\n## FCD vs cross-entropy only — {utc_stamp()}",
        f"\nCommand: `{command_line('fcd_vs_ce.py')}` ({machine()}, {args.num_gpus} ranks). Perplexities on the held-out split.\n",
        "| variant | steps | teacher ppl | student ppl before | student ppl after | train tokens/s | wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m, wall in rows:
        lines.append(
            f"| {name} | {m['steps']} | {m['teacher_eval_perplexity']:.2f} | {m['student_eval_perplexity_initial']:.0f} | "
            f"{m['student_eval_perplexity']:.2f} | {m['train_tokens_per_second']:.1f} | {wall:.0f} |"
        )
    (_, m_fcd, w_fcd), (_, m_ce, w_ce) = rows
    lines.append(
        f"\nRatios (FCD / CE only): student ppl after {m_fcd['student_eval_perplexity'] / m_ce['student_eval_perplexity']:.3f}, "
        f"train tokens/s {m_fcd['train_tokens_per_second'] / m_ce['train_tokens_per_second']:.3f}, wall time {w_fcd / w_ce:.3f}.\n"
    )
    publish(lines, write=True, end="")


if __name__ == "__main__":
    main()
