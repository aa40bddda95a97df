"""What a distributed run needs around the distillation itself (torchtune's ``training/``):

* :mod:`~fcd_ds.runtime.distributed`: ranks, host-tensor collectives, DeepSpeed's CPU shared-memory buffer;
* :mod:`~fcd_ds.runtime.checkpoint`: DeepSpeed checkpoints, exact resume, the output folder's checks, the export;
* :mod:`~fcd_ds.runtime.preemption`: SIGTERM / SIGUSR1 / SIGINT agreed at the step boundary, the launcher watch;
* :mod:`~fcd_ds.runtime.host_memory`: glibc heap reuse for CPU training;
* :mod:`~fcd_ds.runtime.metrics`: TensorBoard and wandb sinks, FLOP counts, the measured matmul rate.
"""

__all__ = ["checkpoint", "distributed", "host_memory", "metrics", "preemption"]
