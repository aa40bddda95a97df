"""Data path at scale: prepare, stream or tokenise raw corpora of 16 MB, 256 MB and 1 GiB.

    python benchmarks/data_scale.py                       # every size and path; results kept under benchmarks/data_scale/
    python benchmarks/data_scale.py --sizes 16 256 --no_write

Corpora: the real BBC News training articles (the default corpus, 4.9 MB of JSON lines), repeated until
the size is reached and written as 8 JSON-lines shards (so that 2 ranks read whole shards when
streaming). The repetition is stated in the table: the text is real, its variety is the BBC's.

Per size, with SmolLM2-135M-Instruct's tokenizer (the default teacher's) and 128-token blocks:

* the tokenizer's own batch rate on this machine (``tokenizer(batch of 1,000 documents)`` in this
  process, tokens/s: what bounds tokenising here), once on the first 16 MB;
* ``fcd-ds-prepare-data`` with ``--num_proc 1`` and ``2``: wall seconds, tokens/s, and the peak RSS of its
  process tree (summed over the processes, sampled every 0.1 s), each with a fresh datasets cache;
* seconds from ``deepspeed --num_gpus 2 launchers/distill_gpt.py`` to its first optimizer step (the
  first train_log.jsonl row), of which rank 0's data set-up (its ``[fcd_ds] data ready in`` line: loading,
  tokenising or opening, held-out batches, the micro-batch stream), and each rank's peak RSS (metrics.json
  ``peak_host_memory_gib_per_rank``),
  for the prepared folder, ``--streaming`` (each launched --repeats times: the median, since a launch's
  own start-up varies by seconds) and the raw files (tokenised by the run with 2 workers, a fresh datasets
  cache; once). The models are a random Llama of the teacher's vocabulary (4 blocks x 64) and
  its 2-block pruned student, so that the launch costs little beside the data path; 2 steps, no
  initial evaluation, 8 held-out blocks;
* once, for the 1 GiB folder: opening it and reading 2,000 random micro-batches of 8 blocks, Arrow
  (``datasets.load_from_disk``, what fcd_ds uses) against a NumPy token memmap of the same blocks
  (Megatron's and nanoGPT's layout), for the choice of format.

The machine's fp32 matmul rate is printed beside the figures (``fcd_ds.runtime.metrics.measure_matmul_tflops``).
Each finished measurement is kept as JSON under benchmarks/data_scale/ and reused on a later run, so the
benchmark may be completed over several sittings; the corpora and prepared folders live in --work
(default /tmp/fcd_ds_data_scale, about 7 GB for the three sizes). Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launch import REPO  # benchmarks/launch.py (python puts benchmarks/ on sys.path)
from results import publish, utc_stamp  # benchmarks/results.py

__all__ = ["build_corpus", "tree_peak_rss", "main"]

KEPT = REPO / "benchmarks" / "data_scale"
SHARDS = 8
SEQ = 128


def build_corpus(size_mb: int, work: Path) -> Path:
    """``work/corpus-<size>/shard-{0..7}.jsonl``: the BBC train articles repeated to ``size_mb`` MiB."""
    from fcd_ds.assets import prepare_default_assets

    out = work / f"corpus-{size_mb}"
    if (out / "done").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows = prepare_default_assets().train_documents.read_bytes().splitlines(keepends=True)
    target, written, k = size_mb << 20, 0, 0
    per_shard = target // SHARDS
    for s in range(SHARDS):
        with open(out / f"shard-{s}.jsonl", "wb") as f:
            size = 0
            while size < per_shard:
                line = rows[k % len(rows)]
                f.write(line)
                size += len(line)
                k += 1
            written += size
    (out / "done").write_text(json.dumps({"bytes": written, "rows": k, "source_rows": len(rows)}))
    return out


def tree_peak_rss(cmd: list[str], env: dict, *, stop_when=None, timeout: float = 7200) -> tuple[float, float, subprocess.CompletedProcess | None]:
    """Run ``cmd``; return (wall seconds, peak summed RSS of its process tree in GiB, result). With
    ``stop_when(elapsed)`` returning True, the seconds are taken then (the run continues to its end)."""
    import threading

    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak, marked = 0.0, None
    out_chunks: list[tuple[str, str]] = []
    reader = threading.Thread(target=lambda: out_chunks.append(proc.communicate()), daemon=True)
    reader.start()
    while proc.poll() is None and time.perf_counter() - start < timeout:
        try:
            procs = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()) / 2**30)
        except psutil.Error:
            pass
        if marked is None and stop_when is not None and stop_when():
            marked = time.perf_counter() - start
        time.sleep(0.1)
    reader.join(timeout=60)
    wall = time.perf_counter() - start
    stdout, stderr = out_chunks[0] if out_chunks else ("", "")
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    return (marked if marked is not None else wall), peak, result


def _kept(name: str) -> dict | None:
    path = KEPT / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _keep(name: str, record: dict) -> dict:
    KEPT.mkdir(parents=True, exist_ok=True)
    (KEPT / f"{name}.json").write_text(json.dumps(record, indent=2))
    return record


def tokenizer_rate(tokenizer, corpus: Path) -> dict:
    """Tokens/s of the tokenizer's own batch call on batches of 1,000 documents (16 MB of the corpus)."""
    texts = [json.loads(line)["text"] for line in (corpus / "shard-0.jsonl").read_text(encoding="utf-8").splitlines()]
    budget, docs = 16 << 20, []
    for t in texts:
        docs.append(t)
        budget -= len(t.encode())
        if budget <= 0:
            break
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(docs), 1000):
        tokens += sum(len(ids) for ids in tokenizer(docs[i : i + 1000], add_special_tokens=False)["input_ids"])
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "unset")}


