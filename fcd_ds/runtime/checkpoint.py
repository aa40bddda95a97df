"""Resumable DeepSpeed checkpoints under ``OUTPUT_DIR/checkpoints`` and the checks that guard an
output folder before a run starts (the folder's layout, manifest and lock: :mod:`fcd_ds.output_dir`).

``checkpoints/`` holds DeepSpeed save_checkpoint folders (global_step{N}/, latest) and per-rank RNG and
data states; a folder is written as global_step{N}.tmp and renamed once every rank has finished, so
``latest`` never names a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..config import START_FLAGS  # flags that may differ between attempts of one run (a recipe and the same flags typed out are one run)
from ..errors import UsageError
from ..output_dir import foreign_entries, has_run, lock_holder, run_entries, write_atomic
from ..safe_load import forced_safe_loads, install_safe_checkpoint_engine, safe_torch_load

__all__ = [
    "check_output_dir",
    "check_checkpoint_files",
    "latest_tag",
    "checkpoint_steps",
    "save_checkpoint",
    "load_checkpoint",
    "load_rank_state",
    "export_student",
    "check_resume_layout",
    "RESHARDABLE",
    "reshard_position",
    "universal_tag",
    "convert_to_universal",
    "comparable_run_config",
    "read_trainer_state",
    "auto_resume_action",
]

_TAG = re.compile(r"global_step(\d+)")


def latest_tag(output_dir: str | Path) -> str | None:
    """Tag of the newest complete checkpoint (DeepSpeed's ``latest`` file, naming a folder that exists), or None."""
    ckpt = Path(output_dir) / "checkpoints"
    latest = ckpt / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (ckpt / tag).is_dir() else None


def checkpoint_steps(output_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoint folders (``global_step{N}``, not ``*.tmp``), ascending."""
    ckpt = Path(output_dir) / "checkpoints"
    if not ckpt.is_dir():
        return []
    return sorted(int(m.group(1)) for p in ckpt.iterdir() if p.is_dir() and (m := _TAG.fullmatch(p.name)))


def check_output_dir(output_dir: str | Path, *, resume: bool, overwrite: bool, auto_resume: bool = False,
                     export_name: str = "student", holding_lock: bool = False) -> None:
    """Refuse to start where it would clobber, delete or silently continue what is not this run's (as
    transformers' Trainer, with a manifest instead of names: :mod:`fcd_ds.output_dir`). With
    ``auto_resume`` only the folder checks run here; :func:`auto_resume_action` decides the rest.

    Raises:
        UsageError: ``output_dir`` is a file; a running fcd_ds run holds its lock; a name the run writes
            (``checkpoints``, ``export_name``, ...) exists but is not in the manifest, or is a symlink; it
            holds a run and neither ``--resume`` nor ``--overwrite_output_dir`` is given; or ``--resume``
            is given and there is no complete checkpoint (``latest`` naming a missing folder is said so,
            with the newest complete checkpoint named).

    ``holding_lock``: this process holds the folder's lock (the re-check under it), so it is not probed.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir: {out} is a file; pass a directory")
    holder = None if holding_lock else lock_holder(out)
    if holder is not None:
        raise UsageError(f"--output_dir: {out} is in use by a running fcd_ds run ({holder}); wait for it to end, or pick another --output_dir")
    foreign = foreign_entries(out, run_entries(export_name))
    if foreign:
        path = out / foreign[0]
        why = "is a symlink, which fcd_ds never writes" if path.is_symlink() else "was not written by fcd_ds (fcd_ds_manifest.json does not name it)"
        raise UsageError(f"--output_dir: {path} {why}, and this run writes {foreign[0]} there; move it, or pick another --output_dir")
    if auto_resume:
        return
    if resume:
        if latest_tag(out) is None:
            raise UsageError(f"--resume: {_no_checkpoint(out)}")
    elif has_run(out) and not overwrite:
        raise UsageError(
            f"--output_dir: {out} already holds a run; pass --resume to continue it, "
            "--overwrite_output_dir to start afresh, or another --output_dir"
        )


def _no_checkpoint(out: Path) -> str:
    """Why ``out`` has no checkpoint to resume, in words (``latest`` naming a missing folder said so)."""
    ckpt = out / "checkpoints"
    latest = ckpt / "latest"
    if latest.is_file():
        steps = checkpoint_steps(out)
        newest = f"the newest complete one is global_step{steps[-1]}: write that name into {latest}" if steps else "no complete checkpoint is left"
        return f"{latest} names {latest.read_text().strip()!r}, which does not exist; {newest}, or drop --resume to start a new run"
    return f"no checkpoint in {ckpt}; drop --resume to start a new run"


def check_checkpoint_files(output_dir: str | Path) -> None:
    """Check that every ``*.pt`` file of the latest checkpoint is a complete archive (``torch.save``
    writes a zip whose directory sits at its end, so a file cut short anywhere has none; only the
    directory is read). Every rank checks before any work, so a truncated optimizer shard of any rank is
    one line at plan time instead of a traceback inside DeepSpeed's load on that rank alone.

    Raises:
        UsageError: names the first damaged file and the older complete checkpoints to resume from instead.
    """
    import zipfile

    tag = latest_tag(output_dir)
    if tag is None:
        return
    folder = Path(output_dir) / "checkpoints" / tag
    for path in sorted(folder.rglob("*.pt")):
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError) as exc:
            older = [f"global_step{s}" for s in checkpoint_steps(output_dir) if f"global_step{s}" != tag]
            instead = (f"write {older[-1]} into {folder.parent / 'latest'} to resume from it" if older else "no older checkpoint is left")
            raise UsageError(f"--resume: {path} is damaged or truncated ({exc}); {instead}, or start a new run") from None


RESHARDABLE = ("micro_batch_size", "world_size", "gradient_accumulation_steps")
"""Layout values a resume may change while the global batch (their product) stays: the run re-splits each
step's samples over other ranks and micro-batches (ZeRO states through a universal checkpoint)."""


def _global_batch(layout: dict) -> int:
    return layout["micro_batch_size"] * layout.get("gradient_accumulation_steps", 1) * layout["world_size"]


def check_resume_layout(saved: dict, now: dict) -> bool:
    """Whether a resume under the layout ``now`` must re-split the checkpoint of layout ``saved``.

    A checkpoint's data position counts global samples of one order (sequence length, seed), its LR
    schedule was built for ``max_steps`` and the scheduler settings: those must match, and so must the
    global batch (micro-batch x accumulation x ranks), which the loss and the schedule are defined by. The
    ranks, micro-batch and accumulation may change within that global batch (:data:`RESHARDABLE`).

    Returns:
        True when a value of :data:`RESHARDABLE` changed (the caller re-partitions: :func:`reshard_position`,
        :func:`convert_to_universal`), False when the layout is the same.

    Raises:
        UsageError: another value changed, or the global batch did (names both, and the flag that keeps it).
    """
    fixed = [k for k in now if k not in RESHARDABLE and k != "train_batch_size"]
    changed = {k: (saved.get(k), now[k]) for k in fixed if saved.get(k) != now[k]}
    if changed:
        why = " (the LR schedule decays over the saved --max_steps: train longer in a new run)" if {"max_steps", "lr_schedule"} & set(changed) else ""
        raise UsageError(
            f"--resume: the checkpoint was written with {changed} (saved, now){why}; resume with the same values, "
            "or start a new run in another --output_dir"
        )
    if all(saved.get(k, 1 if k == "gradient_accumulation_steps" else None) == now[k] for k in RESHARDABLE):
        return False
    old, new = _global_batch(saved), _global_batch(now)
    if old != new:
        describe = (lambda d: f"micro-batch {d['micro_batch_size']} x accumulation {d.get('gradient_accumulation_steps', 1)} x {d['world_size']} ranks")
        raise UsageError(f"--resume: the checkpoint's global batch is {old} sequences ({describe(saved)}), now {new} ({describe(now)}); "
                         f"keep it: pass --train_batch_size {old} (the accumulation follows the ranks), or start a new run")
    return True


def reshard_position(saved: dict, now: dict, position: int) -> int:
    """This rank's data position (micro-batches) under layout ``now`` for a checkpoint at ``position`` under
    ``saved``: the same global samples read (position x micro-batch x ranks), counted in the new micro-batches.

    Raises:
        UsageError: the samples read do not fill whole micro-batches of the new layout.
    """
    samples = position * saved["micro_batch_size"] * saved["world_size"]
    per_micro_step = now["micro_batch_size"] * now["world_size"]
    if samples % per_micro_step:
        raise UsageError(f"--resume: the checkpoint read {samples} samples, not a whole number of micro-steps of {per_micro_step} "
                         "(micro-batch x ranks) now; resume with a micro-batch that divides it")
    return samples // per_micro_step


def universal_tag(tag: str) -> str:
    """The folder name of ``tag``'s universal (world-size-free) form beside it: ``global_step{N}_universal``."""
    return f"{tag}_universal"


def convert_to_universal(output_dir: str | Path, tag: str) -> Path:
    """Convert checkpoint ``tag`` into DeepSpeed's Universal Checkpoint format beside it (kept: the
    original is untouched), once: ``deepspeed.checkpoint.ds_to_universal`` (ZeRO-1/2 and ZeRO-3 optimizer
    states gathered per parameter, loadable on any number of ranks with ``"checkpoint": {"load_universal":
    true}``). Every file it reads is loaded with ``weights_only=True`` (:func:`~fcd_ds.safe_load.forced_safe_loads`:
    DeepSpeed's converter asks for ``weights_only=False``). Run on one process (rank 0); written as
    ``<name>.tmp`` and renamed, so a conversion killed half-way is redone.

    Returns:
        The universal folder ``checkpoints/global_step{N}_universal``.
    """
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    ckpt = Path(output_dir) / "checkpoints"
    final = ckpt / universal_tag(tag)
    if final.is_dir():
        return final
    tmp = ckpt / f"{universal_tag(tag)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(ckpt / tag), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)  # fcd_ds's client state has no Megatron info
    with forced_safe_loads():
        ds_to_universal.main(args)
    tmp.rename(final)
    return final


def _rng_state() -> dict:
    """Every random state a step can draw from: Python, NumPy, torch's CPU generator, the accelerator's
    generator (CUDA's, when the accelerator is not the CPU) and DeepSpeed's activation-checkpointing RNG
    tracker (the states its ``checkpoint`` replays in backward)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),  # (version, 625 ints, None)
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],  # no NumPy objects: weights_only
        "torch": torch.get_rng_state(),
        "accelerator": None if acc.device_name() == "cpu" else acc.get_rng_state(),
        "deepspeed_checkpointing": deepspeed.checkpointing.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("accelerator") is not None:
        get_accelerator().set_rng_state(state["accelerator"])
    if state.get("deepspeed_checkpointing"):
        deepspeed.checkpointing.get_cuda_rng_tracker().set_states(state["deepspeed_checkpointing"])


TRAINER_STATE = "trainer_state.json"  # the client_state as JSON, readable before any process group starts


def read_trainer_state(output_dir: str | Path) -> dict:
    """The ``client_state`` of the latest checkpoint, from its ``trainer_state.json``.

    Raises:
        UsageError: no complete checkpoint, or it was not written by this version of fcd_ds.
    """
    tag = latest_tag(output_dir)
    path = Path(output_dir) / "checkpoints" / str(tag) / TRAINER_STATE
    if tag is None or not path.is_file():
        raise UsageError(f"--resume: {Path(output_dir) / 'checkpoints'} holds no checkpoint written by this fcd_ds "
                         f"(no {TRAINER_STATE}); start a new run in another --output_dir")
    return json.loads(path.read_text())


def save_checkpoint(engine, output_dir: str | Path, step: int, client_state: dict, save_total_limit: int = 0,
                    rank_state: dict | None = None) -> None:
    """``engine.save_checkpoint`` of step ``step`` plus this rank's RNG states (``rng_state_rank{r}.pt``,
    as transformers' Trainer keeps ``rng_state_{r}.pth``; DeepSpeed writes ``client_state`` from rank 0)
    and ``rank_state`` (this rank's data position, e.g. a stream's ``state_dict``) as
    ``data_state_rank{r}.json``.

    Atomic: every rank writes into ``checkpoints/global_step{step}.tmp``; once all have finished (a
    barrier), rank 0 renames it to ``global_step{step}`` and then replaces ``latest`` (written to
    ``latest.tmp`` and renamed), so a job killed at any moment leaves ``latest`` naming a complete
    checkpoint (the folder holding it must be shared by the ranks, as DeepSpeed assumes). Then the
    oldest checkpoints beyond ``save_total_limit`` (0: keep all) are removed. Collective.
    """
    import torch.distributed as dist

    ckpt = Path(output_dir) / "checkpoints"
    tag = f"global_step{step}"
    tmp = ckpt / f"{tag}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died half-way
    dist.barrier()
    engine.save_checkpoint(str(ckpt), tag=tmp.name, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), tmp / f"rng_state_rank{rank}.pt")
    if rank_state is not None:
        (tmp / f"data_state_rank{rank}.json").write_text(json.dumps(rank_state), encoding="utf-8")
    if rank == 0:
        (tmp / TRAINER_STATE).write_text(json.dumps(client_state, indent=2))
    dist.barrier()
    if rank == 0:
        final = ckpt / tag
        if final.exists():  # the same step saved again (a run resumed after its last save)
            shutil.rmtree(final)
        tmp.rename(final)
        write_atomic(ckpt / "latest", tag)
        if save_total_limit:
            for old in checkpoint_steps(output_dir)[:-save_total_limit]:
                if old != step:
                    shutil.rmtree(ckpt / f"global_step{old}")
                    shutil.rmtree(ckpt / universal_tag(f"global_step{old}"), ignore_errors=True)  # its converted form, if any
    dist.barrier()


def load_rank_state(output_dir: str | Path, rank: int) -> dict | None:
    """This rank's ``data_state_rank{r}.json`` of the latest checkpoint, or None (a checkpoint from before it was saved)."""
    tag = latest_tag(output_dir)
    path = Path(output_dir) / "checkpoints" / str(tag) / f"data_state_rank{rank}.json"
    return json.loads(path.read_text(encoding="utf-8")) if tag is not None and path.is_file() else None


def load_checkpoint(engine, output_dir: str | Path, keys: tuple[str, ...], optional: tuple[str, ...] = (), *,
                    universal: bool = False) -> dict:
    """Load the latest checkpoint into ``engine`` (module, optimizer, scheduler) and restore this rank's
    RNG states. Collective.

    Args:
        keys: the ``client_state`` keys to return (DeepSpeed adds its own metadata keys beside them).
        optional: those of ``keys`` that an older checkpoint may lack (left out of the result then).
        universal: read model and optimizer from the latest checkpoint's universal form
            (:func:`convert_to_universal`; the engine built with ``"checkpoint": {"load_universal": true}``),
            as a run on another number of ranks must; the RNG state of this rank is the saved rank's of
            the same number when there is one (a rank the saved run did not have keeps its seeded state).

    Returns:
        The saved ``client_state`` restricted to ``keys``.

    Raises:
        RuntimeError: DeepSpeed found nothing to load, or the checkpoint was not written by fcd_ds.
    """
    import torch.distributed as dist

    ckpt = Path(output_dir) / "checkpoints"
    tag = latest_tag(output_dir)
    install_safe_checkpoint_engine(engine)  # DeepSpeed's own loads with weights_only=True too
    with forced_safe_loads():  # the universal loader calls torch.load(weights_only=False) itself
        path, client_state = engine.load_checkpoint(str(ckpt), tag=universal_tag(tag) if universal else tag)
    if path is None:
        raise RuntimeError(f"no DeepSpeed checkpoint could be loaded from {ckpt}")
    rng = ckpt / tag / f"rng_state_rank{dist.get_rank()}.pt"
    if rng.is_file():
        _set_rng_state(safe_torch_load(rng))
    missing = [k for k in keys if k not in client_state and k not in optional]
    if missing:
        raise RuntimeError(f"checkpoint {ckpt / tag} lacks {missing}; it was not written by fcd_ds")
    return {k: client_state[k] for k in keys if k in client_state}


TRACKING_FLAGS = ("report_to",)  # where the metrics go, not what the run computes: may change on resume


def comparable_run_config(run_config: dict) -> dict:
    """The part of a ``run_config.json`` that defines the run (launcher, task, model, data, distill and
    train arguments, without the start flags ``--resume``, ``--auto_resume``, ``--overwrite_output_dir``
    and the tracking flag ``--report_to``), as JSON values (tuples become lists)."""
    keep = {k: run_config.get(k) for k in ("launcher", "task", "model", "data", "distill", "train")}
    keep["train"] = {k: v for k, v in (keep["train"] or {}).items() if k not in START_FLAGS and k not in TRACKING_FLAGS}
    return json.loads(json.dumps(keep))


_ABSENT = object()


def _differences(saved: dict, now: dict, defaults: dict | None = None) -> list[str]:
    """``group.key`` of each argument that differs; a key the saved run does not record (it was written by
    an fcd_ds without that argument) counts as its default there, from ``defaults[group][key]``."""
    out = []
    for group in now:
        a, b = saved.get(group), now[group]
        if isinstance(a, dict) and isinstance(b, dict):
            known = (defaults or {}).get(group, {})
            out += [f"{group}.{k}" for k in sorted(set(a) | set(b)) if a.get(k, known.get(k, _ABSENT)) != b.get(k)]
        elif a != b:
            out.append(group)
    return out


def auto_resume_action(output_dir: str | Path, run_config: dict, defaults: dict | None = None) -> str:
    """What ``--auto_resume`` does in ``output_dir`` for a run described by ``run_config``.

    ``defaults``: ``{group: {argument: default}}`` of the argument dataclasses (``RunPlan.argument_defaults``),
    so that a run saved by an older fcd_ds, whose run_config.json lacks an argument added since, still
    matches when that argument is left at its default (a job requeued after an upgrade resumes).

    Returns:
        ``"resume"``: it holds a checkpoint of this run; ``"start"``: it holds no run;
        ``"restart"``: it holds only the files of an earlier attempt of this run that saved no
        checkpoint (they are replaced).

    Raises:
        UsageError: it holds another run (names the arguments that differ), or checkpoints without
            the ``run_config.json`` that says which run they belong to.
    """
    out = Path(output_dir)
    if not has_run(out):
        return "start"
    config_file = out / "run_config.json"
    if not config_file.is_file():
        raise UsageError(f"--auto_resume: {out} holds run files but no run_config.json, so it cannot tell whether they are this run's; "
                         "pass --resume, --overwrite_output_dir, or another --output_dir")
    saved = comparable_run_config(json.loads(config_file.read_text()))
    diff = _differences(saved, comparable_run_config(run_config), json.loads(json.dumps(defaults or {}, default=str)))
    if diff:
        raise UsageError(f"--auto_resume: {out} holds another run (it differs in {', '.join(diff)}); "
                         "pass the same arguments, or another --output_dir")
    return "resume" if latest_tag(out) is not None else "restart"


def _readable_as_umask_allows(folder: Path) -> None:
    """Give every file under ``folder`` the mode a plain ``open()`` would (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def export_student(engine, tokenizer, dest: str | Path, model_card: str | None = None) -> None:
    """Write the student as a Hugging Face folder (config, safetensors, tokenizer, and ``model_card`` as
    README.md) that the task's Auto class (e.g. ``AutoModelForCausalLM.from_pretrained(dest)``) loads.
    Under ZeRO-3 the shards are gathered first (``deepspeed.zero.GatheredParameters``). Collective;
    rank 0 writes, into ``dest.tmp`` renamed at the end."""
    import deepspeed
    import torch.distributed as dist

    from ..projections import export_state_dict

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
            _readable_as_umask_allows(tmp)  # safetensors writes its files 0600; an export is meant to be shared
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
    dist.barrier()
