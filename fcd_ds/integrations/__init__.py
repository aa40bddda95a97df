"""fcd_ds's losses inside other training loops.

* :class:`FCDTrainer` and :class:`FCDConfig`: a ``transformers.Trainer`` (TRL GKDTrainer's conventions)
  that trains a causal-LM student against a frozen teacher with the same loss code as fcd_ds's own
  engine (:class:`~fcd_ds.objective.DistillObjective`), under the Trainer's own ``--deepspeed``
  integration (ZeRO-2, ZeRO-3) or without DeepSpeed.
"""

from .hf_trainer import FCDConfig, FCDTrainer, hf_batch, prepare_teacher

__all__ = ["FCDConfig", "FCDTrainer", "hf_batch", "prepare_teacher"]
