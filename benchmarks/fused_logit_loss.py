"""Logit losses with materialised logits vs fused with the LM head: peak memory, time and value.

    python benchmarks/fused_logit_loss.py              # B = 8, N in 256 1024, V = 49,152; appended to benchmarks/RESULTS.md
    python benchmarks/fused_logit_loss.py --quick      # B = 2, N = 64, V = 4,096; prints only (< 1 min)
    python benchmarks/fused_logit_loss.py --no_write   # full sizes, prints only

The loss is next-token cross-entropy + logit KD (T = 2) of one student on one teacher at SmolLM2-135M's
widths (last hidden states 576 wide for both, vocabulary 49,152), from the last hidden states and the LM
head weights, forward + backward (gradients w.r.t. the student's hidden states and head weight):

* ``plain``: ``z_s = h_s @ W_s.T``, ``z_t = h_t @ W_t.T`` (no grad), then ``causal_lm_loss(z_s) +
  logit_kd_loss(z_s, z_t)``: the (B, N, V) logits of both models are held, as the engine does today;
* ``fused <chunk>``: ``fused_linear_ce_kd`` (fcd_ds/losses/fused.py) with that many tokens per chunk.

Inputs are random float32 (hidden states N(0, 1), head weights N(0, 1/C)), mask all ones, the same seed
in every case. Every case runs in its own process from a multiprocessing forkserver, with an address-space
limit (RLIMIT_AS) of --mem_limit_gib above what the process maps, so an out-of-memory case is a row of the
table. Time: one warm-up, then the median of --repeats forward+backward passes (1 when the warm-up took
over 30 s). Peak memory: VmHWM (reset through /proc/self/clear_refs just before the warm-up; ru_maxrss
when that is not allowed) minus the RSS with the inputs built (the inputs are 0.26 GiB). Value difference:
|fused - plain| of the loss at the same N, relative to plain. Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp

import torch

from fcd_ds.losses import causal_lm_loss, fused_linear_ce_kd, logit_kd_loss
from isolated import measure  # benchmarks/isolated.py
from results import command_line, machine, matmul_rate, publish, utc_stamp  # benchmarks/results.py

WIDTH, VOCAB, TEMPERATURE = 576, 49152, 2.0  # SmolLM2-135M (student = its depth-pruned copy: same width)
GIB = 2**30


def build(case: dict):
    """The case's inputs; returns (leaves that receive gradients, closure returning {loss, ce, kd})."""
    g = torch.Generator().manual_seed(0)
    b, n, c, v = case["B"], case["N"], case["C"], case["V"]
    h_s = torch.randn(b, n, c, generator=g).requires_grad_(True)
    w_s = (torch.randn(v, c, generator=g) / c**0.5).requires_grad_(True)
    h_t, w_t = torch.randn(b, n, c, generator=g), torch.randn(v, c, generator=g) / c**0.5
    ids, mask = torch.randint(0, v, (b, n), generator=g), torch.ones(b, n, dtype=torch.long)
    if case["chunk"] is None:
        def plain():
            z_s = h_s @ w_s.T  # (B, N, V)
            with torch.no_grad():
                z_t = h_t @ w_t.T
            ce, kd = causal_lm_loss(z_s, ids, mask), logit_kd_loss(z_s, z_t, mask, temperature=TEMPERATURE)
            return {"loss": ce + kd, "ce": ce, "kd": kd}
        return [h_s, w_s], plain
    def fused():
        loss, ce, kd = fused_linear_ce_kd(h_s, w_s, h_t, w_t, ids, mask, temperature=TEMPERATURE, chunk_size=case["chunk"])
        return {"loss": loss, "ce": ce, "kd": kd}
    return [h_s, w_s], fused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B = 2, N = 64, V = 4,096; prints only")
    parser.add_argument("--no_write", action="store_true", help="print only, do not append to RESULTS.md")
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 1024], help="fused chunk sizes (tokens)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes after the warm-up")
    parser.add_argument("--mem_limit_gib", type=float, default=14.0, help="per-case memory limit")
    args = parser.parse_args()
    b, seq_lens, vocab = (2, (64,), 4096) if args.quick else (8, (256, 1024), VOCAB)

    from fcd_ds.runtime.metrics import measure_matmul_tflops

    peak = measure_matmul_tflops()
    print(f"measured fp32 matmul rate: {peak * 1e3:.0f} GFLOP/s; torch threads: {torch.get_num_threads()}", flush=True)
    ctx = mp.get_context("forkserver")
    rows = []
    for n in seq_lens:
        plain = None
        for chunk in (None, *args.chunks):
            case = dict(B=b, N=n, C=WIDTH, V=vocab, chunk=chunk, repeats=args.repeats, mem_limit_gib=args.mem_limit_gib,
                        slow_seconds=30, slow_repeats=1)
            r = measure(ctx, build, case)
            if "error" not in r:
                r.update(s=r["ms"] / 1e3, gib=r["mib"] / 1024, **r.pop("values"))
            plain = r if chunk is None else plain
            rows.append((n, chunk, r, plain))
            print(f"N={n} | {'plain' if chunk is None else f'fused {chunk}'}: {r}", flush=True)

    threads = ", ".join(sorted({str(r["threads"]) for _, _, r, _ in rows if "threads" in r})) or str(torch.get_num_threads())
    lines = [f"\n## Logit losses fused with the LM head — {utc_stamp()}",
             f"\nCommand: `{command_line('fused_logit_loss.py')}` ({machine()}, torch threads {threads}; {matmul_rate(peak)}).",
             f"Next-token CE + logit KD (T = {TEMPERATURE:g}) forward+backward from the last hidden states "
             f"(B = {b}, width {WIDTH} student and teacher) and the head weights (vocabulary {vocab}), float32, "
             f"mask all ones. plain: both models' (B, N, V) logits materialised, `causal_lm_loss + logit_kd_loss`; "
             f"fused: `fused_linear_ce_kd` with that many tokens per chunk. One process per case; time: median of "
             f"{args.repeats} passes after a warm-up (1 when the warm-up took over 30 s); peak extra memory: VmHWM "
             f"minus the RSS with the inputs built; limit {args.mem_limit_gib:g} GiB per case (RLIMIT_AS).\n",
             "| B x N tokens | loss | forward+backward (s) | peak extra memory (GiB) | memory / plain | time / plain | loss | rel. difference to plain |",
             "|---|---|---|---|---|---|---|---|"]
    for n, chunk, r, plain in rows:
        name = "plain" if chunk is None else f"fused, chunk {chunk}"
        if "error" in r:
            lines.append(f"| {b * n} | {name} | {r['error']} | | | | | |")
            continue
        ok = plain is not None and "error" not in plain
        ratio = (lambda k: f"{r[k] / plain[k]:.3f}" if ok else "—")
        diff = f"{abs(r['loss'] - plain['loss']) / abs(plain['loss']):.1e}" if ok and chunk is not None else "—"
        passes = "" if r["reps"] == args.repeats else f" ({r['reps']} pass)"
        lines.append(f"| {b * n} | {name} | {r['s']:.2f}{passes} | {r['gib']:.3f} | {ratio('gib')} | {ratio('s')} | "
                     f"{r['loss']:.6f} (ce {r['ce']:.4f}, kd {r['kd']:.4f}) | {diff} |")
    publish(lines, write=not (args.quick or args.no_write))


if __name__ == "__main__":
    main()
