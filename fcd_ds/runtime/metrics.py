"""Metric logging (TensorBoard and Weights & Biases on rank 0, as ``--report_to`` says) and the FLOP count
behind TFLOP/s and MFU."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .distributed import is_main_process

__all__ = ["MetricLogger", "WANDB_DIR", "WANDB_RUN_ID_FILE", "transformer_flops_per_token", "measure_matmul_tflops"]

WANDB_DIR = "wandb"  # under output_dir: wandb.init(dir=output_dir) writes its run folders here
WANDB_RUN_ID_FILE = "fcd_ds_run_id"  # in output_dir/wandb: the run id a resumed run continues


def _start_wandb(output_dir: Path, run_config: dict | None, resume: bool):
    """``wandb.init`` of this run: offline unless ``WANDB_MODE`` is set (then wandb's own reading of it),
    files under ``output_dir/wandb``, project ``$WANDB_PROJECT`` (default ``fcd_ds``), named after the
    output folder, config = ``run_config.json``'s content. A resumed run continues the run id stored in
    ``output_dir/wandb/fcd_ds_run_id`` (``resume="allow"``); a new one stores a fresh id there."""
    import wandb
    from wandb.sdk.lib.runid import generate_id

    folder = output_dir / WANDB_DIR
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / WANDB_RUN_ID_FILE
    run_id = id_file.read_text(encoding="utf-8").strip() if resume and id_file.is_file() else ""
    if not run_id:
        run_id = generate_id()
        id_file.write_text(run_id + "\n", encoding="utf-8")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "fcd_ds"), name=output_dir.resolve().name, id=run_id, resume="allow",
                      dir=str(output_dir), config=run_config, mode=None if os.environ.get("WANDB_MODE") else "offline")


class MetricLogger:
    """``log_dict(step, payload)`` writes scalars on rank 0 (other ranks do nothing) to the sinks of
    ``report_to`` (``--report_to``, a list of ``tensorboard``, ``wandb``): TensorBoard events in
    ``log_dir``, a Weights & Biases run under ``wandb_dir/wandb`` (offline unless ``WANDB_MODE`` is set;
    see :func:`_start_wandb`), and, when ``jsonl_path`` is given, one JSON line per call. As torchtune's
    ``TensorBoardLogger``, ``WandBLogger`` and ``JSONLLogger``; every sink gets the same scalars at the same steps.

    A resumed run continues them without duplicates where the sink allows: ``resume_rows`` keeps only the
    first rows of the JSON-lines file (those written up to the checkpoint, :attr:`rows` at save time) and
    ``resume_step`` makes TensorBoard discard the earlier events logged after that step
    (``SummaryWriter(purge_step=)``); wandb continues the same run id and cannot drop rows, so the steps
    between the checkpoint and the interruption are logged a second time (the losses the same, a resume
    being exact; the throughput not).
    """

    def __init__(self, log_dir: str | Path, jsonl_path: str | Path | None = None, *, resume_rows: int | None = None,
                 resume_step: int | None = None, report_to: tuple[str, ...] | list[str] = ("tensorboard",),
                 wandb_dir: str | Path | None = None, run_config: dict | None = None):
        self._writer = self._jsonl = self._wandb = None
        self.rows = 0  # JSON lines in the file (rank 0)
        if is_main_process():
            if "tensorboard" in report_to:
                from torch.utils.tensorboard import SummaryWriter

                purge = resume_step + 1 if resume_step is not None else None
                self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)
            if "wandb" in report_to:
                self._wandb = _start_wandb(Path(wandb_dir if wandb_dir is not None else Path(log_dir).parent), run_config,
                                           resume=resume_step is not None)
            if jsonl_path is not None:
                path = Path(jsonl_path)
                lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.is_file() else []
                if resume_rows is not None and len(lines) > resume_rows:  # rows logged after the checkpoint
                    lines = lines[:resume_rows]
                    tmp = path.with_name(path.name + ".tmp")
                    tmp.write_text("".join(lines), encoding="utf-8")
                    tmp.replace(path)
                self.rows = len(lines)
                self._jsonl = open(path, "a", encoding="utf-8")

    def log_dict(self, step: int, payload: dict[str, float]) -> None:
        """Write every ``name: value`` of ``payload`` at ``step``."""
        if self._writer is not None:
            for name, value in payload.items():
                self._writer.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(payload, step=step)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **payload}) + "\n")
            self._jsonl.flush()
            self.rows += 1

    def close(self) -> None:
        """Flush and close the event file, finish the wandb run, close the JSON-lines file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def transformer_flops_per_token(config, seq_len: int, *, head: bool = True, backward: bool = False) -> float:
    """Matmul FLOPs per token of one forward (x3 with ``backward``) of a transformer (decoder or encoder).

    Per block: 2 * (attention and MLP weight elements) + 2 * 2 * seq_len * hidden for the score and value
    matmuls (PaLM, Chowdhery et al. 2022, appendix B; the 6N + 12 L H Q T count of nanoGPT's
    ``estimate_mfu``); plus 2 * vocab * hidden for the LM head. Embedding lookups, norms and softmax are
    not counted, nor a classification head (K x hidden, negligible). The weight count comes from the config (hidden_size, intermediate_size, heads, KV heads;
    GPT-2 style 4x MLP when ``intermediate_size`` is absent; gated MLP for ``hidden_act`` silu).

    Args:
        config: a transformers config. seq_len: tokens per sequence.
        head: count the vocabulary projection (LM or MLM head).

    Returns:
        FLOPs per token (float).
    """
    d = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    attn_weights = d * heads * head_dim * 2 + d * kv * head_dim * 2  # q, o + k, v
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    gated = str(getattr(config, "hidden_act", "")).lower() in ("silu", "swiglu", "geglu")
    mlp_weights = d * inner * (3 if gated else 2)
    per_block = 2 * (attn_weights + mlp_weights) + 4 * seq_len * heads * head_dim
    flops = config.num_hidden_layers * per_block + (2 * config.vocab_size * d if head else 0)
    return float(flops * (3 if backward else 1))


def measure_matmul_tflops(n: int = 2048, repeats: int = 10, dtype=None, threads: int | None = None) -> float:
    """This machine's measured dense matmul rate (TFLOP/s): the median of ``repeats`` timed n x n @ n x n
    products (2 n^3 FLOPs each) after one warm-up, on the accelerator DeepSpeed picks (CPU here).

    Machines of one kind differ by 2x or more, so throughput figures are reported beside this rate and
    as a fraction of it. ``threads`` sets torch's CPU threads for the measurement only.
    """
    import statistics
    import time

    import torch
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    device = acc.device_name()
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG streams (and a resumed run's) untouched
        a = torch.randn(n, n, dtype=dtype or torch.float32, device=device, generator=gen)
        b = torch.randn(n, n, dtype=dtype or torch.float32, device=device, generator=gen)
        a @ b
        acc.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            acc.synchronize()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(old)
    return 2 * n**3 / statistics.median(times) / 1e12
