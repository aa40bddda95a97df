"""fcd_ds: knowledge distillation of pre-trained language models with FCD (Feature Correlation
Distillation, Huang, Guo, Wang, NeurIPS 2023) on DeepSpeed.

Entry point: ``deepspeed launchers/distill_gpt.py``. Library: :mod:`fcd_ds.losses` (pure loss
functions), :mod:`fcd_ds.layer_map`, :mod:`fcd_ds.features`, :mod:`fcd_ds.models`, :mod:`fcd_ds.build`,
:mod:`fcd_ds.engine`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
