"""The bf16 checks that need a GPU: FCD's relation math, the stacked layer pairs and the fused logit loss.

    python benchmarks/gpu_checks.py                  # on a CUDA machine; prints a markdown report
    python benchmarks/gpu_checks.py --tokens 4096    # a smaller fused-loss case

1. FCD on bf16 features (10 layer pairs, 8 x 128 tokens, widths 576 -> 576, SmolLM2-135M's): the terms
   are float32 and equal to the float32 computation on the same (upcast) values, stacked
   (``fcd_pair_terms(stack=True)``) and one pair at a time; forward + backward time of each, and at
   8 x 1024 tokens.
2. Next-token CE + logit KD (T = 2) at ``--tokens`` tokens, vocabulary 49,152, width 576, bf16 hidden
   states and head weights: ``fused_linear_ce_kd`` against the plain computation on whole (B, N, V) bf16
   logits, both against the plain computation in float32 on the same bf16 values (loss, gradient of the
   hidden states and of the head weight, max relative difference), with each one's peak GPU memory above
   its inputs (``torch.cuda.max_memory_allocated``) and time.

Measures, asserts nothing; exits with status 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from fcd_ds.losses import causal_lm_loss, fcd_pair_terms, fused_linear_ce_kd, logit_kd_loss

WIDTH, VOCAB, TEMPERATURE, PAIRS = 576, 49152, 2.0, 10
GIB = 2**30


def _timed(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` over ``repeats`` after ``warmup``, CUDA-synchronised."""
    times = []
    for i in range(warmup + repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def fcd_report(batch: int, seq: int) -> list[str]:
    """FCD terms of bf16 features against float32, stacked and one by one, and their forward + backward time."""
    g = torch.Generator(device="cuda").manual_seed(0)
    student = [torch.randn(batch, seq, WIDTH, generator=g, device="cuda").bfloat16().requires_grad_(True) for _ in range(PAIRS)]
    teacher = [torch.randn(batch, seq, WIDTH, generator=g, device="cuda").bfloat16() for _ in range(PAIRS)]
    mask = torch.ones(batch, seq, dtype=torch.long, device="cuda")
    mask[1, seq // 2:] = 0  # one padded sequence
    ref = fcd_pair_terms([s.detach().float() for s in student], [t.float() for t in teacher], mask, chunk_size=1024, stack=False)
    lines = []
    for name, stack in (("stacked", True), ("one by one", False)):
        terms = fcd_pair_terms(student, teacher, mask, chunk_size=1024, stack=stack)
        dtypes = {str(v.dtype) for t in terms for v in t}
        diff = max(abs(a.item() - b.item()) for t, r in zip(terms, ref) for a, b in zip(t, r))

        def step(stack=stack):
            loss = sum(t.token + t.sequence for t in fcd_pair_terms(student, teacher, mask, chunk_size=1024, stack=stack))
            loss.backward()

        seconds = _timed(step)
        label = f"stacked, {max(1, 1024 // seq)} per group" if stack else name
        lines.append(f"| {batch} x {seq} | {label} | {', '.join(sorted(dtypes))} | {diff:.1e} | {seconds * 1e3:.2f} |")
    return lines


def _grads(loss_fn, leaves):
    for leaf in leaves:
        leaf.grad = None
    loss = loss_fn()
    loss.backward()
    return loss.detach().float(), [leaf.grad.float() for leaf in leaves]


def fused_report(tokens: int, chunk: int) -> list[str]:
    """Fused vs plain bf16 CE + KD against plain float32 on the same values: differences, peak memory, time."""
    g = torch.Generator(device="cuda").manual_seed(0)
    b, n = tokens // 1024, 1024
    h_s = torch.randn(b, n, WIDTH, generator=g, device="cuda").bfloat16().requires_grad_(True)
    w_s = (torch.randn(VOCAB, WIDTH, generator=g, device="cuda") / WIDTH**0.5).bfloat16().requires_grad_(True)
    h_t = torch.randn(b, n, WIDTH, generator=g, device="cuda").bfloat16()
    w_t = (torch.randn(VOCAB, WIDTH, generator=g, device="cuda") / WIDTH**0.5).bfloat16()
    ids = torch.randint(0, VOCAB, (b, n), generator=g, device="cuda")
    mask = torch.ones(b, n, dtype=torch.long, device="cuda")

    def plain(hs, ws, ht, wt):
        z_s = hs @ ws.T  # (B, N, V)
        with torch.no_grad():
            z_t = ht @ wt.T
        return causal_lm_loss(z_s, ids, mask) + logit_kd_loss(z_s, z_t, mask, temperature=TEMPERATURE)

    def fused():
        return fused_linear_ce_kd(h_s, w_s, h_t, w_t, ids, mask, temperature=TEMPERATURE, chunk_size=chunk).loss

    h32, w32 = h_s.detach().float().requires_grad_(True), w_s.detach().float().requires_grad_(True)
    ref_loss, ref_grads = _grads(lambda: plain(h32, w32, h_t.float(), w_t.float()), [h32, w32])
    del h32, w32
    lines = []
    for name, fn in ((f"fused, chunk {chunk}", fused), ("plain, (B, N, V) bf16 logits", lambda: plain(h_s, w_s, h_t, w_t))):
        _grads(fn, [h_s, w_s])  # warm-up
        h_s.grad = w_s.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss, grads = _grads(fn, [h_s, w_s])
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / GIB
        rel = [((a - r).abs().max() / r.abs().max()).item() for a, r in zip(grads, ref_grads)]
        seconds = _timed(lambda: _grads(fn, [h_s, w_s]), repeats=5, warmup=1)
        lines.append(f"| {name} | {loss.item():.5f} | {abs(loss.item() - ref_loss.item()) / ref_loss.item():.1e} | "
                     f"{rel[0]:.1e} | {rel[1]:.1e} | {peak:.2f} | {seconds * 1e3:.1f} |")
    lines.append(f"| plain, float32 (the reference) | {ref_loss.item():.5f} | 0 | 0 | 0 | | |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="B x N of the fused-loss case (a multiple of 1024)")
    p.add_argument("--chunk", type=int, default=256, help="tokens per chunk of the fused loss")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: benchmarks/gpu_checks.py needs a CUDA device; run it on a GPU machine", file=sys.stderr)
        sys.exit(2)
    print(f"Command: `python benchmarks/gpu_checks.py {' '.join(sys.argv[1:])}`; {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print(f"FCD, {PAIRS} layer pairs of bf16 features (width {WIDTH}), chunk_size 1024, forward + backward:\n")
    print("| tokens | pairs | term dtypes | max abs diff vs float32 on the same values | ms (median of 20) |")
    print("|---|---|---|---|---|")
    for batch, seq in ((8, 128), (8, 1024)):
        print("\n".join(fcd_report(batch, seq)))
    print(f"\nNext-token CE + logit KD (T = {TEMPERATURE}), {args.tokens} tokens, V = {VOCAB}, width {WIDTH}, bf16 inputs, forward + backward:\n")
    print("| computation | loss | rel. diff of loss | rel. diff of grad h_s (max / max) | of grad W_s | peak GiB above inputs | ms (median of 5) |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(fused_report(args.tokens, args.chunk)))


if __name__ == "__main__":
    main()
