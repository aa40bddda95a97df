"""A cost model for clusters: the predicted step time, tokens/s and MFU of a distillation run on GPUs, from the
per-part costs measured here (step_cost.py) and the modelled collectives (fcd_comm.py).

    python benchmarks/scaling.py              # prints, appends to RESULTS.md (reads RESULTS.md; runs no model)
    python benchmarks/scaling.py --no_write

Configurations (:data:`RUNS`): an 8B teacher (Llama-3-8B's shape) into a 1B student (Llama-3.2-1B's shape)
on 2 x 8 H100, ZeRO-3 for both, bf16, 8 x 2048 tokens per rank, CE + FCD over 16 layer pairs, FCD's global
batch on; and the one GPU run in RESULTS.md (a random-init 1.7B teacher with its 8-block 0.64B student on one
H100, ZeRO-3, bf16, 8 x 1024 tokens), whose measurement is printed beside its prediction.

The model, part by part (every constant is in :data:`ASSUMED`, printed with the table):

* compute: FLOPs of the teacher forward to its deepest FCD block (no head) and of the student forward +
  backward with its head (``fcd_ds.runtime.metrics.transformer_flops_per_token``, the count the launchers'
  MFU uses), each at the fraction of the matmul rate that part achieved in a measurement, times the GPU's
  measured bf16 matmul rate. Two sources of those fractions: ``CPU`` - the newest "Step cost against its
  unavoidable parts" table in RESULTS.md (this machine, float32, the default models), its step / parts ratio
  for FCD and the rest of the step, and AdamW from HBM traffic; ``H100`` - the 1.7B run's own per-part times
  (fitted on it: its own row is then not a prediction) and its AdamW seconds per parameter.
* collectives: ring bytes per rank from fcd_comm.py's model (FCD's Gram scheme, ZeRO-3's gradient
  reduce-scatter and parameter all-gathers), over the slowest link a collective crosses (between nodes for
  16 ranks on 2 nodes), no latency term. Two bounds: ``serial`` (nothing overlapped) and ``overlapped``
  (ZeRO's collectives hidden behind compute where compute is longer; FCD's exposed: its collectives wait on
  the features).
* MFU = the counted FLOPs per token x tokens/s / (ranks x the dense bf16 peak).

Measures nothing itself and asserts nothing: a prediction to be checked against a cluster run.
"""

from __future__ import annotations

import argparse
import re

from fcd_comm import LINKS, fcd_model, zero_model  # benchmarks/fcd_comm.py
from results import RESULTS, command_line, publish, utc_stamp  # benchmarks/results.py

__all__ = ["ASSUMED", "RUNS", "cpu_fractions", "predict"]

ASSUMED = {
    "H100 dense bf16 peak, TFLOP/s (MFU denominator)": 989.0,
    "H100 measured bf16 matmul, TFLOP/s (RESULTS.md, 8192^3, 2026-11-26)": 771.0,
    "H100 HBM3 bandwidth, TB/s (AdamW, CPU column)": 3.35,
    "AdamW bytes moved per student parameter on its rank (fp32 master, m, v read + written, fp32 grad read, bf16 write)": 30,
    "network between nodes, GB/s per GPU (400 Gb/s NIC per GPU)": LINKS["network (between nodes)"] / 1e9,
    "NVLink within a node, GB/s per GPU and direction": LINKS["NVLink (within a node)"] / 1e9,
}
# The one GPU run (RESULTS.md, "A 1.7B-parameter teacher with ZeRO-3 on one H100 - 2026-11-26 06:04 UTC").
H100_RUN = {"step": 0.352, "teacher": 0.135, "student": 0.181, "optimizer": 0.034, "tokens_per_s": 23294, "mfu": 0.175,
            "student_params": 637_569_024}
LLAMA = dict(rms_norm_eps=1e-5, hidden_act="silu")
RUNS = {
    "8B -> 1B, 2 x 8 H100": dict(
        teacher=dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
        student=dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
        student_params=1.236e9, teacher_params=8.03e9, ranks=16, ranks_per_node=8, micro_batch=8, seq=2048, pairs=16, measured=None),
    "1.7B -> 0.64B, 1 H100 (the GPU run)": dict(
        teacher=dict(hidden_size=2048, num_hidden_layers=24, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=32, vocab_size=49152),
        student=dict(hidden_size=2048, num_hidden_layers=8, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=32, vocab_size=49152),
        student_params=637_569_024, teacher_params=1_711_376_384, ranks=1, ranks_per_node=1, micro_batch=8, seq=1024, pairs=8,
        measured=H100_RUN),
}


