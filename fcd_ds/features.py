"""Capture transformer-block outputs with forward hooks, addressed by block index (no model rewrite).

As torchdistill's ``ForwardHookManager``: hooks on the selected blocks only, so a layer map that
uses 3 of 30 blocks keeps 3 feature tensors, not 31 as ``output_hidden_states=True`` would.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["find_blocks", "block_path", "FeatureCapture"]


def block_path(model: nn.Module) -> str:
    """Dotted path of the model's list of transformer blocks, e.g. ``model.layers`` or ``transformer.h``.

    Found generically (no per-architecture code): the ``nn.ModuleList`` whose length is
    ``config.num_hidden_layers`` (transformers maps GPT-2's ``n_layer`` onto that name).

    Raises:
        ValueError: no such list, or more than one.
    """
    n = model.config.num_hidden_layers
    found = [name for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) == n]
    # Prefer the outermost list (nested lists of the same length would be inside blocks).
    found = [p for p in found if not any(p != q and p.startswith(q + ".") for q in found)]
    if len(found) != 1:
        raise ValueError(
            f"cannot locate the transformer blocks of {type(model).__name__}: ModuleLists of length {n}: {found}"
        )
    return found[0]


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's ``nn.ModuleList`` of transformer blocks (see :func:`block_path`)."""
    return model.get_submodule(block_path(model))


class FeatureCapture:
    """Keeps the output hidden states of chosen blocks during a forward pass.

    Usage::

        capture = FeatureCapture(model, [2, 5, 8])
        with capture.recording():
            model(input_ids)
        feats = capture.features  # {2: (B, N, C), 5: ..., 8: ...}

    Outside ``recording()`` the hooks store nothing (activation-checkpoint recomputation in backward
    re-runs the blocks and must not overwrite or keep features).
    """

    def __init__(self, model: nn.Module, block_indices: list[int]):
        blocks = find_blocks(model)
        self.features: dict[int, torch.Tensor] = {}
        self._on = False
        self._handles = [blocks[i].register_forward_hook(self._hook(i)) for i in sorted(set(block_indices))]

    def _hook(self, index: int):
        def hook(_module, _inputs, output):
            if self._on:
                self.features[index] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    @contextmanager
    def recording(self):
        """Record block outputs of the forward passes run inside this context; clears old ones first."""
        self.features = {}
        self._on = True
        try:
            yield self
        finally:
            self._on = False

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
