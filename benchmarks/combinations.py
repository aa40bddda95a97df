"""Quality at budgets that mean something: logit KD alone and combined with FCD and the other feature losses,
several seeds, paired against CE + KD at equal steps and at equal training time.

    python benchmarks/combinations.py --task rotten_tomatoes             # 1 epoch per run, seeds 1-5; resumable
    python benchmarks/combinations.py --task austen --seeds 1 2 3        # the decoder, --austen_steps per run
    python benchmarks/combinations.py --report                           # tables and chart from the kept runs only

Arms (``--loss`` of the launcher; everything else equal: teacher, student initialisation, data order, steps,
learning rate, seed): ce (no teacher), ce+fcd (the launchers' default before issue 22), kd (logit KD alone),
ce+kd, ce+kd+fcd, ce+kd+minilm, ce+kd+hidden_mse, ce+dist+fcd; and with ``--variants``, CE + KD + FCD with
FCD's layers ``last`` and ``pruned``, ``--loss_balancer 0.5``, ``--fcd_weight_schedule linear``, and the
``--grad_norm_steps 20`` run behind the gradient-norm table (each term's gradient norm at the student's
blocks relative to KD's over training; the same training as plain CE + KD + FCD).

Tasks. ``rotten_tomatoes``: ``launchers/distill_bert.py``'s default job (all-MiniLM-L6-v2 fine-tuned by
``make teacher-bert``, its 3-block pruned student, 2 ranks x 16 snippets, batches padded to their longest
row) for --epochs of the training split (11,473 snippets: 359 steps per epoch), held-out accuracy on the
1,335 snippets of the validation split (51 movies the training split does not hold); every arm.
``austen``: ``launchers/distill_gpt.py``'s default models (SmolLM2-135M teacher, its depth-pruned 10-block
student) on four Austen novels of ``../shared/data/austen_5novels.txt`` (a document per paragraph, 2 ranks x
4 x 128 tokens), held-out perplexity on Northanger Abbey; :data:`DECODER_ARMS` unless --arms says otherwise.
The learning rate is constant after warm-up (DeepSpeed's ``WarmupLR``), and every run is evaluated --evals
times, so each evaluation is what a run stopped there would give. Equal time: every arm is read at its
last evaluation within the fastest arm's mean training seconds. Paired t-tests over the seeds both arms
finished (``scipy.stats.ttest_rel``).

Reuse: each finished run's metrics and evaluation curve are kept in
``benchmarks/combinations/<task>/<arm>_seed<k>.json`` (small), and a kept run is never run again, so the
benchmark can be finished over several sittings and on another clone; delete a file to run that arm again.
Runs are seed-major (every arm of seed 1, then of seed 2, ...) so that an interrupted benchmark leaves whole
seeds. The runs themselves go to $FCD_DS_HOME/benchmark_combinations/ and are removed once kept (a checkpoint
per run would fill the disk). Writes the
tables to benchmarks/RESULTS.md (with the machine's measured fp32 matmul rate) and the chart
benchmarks/quality.png. Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch import REPO, launch  # noqa: E402
from quality import austen_files, constant_lr_json, fmt, paired  # noqa: E402
from results import command_line, machine, matmul_rate, publish, utc_stamp  # noqa: E402

__all__ = ["ARMS", "VARIANTS", "TASKS", "main"]

ARMS = {"ce": "ce", "ce+fcd": "ce+fcd", "kd": "kd", "ce+kd": "ce+kd", "ce+kd+fcd": "ce+kd+fcd", "ce+kd+minilm": "ce+kd+minilm",
        "ce+kd+hidden_mse": "ce+kd+hidden_mse", "ce+dist+fcd": "ce+dist+fcd"}
VARIANTS = {  # issue 22 item 4, each on --variant_seeds: what makes a feature loss add to KD
    "ce+kd+fcd, gradient norms": ["--loss", "ce+kd+fcd", "--grad_norm_steps", 20],  # the same training as ce+kd+fcd, measured
    "ce+kd+fcd, map last": ["--loss", "ce+kd+fcd", "--layer_map", "last"],
    "ce+kd+fcd, map pruned": ["--loss", "ce+kd+fcd", "--layer_map", "pruned"],
    "ce+kd+fcd, balancer 0.5": ["--loss", "ce+kd+fcd", "--loss_balancer", 0.5],
    "ce+kd+fcd, fcd linear decay": ["--loss", "ce+kd+fcd", "--fcd_weight_schedule", "linear"],
}
BASELINE = "ce+kd"
DECODER_ARMS = ["ce", "ce+kd", "ce+kd+fcd", "ce+fcd"]  # fewer arms, more steps: a decoder run costs 3x an encoder run here
KEPT = REPO / "benchmarks" / "combinations"  # <task>/<arm>_seed<k>.json, reused
RUNS = Path(os.environ.get("FCD_DS_HOME", Path.home() / ".cache" / "fcd_ds")) / "benchmark_combinations"
TASKS = {"rotten_tomatoes": ("distill_bert", "accuracy", True), "austen": ("distill_gpt", "perplexity", False)}
RT_BATCH = 32  # 2 ranks x 16 snippets, distill_bert.py's default


def _curve(run_dir: Path, metric: str) -> list[list[float]]:
    """``[step, training seconds, metric]`` of every evaluation of a run (train_log.jsonl), the last one included."""
    key = f"eval/student_eval_{metric}"
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [[r["step"], r["eval/train_seconds"], r[key]] for r in rows if key in r and "eval/train_seconds" in r]


def task_flags(task: str, args) -> tuple[list, int]:
    """The launcher flags every arm of ``task`` shares, and the steps per run."""
    if task == "rotten_tomatoes":
        import pandas as pd

        from fcd_ds.assets import prepare_encoder_assets

        rows = len(pd.read_csv(prepare_encoder_assets().rotten_tomatoes_train))
        steps = math.ceil(args.epochs * rows / RT_BATCH)
        return ["--max_eval_samples", 0], steps
    train, valid = austen_files(RUNS / "austen_data")
    return ["--train_file", train, "--validation_file", valid, "--sample_by", "paragraph", "--max_seq_length", 128,
            "--per_device_train_batch_size", 4, "--max_eval_samples", args.austen_eval_blocks, "--per_device_eval_batch_size", 8], args.austen_steps


def run_arm(task: str, arm: str, seed: int, common: list, steps: int, args) -> dict:
    """The kept result of (task, arm, seed), running it first when it is not kept."""
    kept = KEPT / task / f"{arm}_seed{seed}.json"
    if kept.is_file():
        return json.loads(kept.read_text())
    launcher, metric, _ = TASKS[task]
    out = RUNS / task / f"{arm}_seed{seed}"
    flags = [*common, *(["--loss", ARMS[arm]] if arm in ARMS else VARIANTS[arm]), "--max_steps", steps, "--eval_steps", max(1, steps // args.evals),
             "--warmup_steps", max(1, steps // 20), "--seed", seed, "--save_steps", 0]
    metrics, wall = launch(launcher, out, flags, args.num_gpus)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    norms = [{k: v for k, v in r.items() if k == "step" or k.startswith("train/grad_norm/") or k.startswith("train/loss/")}
             for r in rows if any(k.startswith("train/grad_norm/") for k in r)]
    result = {"task": task, "arm": arm, "seed": seed, "steps": steps, "launcher": launcher, "flags": list(map(str, flags)),
              "metrics": metrics, "curve": _curve(out, metric), "grad_norms": norms, "wall_seconds": wall,
              "load_average_5min": os.getloadavg()[1]}  # at the end: above the 2 ranks, something else shared the cores
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(result, indent=1))
    shutil.rmtree(out)  # the benchmark's own run folder (model, checkpoint): its result is kept above
    return result


def _load(task: str) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for f in sorted((KEPT / task).glob("*_seed*.json")):
        r = json.loads(f.read_text())
        out.setdefault(r["arm"], {})[r["seed"]] = r
    return {arm: out[arm] for arm in [*ARMS, *VARIANTS] if arm in out}


def _at_time(curve: list, budget: float) -> list:
    within = [p for p in curve if p[1] <= budget * 1.0001]
    return within[-1] if within else curve[0]


def summarize(task: str) -> dict | None:
    """Per arm and seed: the metric at the end (equal steps) and at the equal-time budget, steps reached, tokens/s."""
    runs = _load(task)
    if not runs:
        return None
    budget = min(np.mean([r["curve"][-1][1] for r in seeds.values()]) for seeds in runs.values())
    arms = {}
    for arm, seeds in runs.items():
        timed = {s: _at_time(r["curve"], budget) for s, r in seeds.items()}
        arms[arm] = {"seeds": sorted(seeds), "steps": {s: r["curve"][-1][2] for s, r in seeds.items()},
                     "time": {s: t[2] for s, t in timed.items()}, "time_steps": {s: t[0] for s, t in timed.items()},
                     "seconds": np.mean([r["curve"][-1][1] for r in seeds.values()]),
                     "tokens_per_second": np.mean([r["metrics"]["train_tokens_per_second"] for r in seeds.values()]),
                     "peak_fraction": np.mean([r["metrics"].get("train_matmul_peak_fraction", float("nan")) for r in seeds.values()]),
                     "matmul_tflops": np.mean([r["metrics"].get("measured_matmul_tflops_per_device", float("nan")) for r in seeds.values()])}
    first = next(iter(next(iter(runs.values())).values()))
    _, metric, higher = TASKS[task]
    return {"budget": budget, "arms": arms, "metric": metric, "higher": higher, "steps": first["steps"],
            "teacher": first["metrics"].get(f"teacher_eval_{metric}"), "before": first["metrics"].get(f"student_eval_{metric}_initial")}


def _paired(arm: dict, base: dict, key: str) -> str:
    common = [s for s in arm["seeds"] if s in base["seeds"]]
    if len(common) < 2:
        return "(fewer than 2 common seeds)"
    return paired(np.array([arm[key][s] for s in common]), np.array([base[key][s] for s in common]))


def table(task: str, s: dict) -> list[str]:
    metric, better = s["metric"], "higher" if s["higher"] else "lower"
    base = s["arms"].get(BASELINE)
    lines = [f"\n### {task}: held-out {metric} ({better} is better), {s['steps']} steps per run\n",
             f"Teacher {s['teacher']:.4g}; student before training {s['before']:.4g}. Equal time: {s['budget']:.0f} training seconds "
             "(the fastest arm's mean). Paired: arm minus CE + KD over the seeds both finished, paired t-test p.\n",
             f"| arm | seeds | {metric}, equal steps | {metric}, equal time (steps reached) | train tokens/s | fraction of fp32 matmul rate | "
             f"minus CE + KD, equal steps | minus CE + KD, equal time |", "|---|---|---|---|---|---|---|---|"]
    for arm, r in s["arms"].items():
        vs = ("—", "—") if arm == BASELINE or base is None else (_paired(r, base, "steps"), _paired(r, base, "time"))
        steps_v, time_v = np.array(list(r["steps"].values())), np.array(list(r["time"].values()))
        reached = ", ".join(str(r["time_steps"][k]) for k in r["seeds"])
        lines.append(f"| {arm} | {len(r['seeds'])} | {fmt(steps_v)} | {fmt(time_v)} ({reached}) | {r['tokens_per_second']:.0f} | "
                     f"{r['peak_fraction']:.2f} of {r['matmul_tflops'] * 1e3:.0f} GFLOP/s | {vs[0]} | {vs[1]} |")
    return lines


def grad_norm_table(task: str) -> list[str]:
    """The ``--grad_norm_steps`` runs of ``task``: each term's gradient norm at each student block relative to
    KD's, over the first, middle and last third of training (mean over the measured steps and seeds)."""
    runs = _load(task).get("ce+kd+fcd, gradient norms", {})
    rows = [(r["steps"], row) for r in runs.values() for row in r["grad_norms"]]
    if not rows:
        return []
    keys = sorted({k for _, row in rows for k in row if k.startswith("train/grad_norm/")})
    blocks = sorted({k.rsplit("/", 1)[1] for k in keys}, key=lambda b: int(b[1:]))
    terms = sorted({k.split("/")[2] for k in keys} - {"kd"})
    thirds = ("first third", "middle third", "last third")
    lines = [f"\n### {task}: gradient norm of each weighted term at the student's blocks, relative to KD's "
             f"(`--grad_norm_steps 20`, ce+kd+fcd, seeds {sorted(runs)})\n",
             "| term / KD | block | " + " | ".join(thirds) + " |", "|---|---|" + "---|" * len(thirds)]
    for term in terms:
        for b in blocks:
            cells = []
            for i in range(3):
                part = [row[f"train/grad_norm/{term}/{b}"] / row[f"train/grad_norm/kd/{b}"] for steps, row in rows
                        if i * steps / 3 < row["step"] <= (i + 1) * steps / 3 and row.get(f"train/grad_norm/kd/{b}")]
                cells.append(f"{np.mean(part):.3g} ({len(part)})" if part else "—")
            lines.append(f"| {term} | {b} | " + " | ".join(cells) + " |")
    return lines