def _cfg(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**shape, **LLAMA)


def _newest_step_cost() -> tuple[str, dict]:
    """The newest step_cost.py section of RESULTS.md: ``(heading, {matmul GFLOP/s, micro-batch, seq, parts, FCD step})``."""
    text = RESULTS.read_text(encoding="utf-8")
    starts = [m.start() for m in re.finditer(r"^## Step cost against its unavoidable parts.*$", text, re.M)]
    if not starts:
        raise SystemExit("error: no step_cost.py table in benchmarks/RESULTS.md: run python benchmarks/step_cost.py first")
    section = text[starts[-1]:].split("\n## ", 1)[0]
    heading = section.splitlines()[0].removeprefix("## ")
    rate = float(re.search(r"measured float32 matmul (\d+(?:\.\d+)?) GFLOP/s", section).group(1))
    mb, seq, gas = map(int, re.search(r"micro-batch (\d+) x (\d+) tokens x (\d+) accumulation", section).groups())
    rows = {m.group(1).strip(): [c.strip() for c in m.group(2).split("|")] for m in re.finditer(r"^\| ([^|]+) \|(.*)\|$", section, re.M)}
    parts = {k: float(rows[k][0]) for k in ("teacher to the deepest FCD block", "student fwd+bwd, CE only", "optimizer step")}
    return heading, {"rate": rate * 1e9, "micro_batch": mb * gas, "seq": seq, "parts": parts,
                     "step_over_parts": float(rows["CE + FCD (default)"][2])}


def cpu_fractions() -> tuple[str, dict]:
    """Fractions of the measured matmul rate that the teacher forward and the student forward + backward reached
    in the newest step_cost.py table (the default run: SmolLM2-135M teacher to block 29, 10-block student)."""
    from fcd_ds.assets import default_assets
    from fcd_ds.models import pruned_student_config
    from fcd_ds.runtime.metrics import transformer_flops_per_token
    from transformers import AutoConfig

    heading, m = _newest_step_cost()
    teacher = AutoConfig.from_pretrained(default_assets().teacher)
    student = pruned_student_config(teacher, 10)  # the default run's student: 10 of the 30 blocks
    tokens = m["micro_batch"] * m["seq"]
    t_flops = transformer_flops_per_token(teacher, m["seq"], head=False) * tokens  # the uniform map reads the last block
    s_flops = transformer_flops_per_token(student, m["seq"], head=True, backward=True) * tokens
    return heading, {"teacher": t_flops / (m["parts"]["teacher to the deepest FCD block"] * m["rate"]),
                     "student": s_flops / (m["parts"]["student fwd+bwd, CE only"] * m["rate"]),
                     "step_over_parts": m["step_over_parts"]}


def h100_fractions() -> dict:
    """The same fractions from the 1.7B H100 run's per-part times (its student part includes FCD)."""
    from fcd_ds.runtime.metrics import transformer_flops_per_token

    run = RUNS["1.7B -> 0.64B, 1 H100 (the GPU run)"]
    tokens, rate = run["micro_batch"] * run["seq"], ASSUMED["H100 measured bf16 matmul, TFLOP/s (RESULTS.md, 8192^3, 2026-11-26)"] * 1e12
    t = transformer_flops_per_token(_cfg(run["teacher"]), run["seq"], head=False) * tokens
    s = transformer_flops_per_token(_cfg(run["student"]), run["seq"], head=True, backward=True) * tokens
    return {"teacher": t / (H100_RUN["teacher"] * rate), "student": s / (H100_RUN["student"] * rate),
            "step_over_parts": H100_RUN["step"] / (H100_RUN["teacher"] + H100_RUN["student"] + H100_RUN["optimizer"]),
            "optimizer_s_per_param": H100_RUN["optimizer"] / H100_RUN["student_params"]}


