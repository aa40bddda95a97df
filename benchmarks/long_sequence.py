"""Long sequences: forward+backward time and peak memory of the FCD term, streamed in blocks vs materialised.

    python benchmarks/long_sequence.py              # N in 1024 4096 8192, appended to benchmarks/RESULTS.md
    python benchmarks/long_sequence.py --quick      # N in 256 512, B = 16 for the sequence table; prints only
    python benchmarks/long_sequence.py --no_write   # full sizes, prints only

Two tables, on random float32 features of widths 192 (student) and 576 (teacher), mask all ones, only the
student side requiring grad:

* the FCD term of one layer pair, both terms (alpha = beta = 1, ``position`` sequence relation), B = 4;
* the sequence term alone (alpha = 0), B = 64: the batch the sequence relation sees when --fcd_global_batch
  all-gathers 16 ranks x 4 sequences, where its (B, N, B) relation, not the token one, grows.

Three forms of the same loss (equal to float rounding, tests/test_sequence_blocks.py and tests/test_losses.py):

* ``chunked``: ``fcd_loss(..., chunk_size=<--fcd_chunk_size default>)``, what training runs: closed-form
  means, centered moments summed over blocks of rows (token) and positions (sequence), each block
  recomputed in backward;
* ``one block``: ``fcd_loss(..., chunk_size=None)``: the same streamed code with a single block, no recompute;
* ``plain``: the materialised reference, nothing chunked: ``token_relation`` (B, N, N) and
  ``sequence_relation`` (B, N * B) of both models, then ``pearson_correlation`` and ``mean_one_minus_rho``.

Every case runs in a fresh process forked from a multiprocessing forkserver, under an address-space limit
(RLIMIT_AS) of --mem_limit_gib above what the process maps, so that a case too big fails with "out of
memory" (a row of the table) instead of waking the kernel's OOM killer. Time: one warm-up, then the median
of --repeats (2 when the warm-up took over 10 s) forward+backward passes (time.perf_counter). Peak memory:
the RSS high-water mark (VmHWM, reset through /proc/self/clear_refs just before the warm-up; ru_maxrss when
that is not allowed) minus the RSS once the inputs are built; it includes the student's gradient. Measures,
asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp

import torch

from fcd_ds.config import DistillArguments
from fcd_ds.losses import fcd_loss, mean_one_minus_rho, pearson_correlation, sequence_relation, token_relation
from isolated import measure  # benchmarks/isolated.py
from results import command_line, machine, matmul_rate, publish, utc_stamp  # benchmarks/results.py

C_S, C_T = 192, 576
CHUNK = next(f.default for f in dataclasses.fields(DistillArguments) if f.name == "fcd_chunk_size")
FORMS = ("chunked", "one block", "plain")
TABLES = {  # name -> (B, alpha): both FCD terms at B = 4; the sequence term alone at a global batch of 64
    "fcd": (4, 1.0),
    "sequence": (64, 0.0),
}
GIB = 2**30


def plain_fcd_loss(h_s, h_t, mask, alpha: float) -> torch.Tensor:
    """``alpha * L_tok + L_seq`` from the materialised relations of both models (nothing chunked)."""
    loss = 0.0
    if alpha:
        rel_s, valid = token_relation(h_s, mask)  # (B, N, N), (B, N, N)
        rel_t, _ = token_relation(h_t, mask)
        rho = pearson_correlation(rel_s.flatten(1), rel_t.flatten(1), valid.flatten(1))  # (B, N * N) -> (B,)
        loss = alpha * mean_one_minus_rho(rho, mask.bool().sum(1) >= 3)
    rel_s, valid = sequence_relation(h_s, mask, "position")  # (B, N * B), (B, N * B)
    rel_t, _ = sequence_relation(h_t, mask, "position")
    return loss + mean_one_minus_rho(pearson_correlation(rel_s, rel_t, valid), valid.sum(-1) >= 2)


def build(case: dict):
    """The case's student leaf (in a list) and loss closure."""
    b, n, alpha = case["B"], case["N"], case["alpha"]
    mask = torch.ones(b, n, dtype=torch.long)
    s, t = torch.randn(b, n, C_S, requires_grad=True), torch.randn(b, n, C_T)
    if case["form"] == "plain":
        return [s], lambda: plain_fcd_loss(s, t, mask, alpha)
    chunk = CHUNK if case["form"] == "chunked" else None
    return [s], lambda: fcd_loss(s, t, mask, alpha=alpha, beta=1.0, sequence_relation="position", chunk_size=chunk)


