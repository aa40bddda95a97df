"""What a distillation step costs against the parts it cannot avoid, in one process and one run.

    python benchmarks/step_cost.py                   # the default run's models, data and batch; prints, appends to RESULTS.md
    python benchmarks/step_cost.py --steps 10 --profile --no_write
    python benchmarks/step_cost.py -- --bf16          # flags after -- go to the launcher's parser (a GPU run)

Built with the library the launchers use (``plan_run`` + ``trainer.setup`` on the default
launchers/distill_gpt.py flags: SmolLM2-135M teacher, 10-block pruned student, BBC News, ZeRO-2 JSON),
in one rank (RANK=0, WORLD_SIZE=1), one student engine and one teacher engine shared by every variant.
Timed alone (accelerator-synchronised, median of --steps after --warmup):

* teacher forward to the deepest block the FCD layer map reads (no norm, no head: ``EarlyExit``), and
  the whole teacher with its head (what KD needs);
* student forward + backward with the task loss (CE) only, and the optimizer step (from the CE-only steps'
  own breakdown: DeepSpeed owns backward and step, so they are timed where they happen).

Then fcd_ds's full optimizer step (``DistillEngine.train_step``) with CE + FCD (default), CE + FCD with the
other ``--fcd_stack_pairs`` setting (pairs stacked on a CPU, one by one on a GPU), CE + FCD + KD,
CE only (CE and KD fused with the LM head, the default ``--fused_logit_loss``) and CE + FCD + KD on whole
(B, N, V) logits (``--fused_logit_loss false``), and each one's ratio to the sum of its parts: ``step / (teacher part + student fwd+bwd CE +
optimizer)``. With --profile, one torch.profiler pass over the default step grouped by operator kind.
Printed beside the machine's measured matmul rate and the achieved FLOP/s as a fraction of it.
Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import socket
import statistics
import tempfile
import time
from collections import defaultdict

from results import command_line, publish, utc_stamp  # benchmarks/results.py (python puts benchmarks/ on sys.path)

GROUPS = (  # (group, substrings of operator names), first match wins; ranges ("loss/fcd", ...) are matched first
    ("matmul", ("mm", "addmm", "bmm", "linear", "matmul", "baddbmm", "einsum")),
    ("attention", ("scaled_dot_product", "_efficient_attention", "_flash_attention", "softmax")),
    ("norm / activation", ("rms_norm", "layer_norm", "silu", "gelu", "pow", "rsqrt", "mean", "mul", "add", "sigmoid")),
    ("cross-entropy", ("log_softmax", "nll_loss", "cross_entropy")),
    ("collectives", ("gloo", "allreduce", "all_reduce", "all_gather", "broadcast", "reduce_scatter", "c10d")),
    ("copies / indexing", ("copy_", "cat", "index", "embedding", "to", "clone", "contiguous", "fill_", "zero_", "empty")),
)
RANGES = ("optimizer_step", "loss/fcd", "loss/kd", "loss/ce", "loss/fused_logits")


def _sync():
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()


def timed(fn, steps: int, warmup: int) -> list[float]:
    out = []
    for i in range(warmup + steps):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        if i >= warmup:
            out.append(time.perf_counter() - start)
    return out


def profile_groups(prof) -> dict[str, float]:
    """Self CPU time (s) by group: an event inside one of :data:`RANGES` counts for that range, any other by
    its operator name (:data:`GROUPS`), the rest as 'other'."""
    totals = defaultdict(float)
    for e in prof.events():
        if e.name in RANGES or e.name.startswith("ProfilerStep") or e.name == "teacher_forward":
            continue
        parent, label = e.cpu_parent, None
        while parent is not None:
            if parent.name in RANGES:
                label = parent.name
                break
            parent = parent.cpu_parent
        if label is None:
            name = e.name.removeprefix("aten::").lower()
            label = next((g for g, keys in GROUPS if any(k in name for k in keys)), "other")
        totals[label] += e.self_cpu_time_total / 1e6
    return dict(totals)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="also profile the default step by operator group")
    p.add_argument("--no_write", action="store_true", help="print only")
    p.add_argument("--peak_tflops", type=float, default=None, help="the device's spec peak for its dtype (MFU column), e.g. 989 for H100 bf16")
    p.add_argument("flags", nargs="*", help="launcher flags (after --)")
    args = p.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    from fcd_ds import defaults, trainer
    from fcd_ds.config import DistillArguments, parse_args
    from fcd_ds.engine import DistillEngine
    from fcd_ds.runtime.metrics import measure_matmul_tflops, transformer_flops_per_token
    from fcd_ds.plan import plan_run

    out = tempfile.mkdtemp(prefix="fcd_step_cost_")
    launcher = defaults.GPT
    plan = plan_run(*parse_args(["--output_dir", out, "--eval_on_start", "false", *args.flags], launcher.flags), launcher)
    job = trainer.setup(plan)
    from fcd_ds.build import model_dtype

    dtype = model_dtype(plan.ds_config)
    matmul_n = 8192 if torch.cuda.is_available() else 2048
    peak_before = measure_matmul_tflops(n=matmul_n, dtype=dtype) * 1e12  # the rate drifts on shared machines: before and after
    student, teacher, task = job.distiller.student, job.distiller.teacher, plan.task

    def engine_for(loss: str, fused: bool = True, stack: str = "auto") -> DistillEngine:
        weights = {f"{t}_weight": None for t in ("ce", "fcd", "kd", "hidden_mse", "minilm", "dist")}
        args = DistillArguments(**{**dataclasses.asdict(plan.distill_args), "loss": loss, **weights, "fused_logit_loss": fused,
                                   "fcd_stack_pairs": stack})
        return DistillEngine(student, teacher, plan.pairs, args, task, plan.attention_pairs)

    # --fcd_stack_pairs auto stacks the layer pairs on accelerators only: the other setting, side by side.
    other_stack = ("CE + FCD, pairs one by one", "false") if torch.cuda.is_available() else ("CE + FCD, pairs stacked", "true")
    variants = {"CE + FCD (default)": engine_for("ce+fcd"), other_stack[0]: engine_for("ce+fcd", stack=other_stack[1]),
                "CE + FCD + KD": engine_for("ce+fcd+kd"), "CE only": engine_for("ce"),
                "CE + FCD + KD, unfused logits": engine_for("ce+fcd+kd", fused=False)}
    batches = job.micro_batches
    batch = variants["CE only"]._to_device(next(batches))
    gas = student.gradient_accumulation_steps()
    tokens = plan.ds_config["train_micro_batch_size_per_gpu"] * plan.data_args.max_seq_length * gas

    # Parts, alone.
    parts = {"teacher to the deepest FCD block": [t * gas for t in timed(lambda: variants["CE + FCD (default)"].teacher_forward(batch), args.steps, args.warmup)],
             "teacher whole, with head (KD)": [t * gas for t in timed(lambda: variants["CE + FCD + KD, unfused logits"].teacher_forward(batch),
                                                                      args.steps, args.warmup)]}
    ce_steps = [variants["CE only"].train_step(batches) for _ in range(args.warmup + args.steps)][args.warmup:]
    parts["student fwd+bwd, CE only"] = [m["time/student_forward_backward"] for m in ce_steps]
    parts["optimizer step"] = [m["time/optimizer_step"] for m in ce_steps]
    med = {k: statistics.median(v) for k, v in parts.items()}

    # Full steps.
    rows = []
    sums = {"CE + FCD (default)": med["teacher to the deepest FCD block"], other_stack[0]: med["teacher to the deepest FCD block"], "CE + FCD + KD": med["teacher whole, with head (KD)"], "CE only": 0.0,
            "CE + FCD + KD, unfused logits": med["teacher whole, with head (KD)"]}
    for name, engine in variants.items():
        step = statistics.median(timed(lambda: engine.train_step(batches), args.steps, args.warmup))
        parts_sum = sums[name] + med["student fwd+bwd, CE only"] + med["optimizer step"]
        flops = transformer_flops_per_token(plan.student_config, plan.data_args.max_seq_length, head=True, backward=True)
        if name != "CE only":
            tcfg = copy.deepcopy(plan.teacher_config)
            if engine.teacher_exit is not None:
                tcfg.num_hidden_layers = engine.teacher_exit.depth
            flops += transformer_flops_per_token(tcfg, plan.data_args.max_seq_length, head=engine.teacher_exit is None)
        rows.append((name, step, parts_sum, step / parts_sum, tokens / step, flops * tokens / step))

    peak_after = measure_matmul_tflops(n=matmul_n, dtype=dtype) * 1e12
    peak = (peak_before + peak_after) / 2
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    lines = [f"Command: `{command_line('step_cost.py')}`; {device}; measured {str(dtype).removeprefix('torch.')} matmul {peak / 1e9:.0f} GFLOP/s (mean of {peak_before / 1e9:.0f} before and {peak_after / 1e9:.0f} after the steps); one rank, micro-batch "
             f"{plan.ds_config['train_micro_batch_size_per_gpu']} x {plan.data_args.max_seq_length} tokens x {gas} accumulation; "
             f"median of {args.steps} after {args.warmup} warm-up.", "",
             "| part, alone | median s |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in med.items()]
    mfu = args.peak_tflops is not None
    lines += ["", "| step | median s | sum of its parts s | step / parts | tokens/s | achieved GFLOP/s | fraction of measured matmul |"
              + (" MFU |" if mfu else ""), "|---|---|---|---|---|---|---|" + ("---|" if mfu else "")]
    lines += [f"| {n} | {s:.3f} | {ps:.3f} | {r:.3f} | {tk:.0f} | {fl / 1e9:.1f} | {fl / peak:.2f} |"
              + (f" {fl / 1e12 / args.peak_tflops:.3f} |" if mfu else "") for n, s, ps, r, tk, fl in rows]

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        engine = variants["CE + FCD (default)"]
        for _ in range(args.warmup):
            engine.train_step(batches)
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])) as prof:
            for _ in range(3):
                engine.train_step(batches)
        groups = profile_groups(prof)
        total = sum(groups.values())
        lines += ["", "Profile of the default step (CE + FCD), self CPU time of 3 steps by group "
                  "(ranges: operators called inside `optimizer_step`, the forward of `loss/fcd`, `loss/fused_logits` (CE in the head), `loss/kd`, `loss/ce`):", "",
                  "| group | s | share |", "|---|---|---|"]
        lines += [f"| {g} | {v:.2f} | {v / total:.1%} |" for g, v in sorted(groups.items(), key=lambda kv: -kv[1])]
    publish(lines, write=not args.no_write, heading=f"\n## Step cost against its unavoidable parts ({utc_stamp()})\n\n")
    trainer.finish()


if __name__ == "__main__":
    main()
