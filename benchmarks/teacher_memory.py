"""Memory of a teacher that is never whole on one rank: peak per rank with 1 and 2 ranks, and a teacher
too large for one rank's memory cap distilled under that cap on 2 ranks.

    python benchmarks/teacher_memory.py              # appends its table to benchmarks/RESULTS.md
    python benchmarks/teacher_memory.py --no_write   # prints only

Teacher: a random-init Llama of 24 blocks x 1536 (GQA 24/8 heads, MLP 6144, SmolLM2's 49,152 tokens,
tied embeddings: 0.91B parameters, 3.4 GiB in fp32), saved once under outputs/bench_teacher_memory/ with
SmolLM2's tokenizer (the asset step's), so that the teacher, not the process's fixed cost, decides
whether a rank fits. Student: a fresh 4 x 320 Llama with the same vocabulary (--student_config).
Every run: ZeRO-3 (ds_configs/zero3.json: student and teacher partitioned), --loss ce+fcd on the uniform
map, 2 steps of 1 x 64 tokens per rank of the embedded BBC News text, no initial evaluation.

Ranks are started by hand (RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, as
launchers/slurm/distill.sbatch does), each in its own cgroup-v1 memory group created under this
process's own, so that a cap applies to one rank: ``memory.limit_in_bytes``; a rank over it is killed by
the kernel (exit -9). Reported per rank: the group's peak usage (``memory.max_usage_in_bytes``: what the
cap limits; the teacher's files are read once by this process first, so that their page cache is
charged here and not to a rank), the peak resident memory (``ru_maxrss``, from the run's metrics.json) and the teacher parameters
it holds (its ZeRO-3 shard). The cap is set half-way between the 1-rank and the largest 2-rank group peak
measured first (or --cap_gib). Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from launch import REPO, spawn  # benchmarks/launch.py (python puts benchmarks/ on sys.path)
from results import publish, utc_stamp  # benchmarks/results.py

GIB = 2**30
OUT = REPO / "outputs" / "bench_teacher_memory"
TEACHER_SHAPE = dict(hidden_size=1536, num_hidden_layers=24, intermediate_size=6144, num_attention_heads=24,
                     num_key_value_heads=8)
STUDENT_SHAPE = dict(hidden_size=320, num_hidden_layers=4, intermediate_size=864, num_attention_heads=5,
                     num_key_value_heads=5)


def memory_cgroup_root() -> Path | None:
    """This process's cgroup-v1 memory group, where child groups can be made (None: no cgroup v1 memory)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            root = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            return root if root.is_dir() and os.access(root, os.W_OK) else None
    return None