def predict(run: dict, fractions: dict) -> dict:
    """Seconds per step by part, the serial and overlapped step, tokens/s and MFU of ``run`` under ``fractions``."""
    from fcd_ds.runtime.metrics import transformer_flops_per_token

    rate = ASSUMED["H100 measured bf16 matmul, TFLOP/s (RESULTS.md, 8192^3, 2026-11-26)"] * 1e12
    tokens = run["micro_batch"] * run["seq"]  # per rank
    t_tok = transformer_flops_per_token(_cfg(run["teacher"]), run["seq"], head=False)
    s_tok = transformer_flops_per_token(_cfg(run["student"]), run["seq"], head=True, backward=True)
    shard = run["student_params"] / run["ranks"]
    if "optimizer_s_per_param" in fractions:
        optimizer = fractions["optimizer_s_per_param"] * shard
    else:
        optimizer = shard * ASSUMED["AdamW bytes moved per student parameter on its rank (fp32 master, m, v read + written, fp32 grad read, bf16 write)"] / (
            ASSUMED["H100 HBM3 bandwidth, TB/s (AdamW, CPU column)"] * 1e12)
    teacher, student = t_tok * tokens / (fractions["teacher"] * rate), s_tok * tokens / (fractions["student"] * rate)
    compute = (teacher + student + optimizer) * fractions["step_over_parts"]
    w = run["ranks"]
    bw = LINKS["network (between nodes)"] if w > run["ranks_per_node"] else LINKS["NVLink (within a node)"]
    fcd = sum(fcd_model("gram", w, run["micro_batch"], run["seq"], run["student"]["hidden_size"], run["teacher"]["hidden_size"], 2,
                        run["pairs"], 1).values()) / bw if w > 1 else 0.0
    zero = sum(zero_model(3, w, run["student_params"], run["teacher_params"], 2).values()) / bw if w > 1 else 0.0
    serial, overlapped = compute + fcd + zero, max(compute, zero) + fcd
    flops_tok = t_tok + s_tok
    out = {"teacher": teacher, "student": student, "optimizer": optimizer, "compute": compute, "fcd": fcd, "zero": zero,
           "serial": serial, "overlapped": overlapped}
    for name, step in (("serial", serial), ("overlapped", overlapped)):
        out[f"tokens_per_s_{name}"] = w * tokens / step
        out[f"mfu_{name}"] = flops_tok * tokens / step / (ASSUMED["H100 dense bf16 peak, TFLOP/s (MFU denominator)"] * 1e12)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no_write", action="store_true", help="print only")
    args = p.parse_args()
    heading, cpu = cpu_fractions()
    sources = {"CPU": cpu, "H100": h100_fractions()}
    lines = [f"Command: `{command_line('scaling.py')}`. Part fractions of the matmul rate: CPU from RESULTS.md's \"{heading}\" "
             f"(teacher forward {cpu['teacher']:.2f}, student fwd+bwd CE {cpu['student']:.2f}, step / parts {cpu['step_over_parts']:.3f}); "
             f"H100 from the 1.7B run (teacher {sources['H100']['teacher']:.2f}, student fwd+bwd with FCD {sources['H100']['student']:.2f}, "
             f"step / parts {sources['H100']['step_over_parts']:.3f}, AdamW {sources['H100']['optimizer_s_per_param'] * 1e12:.0f} ps per parameter).",
             "Assumed: " + "; ".join(f"{k} = {v:g}" for k, v in ASSUMED.items()) + ". Collectives: fcd_comm.py's ring bytes (FCD: `gram`, "
             "bf16 features, one all_to_all each way, float32 Gram upper triangles; ZeRO-3: student gradients reduce-scattered, "
             "student parameters all-gathered in forward and backward, teacher's in forward, bf16), no latency term.", "",
             "| run | fractions from | teacher fwd s | student fwd+bwd s | AdamW s | compute step s | FCD comm s | ZeRO comm s | "
             "step s, serial / ZeRO overlapped | tokens/s, serial / overlapped | MFU, serial / overlapped | measured |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in RUNS.items():
        for src, fr in sources.items():
            r = predict(run, fr)
            measured = ""
            if run["measured"]:
                m = run["measured"]
                measured = f"{m['step']:.3f} s, {m['tokens_per_s']:,} tokens/s, MFU {m['mfu']:.3f}" + (" (fitted on it)" if src == "H100" else "")
            lines.append(f"| {name} | {src} | {r['teacher']:.3f} | {r['student']:.3f} | {r['optimizer']:.4f} | {r['compute']:.3f} | {r['fcd']:.3f} | "
                         f"{r['zero']:.3f} | {r['serial']:.3f} / {r['overlapped']:.3f} | {r['tokens_per_s_serial']:,.0f} / {r['tokens_per_s_overlapped']:,.0f} | "
                         f"{r['mfu_serial']:.3f} / {r['mfu_overlapped']:.3f} | {measured} |")
    publish(lines, write=not args.no_write, heading=f"\n## A cost model for clusters: predicted step, tokens/s, MFU ({utc_stamp()})\n\n")


if __name__ == "__main__":
    main()
