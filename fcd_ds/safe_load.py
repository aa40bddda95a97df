"""Reading checkpoints without running what a folder holds: every ``torch.load`` of fcd_ds and of
DeepSpeed's checkpoint engine with ``weights_only=True`` and an explicit allow-list of the types they save.

A pickle can name any callable to rebuild an object, so loading one from a shared output folder would
run whatever someone planted there (``--auto_resume`` loads it unasked). ``torch.load(weights_only=True)``
rebuilds only tensors, containers, numbers and strings, plus the classes added here: the types
DeepSpeed 0.19 writes into ZeRO optimizer states: ``LossScaler``, ``ZeroStageEnum`` and ``fragment_address``
(what ``torch.serialization.get_unsafe_globals_in_checkpoint`` found in the 110 checkpoint files the test
suite's real runs wrote), and ``DynamicLossScaler``, its fp16 loss scaler. Their instances are rebuilt by setting attributes (no constructor runs).
Anything else in a checkpoint is refused in one line naming the file and the type.

fcd_ds's own RNG states are saved as tensors, strings and numbers only (:func:`rng_state_to_safe`).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import UsageError

__all__ = ["deepspeed_checkpoint_types", "safe_torch_load", "SafeCheckpointEngine", "install_safe_checkpoint_engine", "forced_safe_loads"]


def deepspeed_checkpoint_types() -> list:
    """The non-tensor classes DeepSpeed's ZeRO optimizer states hold (allow-listed for ``weights_only``)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


_TORCH_LOAD = torch.load  # the real one, also while forced_safe_loads() has replaced torch.load

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)|Unsupported global: ([\w.]+)|(?:was not an allowed global|global) ([\w.]+)")


def safe_torch_load(path: str | Path, map_location=None):
    """``torch.load(path, weights_only=True)`` with :func:`deepspeed_checkpoint_types` allowed.

    Raises:
        UsageError: the file holds another type (a planted or foreign object): names the file and the
            type, loads nothing of it.
    """
    try:
        with torch.serialization.safe_globals(deepspeed_checkpoint_types()):
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True)
    except torch.serialization.pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        what = next((g for g in found.groups() if g), "an object") if found else "an object"
        raise UsageError(f"--resume: {path} holds {what}, which fcd_ds does not load (a pickle runs code while it loads); "
                         "remove the checkpoint or resume from one written by fcd_ds") from None


class SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine with :func:`safe_torch_load` in place of its ``torch.load(weights_only=False)``;
    every other call goes to the engine it wraps (saving is unchanged)."""

    def __init__(self, inner):
        self.inner = inner

    def load(self, path: str, map_location=None):
        return safe_torch_load(path, map_location=map_location)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def install_safe_checkpoint_engine(engine) -> None:
    """Make ``engine.load_checkpoint`` read model, optimizer and scheduler states through :class:`SafeCheckpointEngine`."""
    if not isinstance(engine.checkpoint_engine, SafeCheckpointEngine):
        engine.checkpoint_engine = SafeCheckpointEngine(engine.checkpoint_engine)


@contextmanager
def forced_safe_loads():
    """While active, every ``torch.load`` in this process (and in processes it forks) is :func:`safe_torch_load`,
    whatever ``weights_only`` its caller passes: for DeepSpeed code that loads checkpoint files with
    ``weights_only=False`` outside its checkpoint engine (``deepspeed.checkpoint.ds_to_universal``, the
    universal checkpoint loader). Not thread-safe: it replaces ``torch.load`` itself for the duration."""
    original = torch.load

    def load(f, map_location=None, *args, **kwargs):
        return safe_torch_load(f, map_location=map_location)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
