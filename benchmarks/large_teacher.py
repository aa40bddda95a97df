"""A teacher of over a billion parameters distilled with ZeRO-3 on GPUs: tokens/s, TFLOP/s, MFU, peak memory.

    python benchmarks/large_teacher.py --train_file T --validation_file V --tokenizer DIR   # on a GPU machine
    python benchmarks/large_teacher.py ... --num_gpus 8 --peak_tflops 989

Teacher: a random-init Llama of SmolLM2-1.7B's public shape (24 blocks x 2048, 32 heads, MLP 8192,
49,152 tokens, tied embeddings: 1.71B parameters), built once on the GPU in bf16 and saved with the
tokenizer of ``--tokenizer`` (SmolLM2's, e.g. the asset step's folder). Student: the teacher depth-pruned
to 8 blocks (the launcher's default third). Run: launchers/distill_gpt.py, ZeRO-3 (ds_configs/zero3.json
with bf16 on and ``torch_adam`` so that no DeepSpeed op is compiled), ``--loss ce+fcd``, uniform layer
map, ``--max_steps`` steps of micro-batch x sequence tokens per GPU, ranks started by
``benchmarks/launch.py``'s :func:`spawn` (RANK / WORLD_SIZE from the environment, NCCL).

Printed and written to ``OUT/summary.json``: the device's measured bf16 matmul rate (8192^3 products),
the median step's tokens/s, TFLOP/s per GPU, MFU against ``--peak_tflops`` and against the measured
rate, and the peak GPU memory per rank (``torch.cuda.max_memory_allocated``). Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from launch import REPO, spawn  # benchmarks/launch.py

SHAPE = dict(hidden_size=2048, num_hidden_layers=24, intermediate_size=8192, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192)


def make_teacher(tokenizer: Path, dest: Path, shape: dict) -> int:
    """Save the random-init teacher (bf16) with the tokenizer once; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, rms_norm_eps=1e-5, rope_theta=130000, hidden_act="silu", bos_token_id=0, eos_token_id=0)
    if not (dest / "config.json").is_file():
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(dest)
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(dest)
        del model
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train_file", required=True)
    p.add_argument("--validation_file", required=True)
    p.add_argument("--tokenizer", required=True, help="SmolLM2 tokenizer folder")
    p.add_argument("--out", default=str(REPO / "outputs" / "bench_large_teacher"))
    p.add_argument("--num_gpus", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=8)
    p.add_argument("--micro_batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--peak_tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--shape", default="", help="override the teacher shape, e.g. 'hidden_size=64,num_hidden_layers=3,"
                   "intermediate_size=128,num_attention_heads=4,num_key_value_heads=4' (a CPU smoke test)")
    p.add_argument("--student_num_layers", type=int, default=8)
    args = p.parse_args()
    shape = {**SHAPE, **{k: int(v) for k, v in (item.split("=") for item in args.shape.split(",") if item)}}

    import torch

    from fcd_ds.runtime.metrics import measure_matmul_tflops

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_numel = make_teacher(Path(args.tokenizer), out / "teacher", shape)
    measured = measure_matmul_tflops(n=8192 if torch.cuda.is_available() else 1024, dtype=torch.bfloat16)
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    cfg["bf16"] = {"enabled": True}
    cfg["optimizer"]["params"]["torch_adam"] = True
    ds_json = out / "zero3_bf16.json"
    ds_json.write_text(json.dumps(cfg, indent=2))
    run = out / "run"
    flags = ["--teacher", out / "teacher", "--student_num_layers", args.student_num_layers, "--deepspeed_config", ds_json, "--loss", "ce+fcd",
             "--train_file", args.train_file, "--validation_file", args.validation_file, "--max_seq_length", args.seq,
             "--per_device_train_batch_size", args.micro_batch, "--per_device_eval_batch_size", args.micro_batch,
             "--max_eval_samples", args.micro_batch * args.num_gpus, "--max_steps", args.max_steps, "--warmup_steps", 1,
             "--eval_on_start", "false", "--peak_tflops", args.peak_tflops, "--output_dir", run, "--overwrite_output_dir"]
    codes, seconds = spawn("launchers/distill_gpt.py", flags, args.num_gpus)
    if any(codes):
        sys.exit(f"error: the run failed with exit statuses {codes}")
    metrics = json.loads((run / "metrics.json").read_text())
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "perf/tokens_per_second" in r][2:] or [r for r in rows if "perf/tokens_per_second" in r]
    median = {k: statistics.median(r[k] for r in steps) for k in ("perf/tokens_per_second", "perf/tflops_per_device", "perf/step_seconds")}
    summary = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "num_gpus": args.num_gpus,
        "measured_bf16_matmul_tflops": measured,
        "teacher_params": teacher_numel,
        "student_params": metrics["student_num_params"],
        "tokens_per_step": args.micro_batch * args.seq * args.num_gpus,
        "median_step_seconds": median["perf/step_seconds"],
        "median_tokens_per_second": median["perf/tokens_per_second"],
        "median_tflops_per_gpu": median["perf/tflops_per_device"],
        "mfu_vs_peak": median["perf/tflops_per_device"] / args.peak_tflops,
        "fraction_of_measured_matmul": median["perf/tflops_per_device"] / measured,
        "peak_gpu_memory_gib_per_rank": metrics.get("peak_device_memory_gib_per_rank"),
        "peak_host_memory_gib_per_rank": metrics.get("peak_host_memory_gib_per_rank"),
        "teacher_param_shard_numel_per_rank": metrics["teacher_param_shard_numel_per_rank"],
        "final_train_loss": {k: [r for r in rows if "train/loss/total" in r][-1][k] for k in ("train/loss/ce", "train/loss/fcd")},
        "wall_seconds": seconds,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
