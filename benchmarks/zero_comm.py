"""ZeRO communication settings of the shipped JSONs, measured at 2 ranks: overlap_comm, contiguous_gradients, buckets.

    python benchmarks/zero_comm.py                              # ZeRO-1, -2 and -3, every variant; prints, appends to RESULTS.md
    python benchmarks/zero_comm.py --stages 2 --steps 4 --no_write
    python benchmarks/zero_comm.py --stages 3 --only "overlap_comm on" --no_write   # the setting shipped before and one variant
    python benchmarks/zero_comm.py -- --max_seq_length 64       # flags after -- go to the launcher

Each variant is one ``deepspeed --num_gpus 2 launchers/distill_gpt.py`` run of the default job (SmolLM2-135M
teacher, 10-block pruned student, BBC News, CE + FCD, 4 x 128 tokens per rank and step, fp32 on DeepSpeed's CPU
accelerator with gloo) with ``--deepspeed_config`` a copy of the shipped ``ds_configs/zero{1,2,3}.json`` whose
``zero_optimization`` section has the variant's keys changed (nothing else), shortened to --steps optimizer
steps with no evaluation before or during training. ``OMP_NUM_THREADS`` is --threads per rank (default 1: one
core per rank on a 2-core machine, as one device per rank; torch's default would put 2 threads on each core).

The variants change one thing at a time from the setting shipped before this benchmark (:data:`BASELINE`,
:data:`VARIANTS`; the row equal to the shipped JSON now is marked); that setting runs first and last in each
stage, and the ratios are against the median of both its runs' steps, measured in the same sitting. Per variant, from the run's train_log.jsonl over the steps after the first --skip: the median
``perf/step_seconds`` and its parts (student forward + backward, where ZeRO-2/3 reduce the gradient buckets;
optimizer step, where ZeRO-2 all-gathers the updated partitions; teacher forward, where ZeRO-3 gathers the
teacher's shards), each rank's peak resident memory (metrics.json), and the largest relative difference of
``train/loss/total`` from the run of the setting shipped before at the same step (these are communication settings: the losses
should agree to float tolerance). The fp32 matmul rate is measured here before and after the runs
(``fcd_ds.runtime.metrics.measure_matmul_tflops``, 2 threads) and the share of the machine other processes used
during each run is shown, since a shared machine spoils the comparison.

A finished run's small record (steps, losses, times) is kept as JSON under benchmarks/zero_comm/ (--kept) and
reused by a later invocation with the same --steps, --threads and launcher flags, so an interrupted benchmark
continues where it stopped; one measured while other processes used more than --rerun_busy of the machine is
run again. Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from launch import REPO  # benchmarks/launch.py (python puts benchmarks/ on sys.path)
from results import command_line, machine, matmul_rate, publish, utc_stamp  # benchmarks/results.py
from threads import machine_busy_seconds  # benchmarks/threads.py

__all__ = ["VARIANTS", "variant_config", "run_variant", "main"]

KEPT = REPO / "benchmarks" / "zero_comm"

# The zero_optimization sections the JSONs shipped before this benchmark (2026-12-04): every variant is one of
# these with keys changed, so the grid stays the same when the shipped JSONs change; the row equal to the
# shipped JSON now is marked in the table.
BASELINE: dict[int, dict] = {
    1: {"stage": 1},
    2: {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 50_000_000, "overlap_comm": False, "contiguous_gradients": True,
        "reduce_bucket_size": 50_000_000},
    3: {"stage": 3, "overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": 50_000_000, "stage3_prefetch_bucket_size": 50_000_000,
        "stage3_param_persistence_threshold": 100_000, "stage3_max_live_parameters": 1_000_000_000, "stage3_gather_16bit_weights_on_model_save": True},
}

# (name, zero_optimization keys changed from BASELINE), per stage; the first ("shipped": shipped before) changes nothing.
VARIANTS: dict[int, list[tuple[str, dict]]] = {
    1: [("shipped", {}),  # zero1.json shipped DeepSpeed's defaults: 5e8-element buckets, contiguous_gradients on, overlap_comm off
        ("buckets 5e7", {"reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000}),
        ("contiguous_gradients off", {"contiguous_gradients": False}),
        ("overlap_comm on, buckets 5e7", {"overlap_comm": True, "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000})],
    2: [("shipped", {}),
        ("overlap_comm on", {"overlap_comm": True}),
        ("contiguous_gradients off", {"contiguous_gradients": False}),
        ("buckets 5e6", {"reduce_bucket_size": 5_000_000, "allgather_bucket_size": 5_000_000}),
        ("buckets 2e8", {"reduce_bucket_size": 200_000_000, "allgather_bucket_size": 200_000_000}),
        ("overlap_comm on, buckets 2e8", {"overlap_comm": True, "reduce_bucket_size": 200_000_000, "allgather_bucket_size": 200_000_000})],
    3: [("shipped", {}),
        ("overlap_comm on", {"overlap_comm": True}),
        ("contiguous_gradients off", {"contiguous_gradients": False}),
        ("reduce_bucket_size 5e6", {"reduce_bucket_size": 5_000_000}),
        ("reduce_bucket_size 2e8", {"reduce_bucket_size": 200_000_000}),
        ("stage3_prefetch_bucket_size 5e6", {"stage3_prefetch_bucket_size": 5_000_000}),
        ("stage3_prefetch_bucket_size 2e8", {"stage3_prefetch_bucket_size": 200_000_000}),
        ("stage3_param_persistence_threshold 0", {"stage3_param_persistence_threshold": 0}),
        ("stage3_param_persistence_threshold 1e6", {"stage3_param_persistence_threshold": 1_000_000})],
}


def variant_config(stage: int, changes: dict) -> dict:
    """The shipped ``ds_configs/zero<stage>.json`` with its ``zero_optimization`` section :data:`BASELINE` + ``changes``."""
    cfg = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
    cfg["zero_optimization"] = {**BASELINE[stage], **changes}
    return cfg


def _is_shipped_now(stage: int, changes: dict) -> bool:
    """Whether BASELINE + ``changes`` is the shipped JSON's section now, keys left out read as DeepSpeed 0.19's
    defaults (overlap_comm on at stage 3 only, contiguous_gradients on)."""
    def filled(section: dict) -> dict:
        return {"overlap_comm": stage == 3, "contiguous_gradients": True, **section}

    shipped = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())["zero_optimization"]
    return filled({**BASELINE[stage], **changes}) == filled(shipped)


def _tag(stage: int, name: str, repeat: int) -> str:
    return f"zero{stage}-" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + (f"-r{repeat}" if repeat else "")


def _children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_variant(stage: int, name: str, changes: dict, args, work: Path, key: dict, repeat: int = 0) -> dict:
    """One 2-rank run of the default job with the variant's JSON; its record, kept under ``args.kept`` (or the
    kept record of an earlier run with the same ``key``: steps, threads, launcher flags).

    Returns:
        ``{"stage", "name", "changes", "status", "wall_s", "other_busy", "utc"}`` and, for a finished run,
        ``"steps"`` (per step: step, step_s, fwd_bwd_s, optimizer_s, teacher_s, loss), ``"peak_gib_per_rank"``,
        ``"run_matmul_tflops"`` (the run's own start-up measurement).
    """
    tag = _tag(stage, name, repeat)
    path = args.kept / f"{tag}.json"
    if path.is_file() and (kept := json.loads(path.read_text())).get("key") == key and kept.get("status") == 0:
        if kept["other_busy"] <= args.rerun_busy:
            print(f"= {tag}: kept from {kept['utc']}", flush=True)
            return kept
        print(f"= {tag}: kept from {kept['utc']}, but other processes used {kept['other_busy']:.0%} of the machine then: again", flush=True)
    cfg_path, out, log = work / f"{tag}.json", work / tag, work / f"{tag}.log"
    cfg_path.write_text(json.dumps(variant_config(stage, changes), indent=2))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "launchers/distill_gpt.py", "--output_dir", str(out),
           "--overwrite_output_dir", "--deepspeed_config", str(cfg_path), "--per_device_train_batch_size", "4",
           "--max_steps", str(args.steps), "--eval_on_start", "false", "--eval_steps", "0", "--max_eval_samples", "8",
           "--report_to", "none", *args.flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}  # this checkout's fcd_ds
    print(f"+ [{tag}] OMP_NUM_THREADS={args.threads} {shlex.join(cmd)}", flush=True)
    busy0, mine0, start = machine_busy_seconds(), _children_cpu_seconds(), time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the runner and its ranks: a session of our own
            proc.wait()
            status = "timeout"
        except BaseException:  # Ctrl-C reaches only this process
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    wall = time.perf_counter() - start
    others = (machine_busy_seconds() - busy0) - (_children_cpu_seconds() - mine0)
    record = {"stage": stage, "name": name, "changes": changes, "repeat": repeat, "key": key, "status": status, "wall_s": wall,
              "other_busy": max(others, 0.0) / (wall * (os.cpu_count() or 1)), "utc": utc_stamp(),
              "sitting_matmul_tflops": args.matmul_tflops}  # this invocation's measurement before its runs
    if status != 0 or not (out / "metrics.json").is_file():
        text = log.read_text(encoding="utf-8", errors="replace")
        print(f"  failed ({status}); last lines of {log}:\n" + "\n".join(text.splitlines()[-30:]), flush=True)
        record["error"] = "\n".join(text.splitlines()[-12:])
    else:
        rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
        metrics = json.loads((out / "metrics.json").read_text())
        record.update(steps=[{"step": r["step"], "step_s": r["perf/step_seconds"], "fwd_bwd_s": r["time/student_forward_backward"],
                              "optimizer_s": r["time/optimizer_step"], "teacher_s": r["time/teacher_forward"], "loss": r["train/loss/total"]}
                             for r in rows if "perf/step_seconds" in r],
                      peak_gib_per_rank=metrics["peak_host_memory_gib_per_rank"],
                      run_matmul_tflops=metrics["measured_matmul_tflops_per_device"])
        print(f"  median step {statistics.median(s['step_s'] for s in _timed(record, args.skip)):.2f} s, {wall:.0f} s wall", flush=True)
    shutil.rmtree(out, ignore_errors=True)  # checkpoints and the exported student: about 1 GB per run
    args.kept.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return record


def _timed(record: dict, skip: int) -> list[dict]:
    """The record's steps after the first ``skip`` (all of them when none is left)."""
    return [s for s in record["steps"] if s["step"] > skip] or record["steps"]


def _median(records: list[dict], field: str, skip: int) -> float:
    return statistics.median(s[field] for r in records for s in _timed(r, skip))


def _loss_diff(record: dict, reference: dict) -> float:
    """Largest |loss - reference loss| / |reference loss| over the steps both logged."""
    ref = {s["step"]: s["loss"] for s in reference["steps"]}
    return max(abs(s["loss"] - ref[s["step"]]) / abs(ref[s["step"]]) for s in record["steps"] if s["step"] in ref)


def _num(v: int) -> str:
    """``5000000`` -> ``"5e6"``, ``0`` -> ``"0"`` (how DeepSpeed's docs write bucket sizes)."""
    if v == 0:
        return "0"
    mantissa, exponent = f"{v:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _fmt_changes(changes: dict) -> str:
    return ", ".join(f"`{k}` {str(v).lower()}" if isinstance(v, bool) else f"`{k}` {_num(v)}" for k, v in changes.items()) or "none"


def stage_table(stage: int, records: list[dict], skip: int) -> list[str]:
    """The stage's markdown rows: one per variant (the shipped setting's two runs pooled), ratios to the shipped median."""
    shipped = [r for r in records if r["name"] == "shipped" and "steps" in r]
    if not shipped:
        return [f"| ZeRO-{stage} | every run failed or the shipped runs did | - | - | - | - | - | - | - | - |"]
    base = _median(shipped, "step_s", skip)
    rows = []
    for r in records:
        label = "shipped before" + (f" (run {r['repeat'] + 1})" if len(shipped) > 1 else "") if r["name"] == "shipped" else r["name"]
        label += " **(shipped now)**" if _is_shipped_now(stage, r["changes"]) else ""
        if "steps" not in r:
            rows.append(f"| ZeRO-{stage} | {label} | {_fmt_changes(r['changes'])} | failed ({r['status']}): "
                        f"{r.get('error', '').splitlines()[-1][:120] if r.get('error') else ''} | - | - | - | - | - | {r['other_busy']:.0%} |")
            continue
        step = _median([r], "step_s", skip)
        diff = max(_loss_diff(r, s) for s in shipped)
        rows.append(f"| ZeRO-{stage} | {label} | {_fmt_changes(r['changes'])} | {step:.2f} | {step / base:.3f} | {_median([r], 'fwd_bwd_s', skip):.2f} | "
                    f"{_median([r], 'optimizer_s', skip):.2f} | {_median([r], 'teacher_s', skip):.2f} | "
                    f"{max(r['peak_gib_per_rank']):.2f} | {diff:.1e} | {r['other_busy']:.0%} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=int, nargs="+", choices=(1, 2, 3), default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=7, help="optimizer steps per run")
    p.add_argument("--skip", type=int, default=2, help="leading steps left out of the medians (warm-up)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per run before it is killed")
    p.add_argument("--only", nargs="+", default=None, help="variant names to run besides the setting shipped before (default: all of VARIANTS)")
    p.add_argument("--rerun_busy", type=float, default=0.1,
                   help="run a kept variant again when other processes used more than this share of the machine during it")
    p.add_argument("--kept", type=Path, default=KEPT, help="folder of the finished runs' records (reused)")
    p.add_argument("--no_write", action="store_true", help="print only")
    p.add_argument("flags", nargs="*", help="launcher flags (after --)")
    args = p.parse_args()

    import sys

    sys.path.insert(0, str(REPO))  # this checkout's fcd_ds, as the ranks get it
    from fcd_ds.runtime.metrics import measure_matmul_tflops

    key = {"steps": args.steps, "threads": args.threads, "flags": args.flags,
           "configs": hashlib.sha256(json.dumps([variant_config(s, {}) for s in (1, 2, 3)], sort_keys=True).encode()).hexdigest()[:12]}
    matmul_before = args.matmul_tflops = measure_matmul_tflops(threads=2)
    print(matmul_rate(matmul_before), flush=True)
    work = Path(tempfile.mkdtemp(prefix="fcd_zero_comm_"))
    started = utc_stamp()
    by_stage = {}
    for stage in args.stages:
        (shipped_name, shipped_changes), *others = VARIANTS[stage]
        records = [run_variant(stage, shipped_name, shipped_changes, args, work, key)]
        records += [run_variant(stage, n, c, args, work, key) for n, c in others if args.only is None or n in args.only]
        records.insert(1, run_variant(stage, shipped_name, shipped_changes, args, work, key, repeat=1))
        by_stage[stage] = records
    matmul_after = measure_matmul_tflops(threads=2)
    shutil.rmtree(work, ignore_errors=True)

    done = [r for rs in by_stage.values() for r in rs if "steps" in r]
    run_rates = [r["run_matmul_tflops"] * 1e3 for r in done]
    sittings = sorted({r["utc"] for r in done})
    sitting_rates = sorted({round(r["sitting_matmul_tflops"] * 1e3) for r in done if r.get("sitting_matmul_tflops")})
    span = f"{args.steps} steps per run, medians over steps {args.skip + 1}-{args.steps}" if args.steps > args.skip else f"all {args.steps} steps"
    lines = [f"Command: `{command_line('zero_comm.py')}`; {machine()}; {matmul_rate(matmul_before)} before the runs, "
             f"{matmul_after * 1e3:.0f} after"
             + (f" (the runs' own start-up measurements, per rank with {args.threads} thread{'s' if args.threads > 1 else ''}: {min(run_rates):.0f}-{max(run_rates):.0f} GFLOP/s)" if run_rates else "")
             + (f"; kept runs from earlier invocations, which measured {', '.join(map(str, sitting_rates))} GFLOP/s before their runs" if len(sitting_rates) > 1 else "")
             + f"; 2 ranks (gloo, DeepSpeed's CPU accelerator) x micro-batch 4 x 128 tokens, OMP_NUM_THREADS={args.threads} per rank; "
             f"the default job (SmolLM2-135M teacher, 10-block student, CE + FCD, fp32; launcher flags after `--` in the command change it); {span}. Runs finished {sittings[0] if sittings else '-'}"
             f" to {sittings[-1] if sittings else '-'} (this invocation started {started}).", "",
             "| stage | variant | `zero_optimization` changed | median step s | ratio to shipped before | student fwd+bwd s | optimizer step s "
             "| teacher fwd s | peak RSS GiB (max rank) | loss: largest relative difference from shipped before | machine used by others |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for stage, records in by_stage.items():
        lines += stage_table(stage, records, args.skip)
    losses = {stage: next((r for r in rs if r["name"] == "shipped" and "steps" in r), None) for stage, rs in by_stage.items()}
    said = [f"ZeRO-{stage} shipped before, `train/loss/total` by step: " + ", ".join(f"{s['loss']:.6f}" for s in r["steps"]) + "."
            for stage, r in losses.items() if r]
    if all(losses.get(s) for s in (2, 3)):
        said.append(f"ZeRO-3 against ZeRO-2 (shipped before): largest relative loss difference {_loss_diff(losses[3], losses[2]):.1e}.")
    lines += ["", " ".join(said)] if said else []
    publish(lines, write=not args.no_write, heading=f"\n## ZeRO communication settings at 2 ranks (benchmarks/zero_comm.py, {utc_stamp()})\n\n")


if __name__ == "__main__":
    main()
