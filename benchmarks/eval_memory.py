"""Held-out evaluation of the default decoder run with and without the fused head: peak memory, time, perplexity.

    python benchmarks/eval_memory.py              # the default distill_gpt run's evaluation; appended to benchmarks/RESULTS.md
    python benchmarks/eval_memory.py --no_write   # prints only

The default decoder run (``launchers/distill_gpt.py`` with no flags: the embedded SmolLM2-135M teacher,
its pruned student, the BBC News held-out blocks, eval micro-batch 8) is set up once in one rank
(``trainer.setup``, as the run does), then its held-out evaluation (``DistillEngine.evaluate``) runs for
the teacher and the student with ``fused_logit_loss`` off (the (B, N, V) logits, then the cross-entropy
on them) and on (the cross-entropy summed inside the LM head, ``fcd_ds.fused_head.fused_loss_sum``).
Peak memory: the highest net bytes allocated during the evaluation, from the torch profiler's allocation
events, and VmHWM (reset just before) minus the RSS before it. Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch import spawn  # noqa: E402
from results import command_line, publish  # noqa: E402
from vs_trl import peak_gib, reset_peak  # noqa: E402


def _peak_allocated(fn) -> tuple[int, object]:
    """``(peak net bytes allocated while fn() ran, its result)`` from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, result


def child(opts) -> None:
    """One rank: set up the default run, evaluate each model with the fused head off and on."""
    from fcd_ds import defaults, trainer
    from fcd_ds.config import parse_args
    from fcd_ds.plan import plan_run

    flags = ["--output_dir", opts._out, "--max_eval_samples", opts.max_eval_samples]
    plan = plan_run(*parse_args([str(f) for f in flags], defaults.GPT.flags), defaults.GPT)
    job = trainer.setup(plan)
    rows = []
    for which in ("teacher", "student"):
        for fused in (False, True):
            job.distiller.args.fused_logit_loss = fused
            job.distiller.evaluate(which, job.eval_set[:1])  # warm-up
            rss0, method = reset_peak()
            start = time.perf_counter()
            peak, metrics = _peak_allocated(lambda: job.distiller.evaluate(which, job.eval_set))
            seconds = time.perf_counter() - start
            rows.append({"model": which, "fused": fused, "peak_allocated_gib": peak / 2**30, "hwm_extra_gib": peak_gib(method) - rss0,
                         "seconds": seconds, "perplexity": metrics["perplexity"], "loss": metrics["loss"]})
            print(rows[-1], flush=True)
    shape = job.eval_set[0]["input_ids"].shape
    Path(opts._result).write_text(json.dumps({"rows": rows, "batches": len(job.eval_set), "batch_shape": list(shape),
                                              "vocab": plan.tokenizer.vocab_size if hasattr(plan.tokenizer, "vocab_size") else None}))
    trainer.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_eval_samples", type=int, default=64)
    parser.add_argument("--no_write", action="store_true", help="print only, do not append to RESULTS.md")
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_out", help=argparse.SUPPRESS)
    parser.add_argument("--_result", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts._child:
        child(opts)
        return
    with tempfile.TemporaryDirectory(prefix="fcd_eval_memory_") as tmp:
        result = Path(tmp) / "result.json"
        codes, _ = spawn("benchmarks/eval_memory.py", ["--_child", "--_out", Path(tmp) / "run", "--_result", result,
                                                       "--max_eval_samples", opts.max_eval_samples], 1)
        if codes != [0]:
            raise SystemExit(f"the evaluation process failed: {codes}")
        r = json.loads(result.read_text())
    b, n = r["batch_shape"]
    lines = [f"\n## Held-out evaluation inside the head (issue 20), {time.strftime('%Y-%m-%d')}\n",
             f"Command: `{command_line('eval_memory.py')}`; {platform.processor() or platform.machine()}, one rank; the default distill_gpt run's "
             f"held-out set: {r['batches']} batches of {b} x {n} tokens, vocabulary {r['vocab']}. Peak: the highest net bytes "
             "allocated during the evaluation (torch profiler) and VmHWM minus the RSS before it.\n",
             "| model | logits | peak allocated (GiB) | VmHWM extra (GiB) | seconds | perplexity |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['model']} | {'fused: summed in the head' if row['fused'] else 'materialised (B, N, V)'} | "
                     f"{row['peak_allocated_gib']:.3f} | {row['hwm_extra_gib']:.3f} | {row['seconds']:.2f} | {row['perplexity']:.4f} |")
    publish(lines, write=not opts.no_write)


if __name__ == "__main__":
    main()