def table(results: dict, name: str, seq_lens, repeats: int, cap: float) -> list[str]:
    lines = ["| N | form | forward+backward (ms) | peak extra memory (MiB) | time / plain | memory / plain |",
             "|---|---|---|---|---|---|"]
    for n in seq_lens:
        plain = results[name, n, "plain"]
        for form in FORMS:
            r = results[name, n, form]
            if "error" in r:
                why = f"{r['error']} ({cap:g} GiB cap)" if r["error"].startswith("out of memory") else r["error"]
                lines.append(f"| {n} | {form} | {why} | | | |")
                continue
            passes = "" if r["reps"] == repeats else f" ({r['reps']} passes)"
            ratio = (lambda k: f"{r[k] / plain[k]:.2f}" if k in plain and plain[k] > 0 else "—")
            lines.append(f"| {n} | {form} | {r['ms']:.0f}{passes} | {r['mib']:.0f} | {ratio('ms')} | {ratio('mib')} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N in 256 512, B = 16 for the sequence table; prints only")
    parser.add_argument("--no_write", action="store_true", help="print only, do not append to RESULTS.md")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes after the warm-up")
    parser.add_argument("--mem_limit_gib", type=float, default=16.0, help="per-case address-space limit above the start")
    args = parser.parse_args()
    seq_lens = (256, 512) if args.quick else (1024, 4096, 8192)
    tables = {**TABLES, "sequence": (16, 0.0)} if args.quick else TABLES

    from fcd_ds.runtime.metrics import measure_matmul_tflops

    peak = measure_matmul_tflops()
    print(f"measured fp32 matmul rate: {peak * 1e3:.0f} GFLOP/s; torch threads: {torch.get_num_threads()}", flush=True)
    ctx = mp.get_context("forkserver")
    results, methods = {}, set()
    for name, (b, alpha) in tables.items():
        for n in seq_lens:
            for form in FORMS:
                case = dict(form=form, B=b, N=n, alpha=alpha, repeats=args.repeats, mem_limit_gib=args.mem_limit_gib)
                r = measure(ctx, build, case)
                methods.add(r.get("method"))
                results[name, n, form] = r
                print(f"{name} | B={b} | N={n} | {form}: {r}", flush=True)

    threads = ", ".join(map(str, sorted({r["threads"] for r in results.values() if "threads" in r}))) or torch.get_num_threads()
    memory = ("VmHWM (reset via /proc/self/clear_refs before the warm-up)" if methods - {None} == {"VmHWM"}
              else "RSS high-water mark (ru_maxrss)" if methods - {None} == {"ru_maxrss"} else "VmHWM or ru_maxrss")
    (b_fcd, _), (b_seq, _) = tables["fcd"], tables["sequence"]
    lines = [f"\n## Long sequences: FCD streamed in blocks vs materialised — {utc_stamp()}",
             f"\nCommand: `{command_line('long_sequence.py')}` ({machine()}, torch threads {threads}; "
             f"{matmul_rate(peak)}, torch's default threads).",
             f"Random float32 features, student width {C_S}, teacher width {C_T}, mask all ones; one process per case; "
             f"time: median of {args.repeats} forward+backward passes after one warm-up (2 when the warm-up took over "
             f"10 s); peak extra memory: {memory} minus the RSS with the inputs built; limit {args.mem_limit_gib:g} GiB "
             f"per case (RLIMIT_AS). Forms: `chunked` = `fcd_loss(chunk_size={CHUNK})` (the --fcd_chunk_size default: "
             f"blocks of {CHUNK} token rows and {CHUNK} sequence positions, recomputed in backward); `one block` = "
             f"`fcd_loss(chunk_size=None)`; `plain` = the materialised reference (`token_relation`, `sequence_relation`, "
             f"`pearson_correlation`), nothing chunked.",
             f"\n### FCD term, both relations (alpha = beta = 1, position), B = {b_fcd}\n",
             *table(results, "fcd", seq_lens, args.repeats, args.mem_limit_gib),
             f"\n### Sequence term alone (alpha = 0, position), B = {b_seq} (an all-gathered global batch)\n",
             *table(results, "sequence", seq_lens, args.repeats, args.mem_limit_gib)]
    publish(lines, write=not (args.quick or args.no_write))


if __name__ == "__main__":
    main()
