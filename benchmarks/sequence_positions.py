"""How well FCD's sequence relation read at K of N positions (``--fcd_sequence_positions K``) stands in for all N.

    python benchmarks/sequence_positions.py              # prints, appends to RESULTS.md
    python benchmarks/sequence_positions.py --no_write --batches 2

The default run's models at the start of distillation: the SmolLM2-135M teacher prepared by
``python -m fcd_ds.assets`` and its depth-pruned 10-block student (``fcd_ds.models.prune_teacher``, the
launcher's default student), the ``uniform`` layer map, batches of B x N tokens of the default training text
(B = 16: the batch a global-batch relation sees over 4 ranks x micro-batch 4). For each batch and each K, the
sequence term alone (FCD's alpha = 0, beta = 1, mean over the layer pairs) and its gradient with respect to
every student parameter; reported against K = N (the spec's relation): the term's mean, its mean absolute
difference, and the cosine and norm ratio of the parameter gradients (the direction a step takes).
The positions are :func:`fcd_ds.losses.fcd.sampled_positions`' (the midpoints of K equal spans). Reference row: the same
comparison between the first and second half of the batch's samples at K = N (two batches' gradients), the
size of the difference an ordinary change of batch makes. Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import time

import torch

from results import command_line, machine, matmul_rate, publish, utc_stamp  # benchmarks/results.py

__all__ = ["main"]


def _grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1).double() for g in torch.autograd.grad(loss, params, retain_graph=True)])  # (P,), float64 for the cosines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--positions", type=int, nargs="+", default=[64, 16, 4])
    p.add_argument("--no_write", action="store_true", help="print only")
    args = p.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fcd_ds.assets import default_assets
    from fcd_ds.layer_map import parse_layer_map
    from fcd_ds.losses import fcd_pair_terms
    from fcd_ds.models import prune_teacher
    from fcd_ds.runtime.metrics import measure_matmul_tflops

    torch.manual_seed(0)
    assets = default_assets()
    peak = measure_matmul_tflops()
    tok = AutoTokenizer.from_pretrained(assets.teacher)
    cfg = AutoConfig.from_pretrained(assets.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(assets.teacher, dtype=torch.float32).eval()
    student = prune_teacher(str(assets.teacher), cfg, 10, torch.float32).train()
    pairs = parse_layer_map("uniform", student.config.num_hidden_layers, cfg.num_hidden_layers)
    params = [q for q in student.parameters() if q.requires_grad]
    ids = tok(assets.train_file.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    b, n = args.batch_size, args.seq
    need = args.batches * b * n
    if ids.numel() < need:
        raise SystemExit(f"--batches x --batch_size x --seq = {need} tokens; the default text has {ids.numel()}")
    rows = {k: {"loss": [], "diff": [], "cos": [], "norm": []} for k in [n, *args.positions]}
    halves = {"cos": [], "norm": []}
    start = time.perf_counter()
    for i in range(args.batches):
        x = ids[i * b * n : (i + 1) * b * n].view(b, n)  # (B, N)
        mask = torch.ones_like(x)
        with torch.no_grad():
            t_h = teacher(input_ids=x, output_hidden_states=True).hidden_states  # (L + 1) x (B, N, C)
        s_h = student(input_ids=x, output_hidden_states=True).hidden_states
        hs = [s_h[q.student + 1] for q in pairs]  # block outputs: hidden_states[0] is the embeddings
        ht = [t_h[q.teacher + 1] for q in pairs]

        def term(k, rows_=slice(None)):
            terms = fcd_pair_terms([h[rows_] for h in hs], [h[rows_] for h in ht], mask[rows_], alpha=0.0, beta=1.0,
                                   sequence_positions=k, chunk_size=None)
            return torch.stack([t.sequence for t in terms]).mean()

        full = term(None)
        g_full = _grad(full, params)
        for k in rows:
            loss = full if k == n else term(k)
            g = g_full if k == n else _grad(loss, params)
            rows[k]["loss"].append(loss.item())
            rows[k]["diff"].append(abs(loss.item() - full.item()))
            rows[k]["cos"].append(torch.nn.functional.cosine_similarity(g, g_full, dim=0).item())
            rows[k]["norm"].append((g.norm() / g_full.norm()).item())
        g_a, g_b = _grad(term(None, slice(0, b // 2)), params), _grad(term(None, slice(b // 2, b)), params)
        halves["cos"].append(torch.nn.functional.cosine_similarity(g_a, g_b, dim=0).item())
        halves["norm"].append((g_b.norm() / g_a.norm()).item())
        print(f"batch {i + 1}/{args.batches}: " + ", ".join(f"K={k}: {r['loss'][-1]:.4f} cos {r['cos'][-1]:.3f}" for k, r in rows.items()), flush=True)
    seconds = time.perf_counter() - start
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    spread = lambda v: (min(v), max(v))  # noqa: E731
    lines = [f"Command: `{command_line('sequence_positions.py')}`; {machine()}, {matmul_rate(peak)}; {seconds:.0f} s. SmolLM2-135M teacher "
             f"(30 x 576), its depth-pruned 10-block student at initialisation, `uniform` map ({len(pairs)} pairs), {args.batches} batches of "
             f"{b} x {n} tokens of the default training text; FCD's sequence term alone (alpha 0), mean over the pairs; gradients over "
             f"all {sum(q.numel() for q in params) / 1e6:.1f}M student parameters. Mean over batches (min-max).", "",
             "| positions K of N | L_seq | abs difference from K = N | gradient cosine with K = N | gradient norm / K = N's |", "|---|---|---|---|---|"]
    for k, r in rows.items():
        lo, hi = spread(r["cos"])
        lines.append(f"| {k} of {n}{' (every position)' if k == n else ''} | {mean(r['loss']):.4f} | {mean(r['diff']):.4f} | "
                     f"{mean(r['cos']):.3f} ({lo:.3f}-{hi:.3f}) | {mean(r['norm']):.3f} |")
    lo, hi = spread(halves["cos"])
    lines.append(f"| reference: two halves of a batch ({b // 2} samples each), K = N | | | {mean(halves['cos']):.3f} ({lo:.3f}-{hi:.3f}) | "
                 f"{mean(halves['norm']):.3f} |")
    publish(lines, write=not args.no_write, heading=f"\n## FCD's sequence relation at K of N positions (`--fcd_sequence_positions`), {utc_stamp()}\n\n")


if __name__ == "__main__":
    main()