def plot(results: dict[str, dict], path: Path) -> None:
    """Bars (mean over seeds, sample-sd error bars) at equal steps and equal time, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4.8), squeeze=False)
    for ax, (task, s) in zip(axes[0], results.items()):
        names = list(s["arms"])
        x = np.arange(len(names))
        for offset, key, label in ((-0.2, "steps", "equal steps"), (0.2, "time", "equal time")):
            vals = [np.array(list(s["arms"][a][key].values())) for a in names]
            ax.bar(x + offset, [v.mean() for v in vals], 0.4, yerr=[v.std(ddof=1) if len(v) > 1 else 0 for v in vals], capsize=3, label=label)
        ax.set_xticks(x, [f"{a} ({len(s['arms'][a]['seeds'])})" for a in names], rotation=35, ha="right")
        ax.set_title(f"{task}: {s['metric']} ({'higher' if s['higher'] else 'lower'} is better), {s['steps']} steps; (seeds)")
        every = [v for a in names for k in ("steps", "time") for v in s["arms"][a][k].values()]
        lo, hi = min(every), max(every)
        ax.set_ylim(lo - 0.2 * (hi - lo + 1e-9), hi + 0.2 * (hi - lo + 1e-9))
        if s["teacher"] is not None:
            ax.axhline(s["teacher"], color="gray", linestyle="--", linewidth=1, label="teacher")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(TASKS), default="rotten_tomatoes")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=None,
                        help=f"default: every arm on rotten_tomatoes; {DECODER_ARMS} on austen (a run there takes about 13 minutes on 2 CPU cores)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=[], help="item-4 variants to run too (on --variant_seeds)")
    parser.add_argument("--variant_seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--epochs", type=float, default=1.0, help="rotten_tomatoes: passes over the training split per run")
    parser.add_argument("--austen_steps", type=int, default=300, help="austen: steps per run (2 x 4 x 128 tokens each)")
    parser.add_argument("--austen_eval_blocks", type=int, default=64, help="austen: held-out 128-token blocks of Northanger Abbey")
    parser.add_argument("--evals", type=int, default=6, help="evaluations per run, the last at the end (equal-time resolution)")
    parser.add_argument("--num_gpus", type=int, default=2, help="ranks (CPU: processes)")
    parser.add_argument("--report", action="store_true", help="write the tables and chart from the kept runs; run nothing")
    parser.add_argument("--no_write", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    if args.arms is None:
        args.arms = list(ARMS) if args.task == "rotten_tomatoes" else DECODER_ARMS

    from fcd_ds.runtime.metrics import measure_matmul_tflops

    if not args.report:
        common, steps = task_flags(args.task, args)
        common = [*common, "--deepspeed_config", constant_lr_json(RUNS)]
        for seed in sorted(set(args.seeds) | (set(args.variant_seeds) if args.variants else set())):
            for arm in [*(args.arms if seed in args.seeds else []), *(args.variants if seed in args.variant_seeds else [])]:
                run_arm(args.task, arm, seed, common, steps, args)
    peak = measure_matmul_tflops()
    results = {t: s for t in TASKS if (s := summarize(t)) is not None}
    lines = [f"Command: `{command_line('combinations.py')}`; {machine()}, {args.num_gpus} ranks; {matmul_rate(peak)} now (each arm's "
             "own rate, measured in its runs, is in its row). Mean ± sample standard deviation over seeds; the kept runs of "
             "benchmarks/combinations/ (each run's command in its file). Chart: `benchmarks/quality.png`."]
    for task, s in results.items():
        lines += table(task, s) + grad_norm_table(task)
    if results:
        plot(results, REPO / "benchmarks" / "quality.png")
    publish(lines, write=not args.no_write, heading=f"\n## Quality at real budgets: KD, FCD and their combinations ({utc_stamp()})\n\n")


if __name__ == "__main__":
    main()
