"""Output directory layout, its guard against clobbering a run, and resumable DeepSpeed checkpoints.

Layout of ``OUTPUT_DIR``::

    checkpoints/        DeepSpeed save_checkpoint folders (global_step{N}/, latest) + per-rank RNG states
    student/            the distilled student, a Hugging Face folder with the tokenizer and a model card
    model/              instead of student/ for launchers/finetune_teacher.py: the fine-tuned model
    runs/               TensorBoard events
    train_log.jsonl     one JSON line per logged step (the same scalars), appended to on --resume
    metrics.json        final metrics
    run_config.json     resolved arguments and DeepSpeed JSON of the run

Only these names are ever written or removed; anything else a user keeps there is left alone.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError

__all__ = [
    "RUN_FILES",
    "check_output_dir",
    "clear_run_files",
    "latest_tag",
    "save_checkpoint",
    "load_checkpoint",
    "export_student",
    "check_resume_layout",
]

RUN_FILES = ("checkpoints", "student", "model", "runs", "train_log.jsonl", "metrics.json", "run_config.json")


def latest_tag(output_dir: str | Path) -> str | None:
    """Tag of the newest checkpoint (DeepSpeed's ``latest`` file), or None."""
    latest = Path(output_dir) / "checkpoints" / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def check_output_dir(output_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start where it would clobber or silently continue another run (as transformers' Trainer).

    Raises:
        UsageError: ``output_dir`` is a file; it holds a run and neither ``--resume`` nor
            ``--overwrite_output_dir`` is given; or ``--resume`` is given and there is no checkpoint.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir: {out} is a file; pass a directory")
    has_run = any((out / name).exists() for name in RUN_FILES)
    if resume:
        if latest_tag(out) is None:
            raise UsageError(f"--resume: no checkpoint in {out / 'checkpoints'}; drop --resume to start a new run")
    elif has_run and not overwrite:
        raise UsageError(
            f"--output_dir: {out} already holds a run; pass --resume to continue it, "
            "--overwrite_output_dir to start afresh, or another --output_dir"
        )


def check_resume_layout(saved: dict, now: dict) -> None:
    """A checkpoint's data position counts micro-batches of one layout (micro-batch size, world size,
    sequence length, seed); resuming under another would replay or skip data.

    Raises:
        UsageError: any value of ``now`` differs from ``saved``.
    """
    changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if changed:
        raise UsageError(
            f"--resume: the checkpoint was written with {changed} (saved, now); resume with the same values, "
            "or start a new run in another --output_dir"
        )


def clear_run_files(output_dir: str | Path) -> None:
    """Remove fcd_ds's own files (``RUN_FILES``) from ``output_dir``; nothing else is touched."""
    out = Path(output_dir)
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(engine, output_dir: str | Path, step: int, client_state: dict) -> None:
    """``engine.save_checkpoint`` under ``OUTPUT_DIR/checkpoints`` with tag ``global_step{step}``, plus this
    rank's RNG state (``rng_state_rank{r}.pt``, as transformers' Trainer keeps ``rng_state_{r}.pth``):
    DeepSpeed's ``client_state`` is written by rank 0 only. Collective: call on every rank."""
    import torch.distributed as dist

    ckpt = Path(output_dir) / "checkpoints"
    tag = f"global_step{step}"
    engine.save_checkpoint(str(ckpt), tag=tag, client_state=client_state)
    torch.save(_rng_state(), ckpt / tag / f"rng_state_rank{dist.get_rank()}.pt")
    dist.barrier()


def load_checkpoint(engine, output_dir: str | Path, keys: tuple[str, ...]) -> dict:
    """Load the latest checkpoint into ``engine`` (module, optimizer, scheduler) and restore this rank's
    RNG state. Collective.

    Args:
        keys: the ``client_state`` keys to return (DeepSpeed adds its own metadata keys beside them).

    Returns:
        The saved ``client_state`` restricted to ``keys``.

    Raises:
        RuntimeError: DeepSpeed found nothing to load.
    """
    import torch.distributed as dist

    ckpt = Path(output_dir) / "checkpoints"
    tag = latest_tag(output_dir)
    path, client_state = engine.load_checkpoint(str(ckpt), tag=tag)
    if path is None:
        raise RuntimeError(f"no DeepSpeed checkpoint could be loaded from {ckpt}")
    rng = ckpt / tag / f"rng_state_rank{dist.get_rank()}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    missing = [k for k in keys if k not in client_state]
    if missing:
        raise RuntimeError(f"checkpoint {ckpt / tag} lacks {missing}; it was not written by fcd_ds")
    return {k: client_state[k] for k in keys}


def export_student(engine, tokenizer, dest: str | Path, model_card: str | None = None) -> None:
    """Write the student as a Hugging Face folder (config, safetensors, tokenizer, and ``model_card`` as
    README.md) that the task's Auto class (e.g. ``AutoModelForCausalLM.from_pretrained(dest)``) loads.
    Under ZeRO-3 the shards are gathered first (``deepspeed.zero.GatheredParameters``). Collective;
    rank 0 writes, into ``dest.tmp`` renamed at the end."""
    import deepspeed
    import torch.distributed as dist

    from .projections import export_state_dict

    module = engine.module
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
        if dist.get_rank() == 0:
            dest = Path(dest)
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            module.config.use_cache = True
            state = export_state_dict(module)  # without the training-only hidden-MSE projection
            module.save_pretrained(tmp, state_dict=state)
            module.config.use_cache = False
            tokenizer.save_pretrained(tmp)
            if model_card is not None:
                (tmp / "README.md").write_text(model_card, encoding="utf-8")
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
    dist.barrier()
