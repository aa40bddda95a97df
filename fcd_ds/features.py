"""Capture transformer-block outputs, and the queries, keys and values inside attention, with forward
hooks addressed by block index (no model rewrite).

As torchdistill's ``ForwardHookManager``: hooks on the selected blocks only, so a layer map that
uses 3 of 30 blocks keeps 3 feature tensors, not 31 as ``output_hidden_states=True`` would.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["find_blocks", "block_path", "FeatureCapture", "AttentionCapture", "attention_projections"]


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


class _HookSwitch:
    """The forward-hook handles of a capture and whether its hooks record: both captures' on/off logic."""

    def __init__(self):
        self.on = False
        self.handles = []

    @contextmanager
    def recording(self, clear):
        """Call ``clear()`` (drop old records), then let the hooks record until the context exits."""
        clear()
        self.on = True
        try:
            yield
        finally:
            self.on = False

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


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
        self._switch = _HookSwitch()
        self._switch.handles = [blocks[i].register_forward_hook(self._hook(i)) for i in sorted(set(block_indices))]

    def _hook(self, index: int):
        def hook(_module, _inputs, output):
            if self._switch.on:
                self.features[index] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def _clear(self) -> None:
        self.features = {}

    @contextmanager
    def recording(self):
        """Record block outputs of the forward passes run inside this context; clears old ones first."""
        with self._switch.recording(self._clear):
            yield self

    def remove(self) -> None:
        """Remove the hooks."""
        self._switch.remove()


# Projection module names inside a block, per attention style: separate q/k/v linears (Llama, Mistral,
# Qwen, SmolLM: grouped KV heads give narrower k/v), BERT/RoBERTa/ELECTRA, MPNet; or one fused qkv
# linear whose output is [q | k | v] along the channels (GPT-2's Conv1D ``c_attn``).
_SEPARATE_QKV = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"))
_FUSED_QKV = ("c_attn",)


def attention_projections(block: nn.Module) -> tuple[list[nn.Module], bool]:
    """The modules of one transformer block whose outputs are the attention queries, keys and values.

    Returns:
        ``([q, k, v], False)`` for separate projections, ``([qkv], True)`` for a fused one (GPT-2).

    Raises:
        ValueError: none of the known layouts (see ``_SEPARATE_QKV``) or more than one attention found.
    """
    named = dict(block.named_modules())
    for names in _SEPARATE_QKV:
        found = [[m for path, m in named.items() if path.rsplit(".", 1)[-1] == n] for n in names]
        if all(len(f) == 1 for f in found):
            return [f[0] for f in found], False
    for name in _FUSED_QKV:
        found = [m for path, m in named.items() if path.rsplit(".", 1)[-1] == name]
        if len(found) == 1:
            return found, True
    raise ValueError(
        f"cannot find the query/key/value projections in {type(block).__name__} (looked for "
        f"{', '.join('/'.join(n) for n in _SEPARATE_QKV)} or fused {', '.join(_FUSED_QKV)}); MiniLM relations "
        "do not support this architecture: drop minilm from --loss"
    )


class AttentionCapture:
    """Keeps the attention queries, keys and values (projection outputs, before any rotary embedding)
    of chosen blocks during a forward pass: ``features[block] = (q, k, v)``, each (B, N, C_kind).

    Like :class:`FeatureCapture`, records only inside ``recording()``. A fused projection's output
    (B, N, 3C) is split into three (B, N, C).

    Raises:
        ValueError: the model's attention layout is unknown (:func:`attention_projections`).
    """

    def __init__(self, model: nn.Module, block_indices: list[int]):
        blocks = find_blocks(model)
        self.features: dict[int, tuple[torch.Tensor, ...]] = {}
        self._parts: dict[int, dict[int, torch.Tensor]] = {}
        self._switch = _HookSwitch()
        for i in sorted(set(block_indices)):
            modules, fused = attention_projections(blocks[i])
            for kind, module in enumerate(modules):
                self._switch.handles.append(module.register_forward_hook(self._hook(i, kind, fused)))

    def _hook(self, index: int, kind: int, fused: bool):
        def hook(_module, _inputs, output):
            if not self._switch.on:
                return
            if fused:
                self.features[index] = tuple(output.chunk(3, dim=-1))  # (B, N, 3C) -> 3 x (B, N, C)
                return
            parts = self._parts.setdefault(index, {})
            parts[kind] = output
            if len(parts) == 3:
                self.features[index] = (parts[0], parts[1], parts[2])
                del self._parts[index]

        return hook

    def _clear(self) -> None:
        self.features, self._parts = {}, {}

    @contextmanager
    def recording(self):
        """Record q, k, v of the forward passes run inside this context; clears old ones first."""
        with self._switch.recording(self._clear):
            yield self

    def remove(self) -> None:
        """Remove the hooks."""
        self._switch.remove()
