"""Cost of each distillation loss alone: forward+backward time and peak memory on the same features.

    python benchmarks/loss_cost.py              # B = 8, N in 128 512 2048, appended to benchmarks/RESULTS.md
    python benchmarks/loss_cost.py --quick      # B = 2, N in 32 64, vocabulary 1024; prints only (< 1 min)
    python benchmarks/loss_cost.py --no_write   # full sizes, prints only

Losses (fcd_ds.losses, pure functions) at the real widths of two teacher -> student pairs:
SmolLM2-135M -> its depth-pruned student (hidden 576 both; q 576, k/v 192; MiniLM with 3 relation heads;
logits over 49,152 tokens): fcd, hidden_mse, minilm, kd, dist; all-mpnet-base-v2 (768, 12 heads) ->
all-MiniLM-L6-v2 (384, 12 heads): fcd, hidden_mse (with its nn.Linear(384, 768) projection), minilm
(12 relation heads). FCD: alpha = beta = 1, position sequence relation, global_batch False, chunks of 1024
rows; kd and dist at their default temperatures (2 and 1). Inputs are random float32 features (or
logits), mask all ones; only the student side (and the projection) requires grad.

Every case runs in a fresh process forked from a multiprocessing forkserver (torch imported once
there), so each case's memory is measured alone and an out-of-memory failure is a row of the table,
not a crash. A case first gets an address-space limit (RLIMIT_AS) of --mem_limit_gib above what the
process maps, so that it fails with "out of memory" instead of waking the kernel's OOM killer (a child
killed by a signal is also reported). A case whose inputs, their gradient and the (B, N, V) logits or
(B, H, N, N) relations of both models would exceed the limit is skipped. Time: one warm-up, then the
median of --repeats (2 when the warm-up took over 10 s) forward+backward passes (time.perf_counter).
Peak memory: the RSS high-water mark (VmHWM, reset through /proc/self/clear_refs just before the warm-up;
ru_maxrss when that is not allowed) minus the RSS once the inputs are built; it includes the student's
gradient and the first pass's one-time allocations (about 10 MiB: thread arenas, autograd), which dominate at
--quick sizes. Ratios are to FCD at the same pair and N. Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp

import torch

from fcd_ds.losses import dist_loss, fcd_loss, hidden_mse_loss, logit_kd_loss, minilm_loss
from isolated import measure  # benchmarks/isolated.py
from results import command_line, machine, matmul_rate, publish, utc_stamp  # benchmarks/results.py

GPT = "SmolLM2-135M -> depth-pruned student"
ENC = "all-mpnet-base-v2 -> all-MiniLM-L6-v2"
PAIRS = {  # widths (student, teacher), q/k/v widths, MiniLM relation heads, losses benchmarked
    GPT: dict(hidden=(576, 576), qkv_s=(576, 192, 192), qkv_t=(576, 192, 192), heads=3,
              losses=("fcd", "hidden_mse", "minilm", "kd", "dist")),
    ENC: dict(hidden=(384, 768), qkv_s=(384,) * 3, qkv_t=(768,) * 3, heads=12, losses=("fcd", "hidden_mse", "minilm")),
}
VOCAB = 49152
FCD_CHUNK = 1024  # --fcd_chunk_size default
GIB = 2**30


def estimate_bytes(pair: dict, loss: str, b: int, n: int, vocab: int) -> int:
    """Inputs of both models, the student's gradient and the (B, N, V) / (B, H, N, N) tensors the loss holds."""
    if loss in ("kd", "dist"):
        return 3 * b * n * vocab * 4
    if loss == "minilm":
        return 4 * b * n * (2 * sum(pair["qkv_s"]) + sum(pair["qkv_t"])) + 2 * 4 * b * pair["heads"] * n * n
    c_s, c_t = pair["hidden"]
    return 4 * b * n * (2 * c_s + c_t)


