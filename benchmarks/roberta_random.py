"""RoBERTa end to end without RoBERTa weights: a small random-init RoBERTa is fine-tuned on Rotten
Tomatoes, then distilled into half its blocks with launchers/distill_roberta.py.

    python benchmarks/roberta_random.py                           # 60 + 60 steps, 2 ranks
    python benchmarks/roberta_random.py --teacher_steps 360 --steps 120 --num_gpus 1

No RoBERTa checkpoint ships offline, so the teacher is built here: a RoBERTa config of 4 blocks x 256
(4 heads, intermediate 1024) over the all-MiniLM-L6-v2 WordPiece tokenizer (vocab, pad id and
[CLS]/[SEP] as bos/eos ids taken from it; position embeddings sized for RoBERTa's padding offset:
positions run from pad_token_id + 1), initialised with seed 0 as ``RobertaForSequenceClassification``
and saved with that tokenizer under ``--out``/init. Then, on the embedded Rotten Tomatoes data (64 tokens):

    deepspeed --num_gpus N launchers/finetune_teacher.py --model_name_or_path <out>/init --max_steps T ...
    deepspeed --num_gpus N launchers/distill_roberta.py --teacher <out>/teacher/model --max_steps S ...

(student: the default half of the teacher's blocks, task loss + FCD). Teacher accuracy, student
accuracy before / after, tokens/s, GFLOP/s per rank as a fraction of the machine's measured fp32
matmul rate, wall times and the command are appended to benchmarks/RESULTS.md. A random-init teacher
trained for a few steps is weak: this checks that the RoBERTa path runs end to end and what it costs,
not distillation quality. Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from launch import REPO, launch  # benchmarks/launch.py (python puts benchmarks/ on sys.path)
from results import command_line, machine, matmul_rate, publish, utc_stamp  # benchmarks/results.py
MAX_SEQ_LENGTH = 64
SHAPE = {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024}


def roberta_config(tokenizer, max_seq_length: int = MAX_SEQ_LENGTH):
    """A RoBERTa config of :data:`SHAPE` over ``tokenizer`` (a BERT WordPiece tokenizer)."""
    from transformers import RobertaConfig

    pad = tokenizer.pad_token_id
    return RobertaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=pad,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        # RoBERTa numbers positions from pad_token_id + 1 (pads get pad_token_id): the last of
        # max_seq_length tokens is at pad + max_seq_length; one spare as roberta-base's 514 = 512 + 2 (pad 1).
        max_position_embeddings=max_seq_length + pad + 2,
        type_vocab_size=2,  # the BERT tokenizer gives segment ids 0 / 1 to sentence pairs
        **SHAPE,
    )


def build_roberta(out: Path, seed: int = 0, max_seq_length: int = MAX_SEQ_LENGTH) -> Path:
    """Save a random-init ``RobertaForSequenceClassification`` (seeded) with the all-MiniLM-L6-v2
    tokenizer in ``out``; returns ``out``."""
    import torch
    from transformers import AutoTokenizer, RobertaForSequenceClassification

    from fcd_ds.assets import prepare_encoder_assets

    tokenizer = AutoTokenizer.from_pretrained(prepare_encoder_assets().minilm)
    torch.manual_seed(seed)
    model = RobertaForSequenceClassification(roberta_config(tokenizer, max_seq_length))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher_steps", type=int, default=60, help="teacher fine-tuning steps (T)")
    parser.add_argument("--steps", type=int, default=60, help="student distillation steps (S)")
    parser.add_argument("--learning_rate", type=float, default=None,
                        help="peak learning rate of both runs (default: the launchers', 5e-5 / 1e-4, tuned for pretrained models)")
    parser.add_argument("--num_gpus", type=int, default=2, help="ranks (CPU: processes)")
    parser.add_argument("--out", default="outputs/bench_roberta_random", help="run folder (overwritten)")
    args = parser.parse_args()

    from fcd_ds.runtime.metrics import measure_matmul_tflops

    root = REPO / args.out
    lr = ["--learning_rate", args.learning_rate] if args.learning_rate else []
    init = build_roberta(root / "init")
    peak = measure_matmul_tflops()
    print(f"measured fp32 matmul rate: {peak * 1e3:.0f} GFLOP/s", flush=True)
    tm, twall = launch("finetune_teacher", root / "teacher",
                       ["--model_name_or_path", init, "--max_seq_length", MAX_SEQ_LENGTH, "--max_steps", args.teacher_steps, "--seed", 0, *lr],
                       args.num_gpus)
    sm, swall = launch("distill_roberta", root / "student",
                       ["--teacher", root / "teacher" / "model", "--max_seq_length", MAX_SEQ_LENGTH, "--max_steps", args.steps, *lr],
                       args.num_gpus)

    def rate(m: dict) -> str:
        g = m["train_tflops_per_device"] * 1e3
        return f"{g:.1f} ({g / (peak * 1e3):.2f})"

    from transformers import AutoConfig

    n_student = AutoConfig.from_pretrained(root / "student" / "student").num_hidden_layers
    shape = f"{SHAPE['num_hidden_layers']} x {SHAPE['hidden_size']}"
    lines = [f"\n## RoBERTa end to end from a random init — {utc_stamp()}",
             f"\nCommand: `{command_line('roberta_random.py')}` ({machine()}, {args.num_gpus} ranks; "
             f"{matmul_rate(peak)}, torch's default threads).",
             f"Teacher: random-init RoBERTa ({shape}, {SHAPE['num_attention_heads']} heads, all-MiniLM-L6-v2 WordPiece "
             f"tokenizer, seed 0), fine-tuned {tm['steps']} steps on Rotten Tomatoes ({MAX_SEQ_LENGTH} tokens); student: "
             f"the teacher's blocks kept by depth pruning ({n_student} x {SHAPE['hidden_size']}, default: half; FCD layer map "
             f"{sm['layer_map']}), task loss + FCD, {sm['steps']} steps. Accuracy on the held-out split.\n",
             "| run | accuracy before | accuracy after | parameters | train tokens/s | GFLOP/s per rank (fraction of the matmul rate) | wall time (s) |",
             "|---|---|---|---|---|---|---|",
             f"| teacher fine-tuning | {tm['student_eval_accuracy_initial']:.4f} | {tm['student_eval_accuracy']:.4f} | "
             f"{tm['student_num_params'] / 1e6:.2f}M | {tm['train_tokens_per_second']:.0f} | {rate(tm)} | {twall:.0f} |",
             f"| student distillation | {sm['student_eval_accuracy_initial']:.4f} | {sm['student_eval_accuracy']:.4f} | "
             f"{sm['student_num_params'] / 1e6:.2f}M | {sm['train_tokens_per_second']:.0f} | {rate(sm)} | {swall:.0f} |",
             f"\nTeacher accuracy as measured by the distillation run: {sm['teacher_eval_accuracy']:.4f}.\n"]
    publish(lines, write=True)


if __name__ == "__main__":
    main()