def prepare_run(size: int, corpus: Path, work: Path, num_proc: int, teacher: Path) -> dict:
    name = f"prepare-{size}mb-np{num_proc}"
    if (kept := _kept(name)) is not None:
        return kept
    out = work / f"prepared-{size}-np{num_proc}"
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=work) as cache:
        env = {**os.environ, "HF_DATASETS_CACHE": cache}
        cmd = [sys.executable, "-m", "fcd_ds.data.prepare", "--dataset_prepared_path", str(out), "--train_file", str(corpus / "shard-*.jsonl"),
               "--validation_split_percentage", "1", "--tokenizer_name", str(teacher), "--max_seq_length", str(SEQ), "--num_proc", str(num_proc)]
        wall, peak, result = tree_peak_rss(cmd, env)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    record = json.loads((out / "fcd_ds_data.json").read_text())
    tokens = (record["blocks"]["train"] + record["blocks"]["validation"]) * SEQ
    return _keep(name, {"size_mb": size, "num_proc": num_proc, "seconds": wall, "tokens": tokens, "tokens_per_second": tokens / wall,
                        "peak_rss_gib": peak, "blocks": record["blocks"], "folder": str(out)})


def tiny_models(work: Path, teacher: Path) -> Path:
    """A random Llama with the teacher's tokenizer and vocabulary (4 blocks x 64), saved once."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = work / "tiny-llama-49k"
    if (path / "config.json").is_file():
        return path
    tok = AutoTokenizer.from_pretrained(teacher)
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def first_step(size: int, path: str, data_flags: list[str], work: Path, model: Path, validation: Path, repeat: int = 0) -> dict:
    name = f"first-step-{size}mb-{path}" + (f"-r{repeat}" if repeat else "")
    if (kept := _kept(name)) is not None:
        return kept
    out = work / f"run-{size}-{path}"
    shutil.rmtree(out, ignore_errors=True)
    log = out / "train_log.jsonl"
    with tempfile.TemporaryDirectory(dir=work) as cache:
        env = {**os.environ, "HF_DATASETS_CACHE": cache}
        cmd = ["deepspeed", "--num_gpus", "2", str(REPO / "launchers" / "distill_gpt.py"),
               "--teacher", str(model), "--student_num_layers", "2", "--max_seq_length", str(SEQ), "--max_steps", "2",
               "--eval_on_start", "false", "--max_eval_samples", "8", "--per_device_train_batch_size", "8", "--output_dir", str(out),
               *([] if path == "prepared" else ["--validation_file", str(validation)]), *data_flags]  # a prepared folder holds its own
        seconds, tree_peak, result = tree_peak_rss(cmd, env, stop_when=lambda: log.is_file() and log.stat().st_size > 0)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    ready = re.search(r"\[fcd_ds\] data ready in ([0-9.]+) s", result.stdout)  # rank 0's own report of its data set-up
    return _keep(name, {"size_mb": size, "path": path, "repeat": repeat, "seconds_to_first_step": seconds,
                        "data_ready_seconds": float(ready.group(1)) if ready else None,
                        "peak_rss_gib_per_rank": metrics["peak_host_memory_gib_per_rank"], "tree_peak_rss_gib": tree_peak})


def _median_run(runs: list[dict]) -> dict:
    """The run with the median time to first step, with every run's seconds (launches vary by seconds)."""
    ordered = sorted(runs, key=lambda r: r["seconds_to_first_step"])
    return {**ordered[len(ordered) // 2], "all_seconds": [r["seconds_to_first_step"] for r in runs]}


def arrow_vs_memmap(folder: Path, work: Path) -> dict:
    """Open + 2,000 random micro-batches of 8 blocks: Arrow (load_from_disk) against a NumPy memmap."""
    if (kept := _kept("arrow-vs-memmap")) is not None:
        return kept
    import numpy as np
    from datasets import load_from_disk

    start = time.perf_counter()
    ds = load_from_disk(str(folder / "train"))
    arrow_open = time.perf_counter() - start
    n = len(ds)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, n, 8).tolist() for _ in range(2000)]
    start = time.perf_counter()
    for idx in batches:
        _ = ds[idx]["input_ids"]
    arrow_read = time.perf_counter() - start
    mm_path = work / "tokens.int32"
    if not mm_path.is_file():
        table = ds.data.table.column("input_ids").combine_chunks()
        np.asarray(table.flatten().to_numpy(zero_copy_only=False), dtype=np.int32).tofile(mm_path)
    start = time.perf_counter()
    tokens = np.memmap(mm_path, dtype=np.int32, mode="r").reshape(-1, SEQ)
    mm_open = time.perf_counter() - start
    start = time.perf_counter()
    for idx in batches:
        _ = tokens[idx].tolist()
    mm_read = time.perf_counter() - start
    return _keep("arrow-vs-memmap", {"blocks": n, "arrow_open_s": arrow_open, "arrow_read_s": arrow_read, "memmap_open_s": mm_open,
                                     "memmap_read_s": mm_read, "batches": len(batches)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 256, 1024], help="corpus sizes in MiB")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fcd_ds_data_scale")
    p.add_argument("--repeats", type=int, default=3, help="launches per prepared / streaming measurement (the median is reported)")
    p.add_argument("--no_write", action="store_true", help="print only, do not append to RESULTS.md")
    args = p.parse_args()
    from transformers import AutoTokenizer

    from fcd_ds.assets import prepare_default_assets
    from fcd_ds.runtime.metrics import measure_matmul_tflops

    args.work.mkdir(parents=True, exist_ok=True)
    teacher = prepare_default_assets().teacher
    validation = prepare_default_assets().validation_documents
    matmul = measure_matmul_tflops() * 1e3
    model = tiny_models(args.work, teacher)
    rows, first = [], []
    rate = None
    for size in args.sizes:
        corpus = build_corpus(size, args.work)
        if rate is None:
            rate = _kept("tokenizer-rate") or _keep("tokenizer-rate", tokenizer_rate(AutoTokenizer.from_pretrained(teacher), corpus))
        preps = [prepare_run(size, corpus, args.work, n, teacher) for n in (1, 2)]
        rows.append((size, preps))
        print(json.dumps(preps), flush=True)
        folder = preps[1]["folder"]
        glob = str(corpus / "shard-*.jsonl")
        for path, flags in (("prepared", ["--dataset_prepared_path", folder]), ("streaming", ["--train_file", glob, "--streaming"]),
                            ("raw", ["--train_file", glob, "--preprocessing_num_workers", "2"])):
            runs = [first_step(size, path, flags, args.work, model, validation, r) for r in range(1 if path == "raw" else args.repeats)]
            first.append(_median_run(runs))
            print(json.dumps(first[-1]), flush=True)
    choice = arrow_vs_memmap(Path(rows[-1][1][1]["folder"]), args.work) if rows else None
    lines = [f"\n## Data path at scale (benchmarks/data_scale.py, {utc_stamp()})\n",
             f"Command: `python benchmarks/data_scale.py --sizes {' '.join(map(str, args.sizes))}`. Corpora: the BBC News train articles "
             f"(4.9 MB) **repeated** to each size, 8 JSON-lines shards; SmolLM2-135M-Instruct's tokenizer, blocks of {SEQ}. "
             f"Machine: {os.cpu_count()} cores, measured fp32 matmul {matmul:.1f} GFLOP/s. Tokenizer's own batch rate "
             f"(batches of 1,000 documents, this process, TOKENIZERS_PARALLELISM {rate['tokenizers_parallelism'] if rate else '-'}): "
             f"**{rate['tokens_per_second'] / 1e6:.2f} M tokens/s**.\n" if rate else "",
             "| corpus | tokens | prepare, 1 process: s | tokens/s | peak RSS GiB | prepare, 2 processes: s | tokens/s | peak RSS GiB | 2 vs 1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size, (one, two) in rows:
        lines.append(f"| {size} MiB | {one['tokens'] / 1e6:.1f} M | {one['seconds']:.1f} | {one['tokens_per_second'] / 1e6:.2f} M | {one['peak_rss_gib']:.2f} | "
                     f"{two['seconds']:.1f} | {two['tokens_per_second'] / 1e6:.2f} M | {two['peak_rss_gib']:.2f} | {one['seconds'] / two['seconds']:.2f}x |")
    lines += ["", "Launch (`deepspeed --num_gpus 2`, random 4 x 64 Llama teacher with the 49,152-token vocabulary, 2-block student, "
              "micro-batch 8) to the first optimizer step, and each rank's peak RSS:", "",
              "| corpus | path | seconds to first step (median; every launch) | of which data set-up (rank 0) | peak RSS per rank GiB |",
              "|---|---|---|---|---|"]
    for r in first:
        ready = f"{r['data_ready_seconds']:.2f}" if r.get("data_ready_seconds") is not None else "-"
        every = ", ".join(f"{x:.1f}" for x in r["all_seconds"])
        lines.append(f"| {r['size_mb']} MiB | {r['path']} | {r['seconds_to_first_step']:.1f} ({every}) | {ready} | "
                     f"{', '.join(f'{g:.2f}' for g in r['peak_rss_gib_per_rank'])} |")
    for path in ("prepared", "streaming"):
        mine = [r for r in first if r["path"] == path]
        if len(mine) > 1:
            t = max(r["seconds_to_first_step"] for r in mine) / min(r["seconds_to_first_step"] for r in mine)
            m = max(max(r["peak_rss_gib_per_rank"]) for r in mine) / min(max(r["peak_rss_gib_per_rank"]) for r in mine)
            lines.append(f"\n{path}: largest / smallest over the sizes: time to first step {t:.2f}x, per-rank peak RSS {m:.2f}x (goal: within 1.2x).")
    if choice:
        lines.append(f"\nFormat choice, {choice['blocks']:,} blocks of the largest corpus, {choice['batches']:,} random micro-batches of 8: "
                     f"Arrow open {choice['arrow_open_s'] * 1e3:.0f} ms, read {choice['arrow_read_s']:.2f} s; "
                     f"NumPy memmap open {choice['memmap_open_s'] * 1e3:.1f} ms, read {choice['memmap_read_s']:.2f} s.")
    publish("\n".join(lines) + "\n", write=not args.no_write, end="")


if __name__ == "__main__":
    main()
