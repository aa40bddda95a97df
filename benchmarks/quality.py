"""Quality of every distillation method at equal steps and at equal training time, several seeds.

    python benchmarks/quality.py            # full benchmark (about 85 minutes on 2 CPU cores, estimated from measured run costs)
    python benchmarks/quality.py --quick    # a 10-minute subset: Rotten Tomatoes, fewer steps
    python benchmarks/quality.py --tasks austen --seeds 1 2 3 --steps 40

Tasks: Rotten Tomatoes and BBC News topics (accuracy; all-MiniLM-L6-v2 fine-tuned on the task as the
teacher, its depth-pruned 3-block student) and held-out perplexity on Jane Austen (SmolLM2-135M teacher,
its depth-pruned 10-block student; trained on four novels, evaluated on Northanger Abbey, from
``../shared/data/austen_5novels.txt``). For every task, every method runs with the same teacher,
student initialisation, data, steps and seeds; only ``--loss`` differs:

    none (the task loss alone, no teacher), ce+fcd, ce+kd, ce+hidden_mse, ce+minilm, ce+dist

plus, on the tasks named by ``--variant_tasks`` (default: Austen) and seeds ``--variant_seeds`` (default: the
first), FCD with the ``last`` and ``pruned`` layer maps and with (alpha, beta) = (1, 0) and (0, 1). The learning rate is constant after warm-up (DeepSpeed's
``WarmupLR``), and the student is evaluated every ``steps / evals`` steps, so each evaluation is the
result of a run stopped there. Equal time: every method is read at the last evaluation whose training
seconds are within the fastest method's total (the mean over seeds), which for a slower method is an
earlier step. Paired t-tests (same seeds: ``scipy.stats.ttest_rel``) of FCD against each other method.

Each run is ``deepspeed launchers/distill_{bert,gpt}.py`` kept under ``--out``; a finished run is not run
again, so an interrupted benchmark resumes. Writes a table per task to benchmarks/RESULTS.md (with the
machine's measured fp32 matmul rate) and a bar chart with error bars to benchmarks/quality.png
(matplotlib: ``pip install -e ".[bench]"``). Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launch import REPO, launch  # benchmarks/launch.py
from results import command_line, machine, matmul_rate, publish, utc_stamp  # benchmarks/results.py

METHODS = {"none": "ce", "fcd": "ce+fcd", "kd": "ce+kd", "hidden_mse": "ce+hidden_mse", "minilm": "ce+minilm", "dist": "ce+dist"}
VARIANTS = {"fcd map last": ["--loss", "ce+fcd", "--layer_map", "last"],
            "fcd map pruned": ["--loss", "ce+fcd", "--layer_map", "pruned"],
            "fcd alpha 1 beta 0": ["--loss", "ce+fcd", "--fcd_beta", "0"],
            "fcd alpha 0 beta 1": ["--loss", "ce+fcd", "--fcd_alpha", "0"]}
AUSTEN = REPO.parent / "shared" / "data" / "austen_5novels.txt"


@dataclass
class Task:
    name: str
    launcher: str
    metric: str  # key in metrics.json without the student_eval_ prefix
    higher_is_better: bool
    flags: list


def austen_files(root: Path) -> tuple[Path, Path]:
    """Four novels for training, Northanger Abbey held out (split at its title line)."""
    text = AUSTEN.read_text(encoding="utf-8")
    cut = text.index("\nNORTHANGER ABBEY\n")
    root.mkdir(parents=True, exist_ok=True)
    train, valid = root / "train.txt", root / "validation.txt"
    train.write_text(text[:cut], encoding="utf-8")
    valid.write_text(text[cut:], encoding="utf-8")
    return train, valid


def encoder_teacher(task: str, data: list, root: Path, steps: int) -> Path:
    """all-MiniLM-L6-v2 fine-tuned on the task: the default ``make teacher-bert`` model for Rotten Tomatoes
    when prepared, the one benchmarks/encoders.py fine-tuned (same recipe) when present, else fine-tuned here."""
    from fcd_ds.defaults import default_bert_teacher

    default = default_bert_teacher()
    if task == "rotten_tomatoes" and (default / "config.json").is_file():
        return default
    shared = REPO / "outputs" / "bench_encoders" / task / "teacher" / "model"
    if (shared / "config.json").is_file() and steps == 200:
        return shared
    launch("finetune_teacher", root / task / "teacher", [*data, "--max_steps", steps, "--seed", 0], 1, reuse=True)
    return root / task / "teacher" / "model"


def tasks(args, root: Path) -> list[Task]:
    from fcd_ds.assets import prepare_encoder_assets

    a = prepare_encoder_assets()
    out = []
    for name in args.tasks:
        if name == "austen":
            train, valid = austen_files(root / "austen" / "data")
            flags = ["--train_file", train, "--validation_file", valid, "--sample_by", "paragraph",  # hard-wrapped prose: a document per paragraph
                     "--max_seq_length", 64, "--per_device_train_batch_size", 2,
                     "--max_eval_samples", args.austen_eval_blocks, "--per_device_eval_batch_size", 8]
            out.append(Task(name, "distill_gpt", "perplexity", False, flags))
            continue
        if name == "rotten_tomatoes":
            data = ["--train_file", a.rotten_tomatoes_train, "--validation_file", a.rotten_tomatoes_validation, "--max_seq_length", 64,
                    "--per_device_train_batch_size", 16]
        else:
            data = ["--train_file", a.bbc_topics_train, "--validation_file", a.bbc_topics_validation, "--max_seq_length", 128,
                    "--per_device_train_batch_size", 8]
        teacher = encoder_teacher(name, data, root, args.teacher_steps)
        rows = args.rt_eval_rows if name == "rotten_tomatoes" else 0
        out.append(Task(name, "distill_bert", "accuracy", True, ["--teacher", teacher, *data, "--max_eval_samples", rows, "--per_device_eval_batch_size", 64]))
    return out


def constant_lr_json(root: Path) -> Path:
    """ds_configs/zero2.json with a constant learning rate after warm-up (WarmupLR), so that every
    intermediate evaluation is what a run stopped at that step would give."""
    from fcd_ds.config import DS_CONFIG_DIR

    cfg = json.loads((DS_CONFIG_DIR / "zero2.json").read_text())
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": "auto", "warmup_num_steps": "auto",
                                                       "warmup_type": "linear"}}
    root.mkdir(parents=True, exist_ok=True)
    path = root / "zero2_constant_lr.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def curve(run_dir: Path, metric: str) -> list[tuple[int, float, float]]:
    """``(step, training seconds, metric)`` of every evaluation of a run, the final one included."""
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    key = f"eval/student_eval_{metric}"
    return [(r["step"], r["eval/train_seconds"], r[key]) for r in rows if key in r and "eval/train_seconds" in r]


def at_time(points, budget: float):
    """The last evaluation within ``budget`` training seconds (the first one when none is)."""
    within = [p for p in points if p[1] <= budget * 1.0001]
    return within[-1] if within else points[0]


def summarize(task: Task, runs: dict[str, list[Path]]) -> dict:
    """Per method: per-seed metric at equal steps and at equal time, steps reached, seconds."""
    curves = {m: [curve(d, task.metric) for d in dirs] for m, dirs in runs.items()}
    budget = min(np.mean([c[-1][1] for c in cs]) for cs in curves.values())
    out = {}
    for m, cs in curves.items():
        timed = [at_time(c, budget) for c in cs]
        out[m] = {"steps": np.array([c[-1][2] for c in cs]), "time": np.array([t[2] for t in timed]),
                  "time_steps": [t[0] for t in timed], "seconds": np.mean([c[-1][1] for c in cs])}
    return {"budget": budget, "methods": out}


def paired(a: np.ndarray, b: np.ndarray) -> str:
    from scipy.stats import ttest_rel

    d = a - b
    p = ttest_rel(a, b).pvalue if len(d) > 1 and np.ptp(d) > 0 else float("nan")
    return f"{d.mean():+.4g} (per seed {', '.join(f'{x:+.3g}' for x in d)}; p = {p:.2g})"


def fmt(v: np.ndarray) -> str:
    return f"{v.mean():.4g} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2g}"


def table(task: Task, s: dict, teacher: float, before: float) -> list[str]:
    better = "higher" if task.higher_is_better else "lower"
    lines = [f"\n### {task.name}: held-out {task.metric} ({better} is better)\n",
             f"Teacher {teacher:.4g}; student before training {before:.4g}. Equal time: {s['budget']:.0f} training seconds "
             "(the fastest method's mean).\n",
             f"| method | {task.metric}, equal steps | {task.metric}, equal time (steps reached) | train seconds | "
             "FCD minus method, equal steps (paired) | FCD minus method, equal time (paired) |", "|---|---|---|---|---|---|"]
    fcd = s["methods"]["fcd"]
    for m, r in s["methods"].items():
        versus = ("—", "—") if m == "fcd" else (paired(fcd["steps"], r["steps"]), paired(fcd["time"], r["time"]))
        lines.append(f"| {m} | {fmt(r['steps'])} | {fmt(r['time'])} ({', '.join(map(str, r['time_steps']))}) | {r['seconds']:.0f} | "
                     f"{versus[0]} | {versus[1]} |")
    return lines


def plot(results: list[tuple[Task, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (task, s) in zip(axes[0], results):
        names = list(s["methods"])
        x = np.arange(len(names))
        for offset, key, label in ((-0.2, "steps", "equal steps"), (0.2, "time", "equal time")):
            vals = [s["methods"][m][key] for m in names]
            ax.bar(x + offset, [v.mean() for v in vals], 0.4, yerr=[v.std(ddof=1) if len(v) > 1 else 0 for v in vals],
                   capsize=3, label=label)
        ax.set_xticks(x, names, rotation=45, ha="right")
        ax.set_title(f"{task.name} ({task.metric}, {'higher' if task.higher_is_better else 'lower'} is better)")
        lo = min(s["methods"][m][k].min() for m in names for k in ("steps", "time"))
        hi = max(s["methods"][m][k].max() for m in names for k in ("steps", "time"))
        ax.set_ylim(lo - 0.15 * (hi - lo + 1e-9), hi + 0.15 * (hi - lo + 1e-9))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["rotten_tomatoes", "bbc_topics", "austen"], choices=["rotten_tomatoes", "bbc_topics", "austen"])
    parser.add_argument("--variant_tasks", nargs="*", default=["austen"], help="tasks that also run the layer-map and alpha/beta variants")
    parser.add_argument("--variant_seeds", nargs="*", type=int, default=[1], help="seeds of the variants (all of --seeds: 12 GPT runs more)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods compared (fcd and none always run)")
    parser.add_argument("--steps", type=int, default=40, help="encoder student steps per run")
    parser.add_argument("--austen_steps", type=int, default=24, help="GPT student steps per run (2 x 64 tokens each)")
    parser.add_argument("--evals", type=int, default=3, help="evaluations per run, the last at the end (equal-time resolution)")
    parser.add_argument("--austen_eval_blocks", type=int, default=32, help="held-out 64-token blocks of Northanger Abbey")
    parser.add_argument("--rt_eval_rows", type=int, default=600, help="held-out Rotten Tomatoes reviews (of 1,335) evaluated")
    parser.add_argument("--teacher_steps", type=int, default=200, help="encoder teacher fine-tuning steps (once per task; 200 = benchmarks/encoders.py's)")
    parser.add_argument("--num_gpus", type=int, default=1, help="ranks (CPU: processes)")
    parser.add_argument("--out", default="outputs/bench_quality", help="parent folder of every run (resumable)")
    parser.add_argument("--quick", action="store_true", help="Rotten Tomatoes only, seeds 1 2, 20 steps, 300 held-out reviews, no variants (about 10 minutes)")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.seeds, args.steps, args.variant_tasks, args.out = ["rotten_tomatoes"], args.seeds[:2], 20, [], args.out + "_quick"
        args.rt_eval_rows, args.evals = 300, 2

    from fcd_ds.runtime.metrics import measure_matmul_tflops

    peak = measure_matmul_tflops()
    root = REPO / args.out
    ds_json = constant_lr_json(root)
    results, lines = [], []
    for task in tasks(args, root):
        steps = args.austen_steps if task.name == "austen" else args.steps
        common = [*task.flags, "--deepspeed_config", ds_json, "--max_steps", steps, "--eval_steps", max(1, steps // args.evals),
                  "--warmup_steps", max(1, steps // 10)]
        methods = {m: loss for m, loss in METHODS.items() if m in {"none", "fcd", *args.methods}}
        arms = {m: ["--loss", loss] for m, loss in methods.items()}
        if task.name in args.variant_tasks:
            arms.update(VARIANTS)
        runs = {m: [] for m in arms}
        variant_seeds = args.variant_seeds or args.seeds
        for seed in args.seeds:
            for m, flags in arms.items():
                if m in VARIANTS and seed not in variant_seeds:
                    continue
                out = root / task.name / f"{m.replace(' ', '_')}_seed{seed}"
                # The teacher and the untrained student are evaluated once per task (identical in every run).
                start_eval = "true" if (m, seed) == ("none", args.seeds[0]) else "false"
                launch(task.launcher, out, [*common, *flags, "--seed", seed, "--eval_on_start", start_eval], args.num_gpus, reuse=True)
                runs[m].append(out)
        main_runs = {m: runs[m] for m in methods}
        s = summarize(task, main_runs)
        first = json.loads((runs["none"][0] / "metrics.json").read_text())
        teacher, before = first[f"teacher_eval_{task.metric}"], first[f"student_eval_{task.metric}_initial"]
        lines += table(task, s, teacher, before)
        if task.name in args.variant_tasks:
            fcd_same_seeds = [d for d, seed in zip(runs["fcd"], args.seeds) if seed in variant_seeds]
            v = summarize(task, {"fcd": fcd_same_seeds, **{m: runs[m] for m in VARIANTS}})
            lines += [f"\nLayer maps and (alpha, beta), {task.name}, seeds {variant_seeds} (FCD default: `uniform` map, alpha = beta = 1):\n"]
            lines += table(task, v, teacher, before)[2:]
        tok_s = {m: np.mean([json.loads((d / "metrics.json").read_text())["train_tokens_per_second"] for d in dirs]) for m, dirs in main_runs.items()}
        lines.append("\nTrain tokens/s (mean over seeds): " + ", ".join(f"{m} {v:.0f}" for m, v in tok_s.items()) + ".\n")
        results.append((task, s))

    plot(results, REPO / "benchmarks" / ("quality_quick.png" if args.quick else "quality.png"))
    head = [f"\n## Quality: every method, equal steps and equal time — {utc_stamp()}",
            f"\nCommand: `{command_line('quality.py')}` ({machine()}, {args.num_gpus} rank(s); "
            f"{matmul_rate(peak)}). Seeds {args.seeds}; encoder students {args.steps} steps, GPT "
            f"students {args.austen_steps} steps; constant learning rate after warm-up; {args.evals} evaluations per run. "
            f"Mean ± sample standard deviation over seeds; paired differences FCD minus method with the paired t-test p-value. "
            f"Chart: `benchmarks/{'quality_quick.png' if args.quick else 'quality.png'}`."]
    publish(head + lines, write=True)


if __name__ == "__main__":
    main()