def build(case: dict):
    """The case's inputs; returns (leaves that receive gradients, loss closure)."""
    pair, b, n, loss = PAIRS[case["pair"]], case["B"], case["N"], case["loss"]
    mask = torch.ones(b, n, dtype=torch.long)
    if loss == "minilm":
        qkv_s = [torch.randn(b, n, c, requires_grad=True) for c in pair["qkv_s"]]
        qkv_t = [torch.randn(b, n, c) for c in pair["qkv_t"]]
        return qkv_s, lambda: minilm_loss(qkv_s, qkv_t, mask, num_heads=pair["heads"])
    c_s, c_t = (case["vocab"],) * 2 if loss in ("kd", "dist") else pair["hidden"]
    s, t = torch.randn(b, n, c_s, requires_grad=True), torch.randn(b, n, c_t)
    if loss == "fcd":
        return [s], lambda: fcd_loss(s, t, mask, alpha=1.0, beta=1.0, sequence_relation="position",
                                     global_batch=False, chunk_size=FCD_CHUNK)
    if loss == "hidden_mse":
        proj = torch.nn.Linear(c_s, c_t) if c_s != c_t else torch.nn.Identity()
        return [s, *proj.parameters()], lambda: hidden_mse_loss(proj(s), t, mask)
    return [s], (lambda: logit_kd_loss(s, t, mask)) if loss == "kd" else (lambda: dist_loss(s, t, mask))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B = 2, N in 32 64, vocabulary 1024; prints only")
    parser.add_argument("--no_write", action="store_true", help="print only, do not append to RESULTS.md")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes after the warm-up")
    parser.add_argument("--mem_limit_gib", type=float, default=16.0, help="per-case memory limit (skip / out of memory)")
    args = parser.parse_args()
    b, seq_lens, vocab = (2, (32, 64), 1024) if args.quick else (8, (128, 512, 2048), VOCAB)

    from fcd_ds.runtime.metrics import measure_matmul_tflops

    peak = measure_matmul_tflops()
    print(f"measured fp32 matmul rate: {peak * 1e3:.0f} GFLOP/s; torch threads: {torch.get_num_threads()}", flush=True)
    ctx = mp.get_context("forkserver")
    results, methods = {}, set()
    for name, pair in PAIRS.items():
        for n in seq_lens:
            for loss in pair["losses"]:
                need = estimate_bytes(pair, loss, b, n, vocab)
                case = dict(pair=name, loss=loss, B=b, N=n, vocab=vocab, repeats=args.repeats, mem_limit_gib=args.mem_limit_gib)
                r = (dict(error=f"skipped: would need ~{need / GIB:.3g} GiB") if need > args.mem_limit_gib * GIB
                     else measure(ctx, build, case))
                methods.add(r.get("method"))
                results[name, n, loss] = r
                print(f"{name} | N={n} | {loss}: {r}", flush=True)

    threads = ", ".join(map(str, sorted({r["threads"] for r in results.values() if "threads" in r}))) or torch.get_num_threads()
    memory = ("VmHWM (reset via /proc/self/clear_refs before the warm-up)" if methods - {None} == {"VmHWM"}
              else "RSS high-water mark (ru_maxrss)" if methods - {None} == {"ru_maxrss"} else "VmHWM or ru_maxrss")
    lines = [f"\n## Loss cost: forward+backward time and peak memory of each loss alone — {utc_stamp()}",
             f"\nCommand: `{command_line('loss_cost.py')}` ({machine()}, torch threads {threads}; "
             f"{matmul_rate(peak)}, torch's default threads).",
             f"B = {b}, float32 random features, mask all ones; one process per case; time: median of {args.repeats} "
             f"forward+backward passes after one warm-up (2 when the warm-up took over 10 s); peak extra memory: {memory} "
             f"minus the RSS with the inputs built; limit {args.mem_limit_gib:g} GiB per case (RLIMIT_AS). "
             f"FCD: alpha = beta = 1, position, chunks of {FCD_CHUNK}; kd T = 2, dist T = 1; logits over {vocab} tokens."]
    for name, pair in PAIRS.items():
        lines += [f"\n### {name} (hidden {pair['hidden'][1]} -> {pair['hidden'][0]}; q/k/v {pair['qkv_t']} -> {pair['qkv_s']}; "
                  f"MiniLM {pair['heads']} relation heads)\n",
                  "| N | loss | forward+backward (ms) | peak extra memory (MiB) | time / FCD | memory / FCD |", "|---|---|---|---|---|---|"]
        for n in seq_lens:
            fcd = results[name, n, "fcd"]
            for loss in pair["losses"]:
                r = results[name, n, loss]
                if "error" in r:
                    lines.append(f"| {n} | {loss} | {r['error']} | | | |")
                    continue
                passes = "" if r["reps"] == args.repeats else f" ({r['reps']} passes)"
                ratio = (lambda k: f"{r[k] / fcd[k]:.2f}" if k in fcd and fcd[k] > 0 else "—")
                lines.append(f"| {n} | {loss} | {r['ms']:.1f}{passes} | "
                             f"{r['mib']:.1f} | {ratio('ms')} | {ratio('mib')} |")
    publish(lines, write=not (args.quick or args.no_write))


if __name__ == "__main__":
    main()
