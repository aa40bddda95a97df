"""Run a frozen teacher only as deep as the losses need.

A feature-level loss on teacher block ``k`` needs blocks ``0..k`` and nothing after: not the later blocks,
not the final norm, not the head (the LM head alone is a fifth of SmolLM2-135M's forward). While
:class:`EarlyExit` is active, the model's block list holds its first ``depth`` blocks (the same module
objects, so forward hooks and ZeRO-3's partitioned parameters are untouched), the final norm is an
identity and the output embedding (LM / MLM head) returns an empty last dimension; the forward still goes
through the DeepSpeed engine, so ZeRO-3 fetches and prefetches the parameters of exactly the modules that
run. Skipped modules' parameters are never gathered.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .features import block_path

__all__ = ["EarlyExit", "FINAL_NORM_NAMES", "swapped_modules", "path_of"]

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")  # Llama/Mistral/Qwen, GPT-2, OPT, ...


class _EmptyHead(nn.Module):
    """Stands in for the head: ``(..., C) -> (..., 0)``, so no logits are computed."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[..., :0]


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return (model.get_submodule(parent) if parent else model), name


def path_of(model: nn.Module, module: nn.Module) -> str | None:
    """The dotted name of ``module`` inside ``model`` (``named_modules``), or None when it is not a submodule."""
    return next((name for name, m in model.named_modules() if m is module), None)


class EarlyExit:
    """Cut a Hugging Face model after block ``depth - 1`` for the duration of a ``with``.

    Args:
        model: the model (e.g. a teacher engine's ``.module``).
        depth: number of blocks to run (the deepest needed block index + 1); ``depth`` equal to the
            model's block count still skips the final norm and the head.

    Raises:
        ValueError: ``depth`` outside ``1..num_blocks``, or the blocks cannot be located
            (:func:`~fcd_ds.features.block_path`).
    """

    def __init__(self, model: nn.Module, depth: int):
        self.model = model
        self.blocks_path = block_path(model)
        self.blocks = model.get_submodule(self.blocks_path)
        if not 1 <= depth <= len(self.blocks):
            raise ValueError(f"EarlyExit: depth must be in 1..{len(self.blocks)}, got {depth}")
        self.depth = depth
        base = getattr(model, "base_model", model)
        prefix = path_of(model, base) or ""
        self.norm_path = next((f"{prefix}.{n}".lstrip(".") for n in FINAL_NORM_NAMES
                               if isinstance(getattr(base, n, None), nn.Module)), None)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.head_path = path_of(model, head) if head is not None else None

    def active(self):
        """Swap in the cut (blocks, identity norm, empty head); restore the model on exit, whatever happens."""
        swaps = [(self.blocks_path, nn.ModuleList(list(self.blocks)[: self.depth]))]
        if self.norm_path is not None:
            swaps.append((self.norm_path, nn.Identity()))
        if self.head_path is not None:
            swaps.append((self.head_path, _EmptyHead()))
        return swapped_modules(self.model, swaps)


@contextmanager
def swapped_modules(model: nn.Module, swaps: list[tuple[str, nn.Module]]):
    """For a ``with``: the submodules at the dotted ``path`` of each ``(path, replacement)`` replaced;
    the originals put back on exit, whatever happens."""
    saved = []
    try:
        for path, replacement in swaps:
            parent, name = _parent(model, path)
            saved.append((parent, name, getattr(parent, name)))
            setattr(parent, name, replacement)
        yield
    finally:
        for parent, name, original in reversed(saved):
            setattr(parent, name, original)
