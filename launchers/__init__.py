"""The launchers, installed as the package ``fcd_ds.launchers`` (setup.py maps this folder to it, as it
maps ``ds_configs/`` to ``fcd_ds.ds_configs``). After any install, from any directory::

    deepspeed --num_gpus 8 --module fcd_ds.launchers.distill_gpt --teacher PATH ...

and in the repository ``deepspeed launchers/distill_gpt.py ...`` runs the same file as a script. The SLURM
template and ``multinode.sh`` ship beside them (package data; :func:`path` finds them) and take the module
form as ``--module fcd_ds.launchers.distill_gpt``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["LAUNCHERS", "path"]

LAUNCHERS = ("distill_gpt", "distill_bert", "distill_roberta", "finetune_teacher")


def path(name: str) -> Path:
    """Where an installed launcher file or script lies, e.g. ``path("slurm/distill.sbatch")``,
    ``path("multinode.sh")``, ``path("distill_gpt.py")``.

    Raises:
        FileNotFoundError: no such file ships with fcd_ds.
    """
    found = Path(__file__).resolve().parent / name
    if not found.is_file():
        raise FileNotFoundError(f"fcd_ds.launchers ships no {name}; it has {sorted(p.name for p in found.parent.iterdir())}")
    return found
