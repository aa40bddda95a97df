"""Metric logging (TensorBoard on rank 0) and the FLOP count behind TFLOP/s and MFU."""

from __future__ import annotations

import json
from pathlib import Path

from .distributed import is_main_process

__all__ = ["MetricLogger", "transformer_flops_per_token", "measure_matmul_tflops"]


class MetricLogger:
    """``log_dict(step, payload)`` writes scalars on rank 0 (other ranks do nothing) to TensorBoard
    (``log_dir``) and, when ``jsonl_path`` is given, as one JSON line per call. As torchtune's
    ``TensorBoardLogger`` and ``JSONLLogger``.

    A resumed run continues both without duplicates: ``resume_rows`` keeps only the first rows of the
    JSON-lines file (those written up to the checkpoint, :attr:`rows` at save time) and ``resume_step``
    makes TensorBoard discard the earlier events logged after that step (``SummaryWriter(purge_step=)``).
    """

    def __init__(self, log_dir: str | Path, jsonl_path: str | Path | None = None, *, resume_rows: int | None = None,
                 resume_step: int | None = None):
        self._writer = self._jsonl = None
        self.rows = 0  # JSON lines in the file (rank 0)
        if is_main_process():
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)
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
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **payload}) + "\n")
            self._jsonl.flush()
            self.rows += 1

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
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