def make_models() -> tuple[Path, Path]:
    """The random-init teacher (saved once) and the student's config file."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from fcd_ds.assets import prepare_default_assets

    smollm2 = prepare_default_assets().teacher
    teacher_dir, student_cfg = OUT / "teacher", OUT / "student_config.json"
    base = AutoConfig.from_pretrained(smollm2)
    if not (teacher_dir / "config.json").is_file():
        cfg = AutoConfig.from_pretrained(smollm2, **TEACHER_SHAPE)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(teacher_dir)
        AutoTokenizer.from_pretrained(smollm2).save_pretrained(teacher_dir)
    cfg = base.to_dict() | STUDENT_SHAPE
    student_cfg.write_text(json.dumps(cfg))
    return teacher_dir, student_cfg


def run(name: str, ranks: int, flags: list, cap_gib: float | None, cgroups: Path, timeout: int) -> dict:
    """Run launchers/distill_gpt.py on ``ranks`` ranks, each in its own memory group (capped at
    ``cap_gib`` when given); returns the exit statuses, the groups' peak usage and the run's metrics
    (None when it failed)."""
    out = OUT / name.replace(" ", "_").replace(",", "").replace("-", "")
    groups = [cgroups / f"fcd_bench_{os.getpid()}_{out.name}_{rank}" for rank in range(ranks)]
    for group in groups:
        group.mkdir(exist_ok=True)
        if cap_gib is not None:
            (group / "memory.limit_in_bytes").write_text(str(int(cap_gib * GIB)))
    if cap_gib is not None:
        print(f"cap: {cap_gib:.2f} GiB per rank", flush=True)
    codes, seconds = spawn("launchers/distill_gpt.py", [*flags, "--output_dir", out, "--overwrite_output_dir"], ranks,
                           prefix=lambda rank: f"echo $$ > {groups[rank] / 'cgroup.procs'} && ", timeout=timeout)
    peaks = []
    for group in groups:
        peaks.append(int((group / "memory.max_usage_in_bytes").read_text()) / GIB)
        group.rmdir()
    metrics = json.loads((out / "metrics.json").read_text()) if all(c == 0 for c in codes) else None
    return {"name": name, "ranks": ranks, "cap_gib": cap_gib, "codes": codes, "seconds": seconds, "metrics": metrics,
            "cgroup_peak_gib": peaks}


def row(r: dict, teacher_numel: int) -> str:
    m = r["metrics"]
    cap = f"{r['cap_gib']:.2f}" if r["cap_gib"] else "none"
    if m is None:
        why = "killed by the cap (SIGKILL)" if any(c == -9 for c in r["codes"] if c != "timeout") else f"failed {r['codes']}"
        group = ", ".join(f"{v:.2f}" for v in r["cgroup_peak_gib"])
        return f"| {r['name']} | {r['ranks']} | {cap} | {why} | {group} | - | - | {r['seconds']:.0f} |"
    rss = ", ".join(f"{v:.2f}" for v in m["peak_host_memory_gib_per_rank"])
    group = ", ".join(f"{v:.2f}" for v in r["cgroup_peak_gib"])
    shard = ", ".join(f"{s * 4 / GIB:.2f} ({s / teacher_numel:.0%})" for s in m["teacher_param_shard_numel_per_rank"])
    return f"| {r['name']} | {r['ranks']} | {cap} | completed, {m['steps']} steps | {group} | {rss} | {shard} | {r['seconds']:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cap_gib", type=float, default=None, help="per-rank cap (default: between the measured 1- and 2-rank peaks)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--no_write", action="store_true", help="print only")
    args = parser.parse_args()

    cgroups = memory_cgroup_root()
    if cgroups is None:
        sys.exit("error: no writable cgroup-v1 memory group for this process: the per-rank cap cannot be set here")
    teacher, student_cfg = make_models()
    # Read the teacher's files once from this process, so that their page cache is charged to this group and
    # every rank's group holds the rank's own memory only (a cgroup pays for the cache pages it first reads).
    for f in sorted(teacher.iterdir()):
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    from transformers import AutoConfig, LlamaForCausalLM
    import torch

    with torch.device("meta"):
        teacher_numel = sum(p.numel() for p in LlamaForCausalLM(AutoConfig.from_pretrained(teacher)).parameters())
    flags = ["--teacher", teacher, "--student_config", student_cfg, "--deepspeed_config", "ds_configs/zero3.json",
             "--loss", "ce+fcd", "--max_steps", 2, "--max_seq_length", 64, "--per_device_train_batch_size", 1,
             "--per_device_eval_batch_size", 1, "--max_eval_samples", 2, "--eval_on_start", "false", "--warmup_steps", 1]
    results = [run("1 rank", 1, flags, None, cgroups, args.timeout), run("2 ranks", 2, flags, None, cgroups, args.timeout),
               run("2 ranks, --teacher_offload cpu", 2, [*flags, "--teacher_offload", "cpu"], None, cgroups, args.timeout)]
    cap = args.cap_gib
    if cap is None:
        if results[0]["metrics"] is None or results[1]["metrics"] is None:
            sys.exit("error: an uncapped run failed; pass --cap_gib")
        cap = (max(results[0]["cgroup_peak_gib"]) + max(results[1]["cgroup_peak_gib"])) / 2
    results += [run("1 rank, capped", 1, flags, cap, cgroups, args.timeout), run("2 ranks, capped", 2, flags, cap, cgroups, args.timeout)]

    from fcd_ds.runtime.metrics import measure_matmul_tflops

    lines = [f"Teacher {teacher_numel / 1e9:.2f}B parameters ({teacher_numel * 4 / GIB:.2f} GiB fp32); "
             f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"fp32 matmul {measure_matmul_tflops() * 1e3:.0f} GFLOP/s.", "",
             "| run | ranks | cap per rank (GiB) | result | group peak per rank (GiB) | peak RSS per rank (GiB) | teacher shard per rank (GiB, share) | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [row(r, teacher_numel) for r in results]
    publish(lines, write=not args.no_write, heading=f"\n## Teacher memory: sharded over ranks, under a per-rank cap ({utc_stamp()})\n\n"
                                                    "Command: `python benchmarks/teacher_memory.py`\n\n")


if __name__ == "__main__":
    main()
