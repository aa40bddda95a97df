"""DeepSpeed JSON: read as is, fill 'auto' values and CLI overrides on top, derive the teacher's config.

The file's content is passed to ``deepspeed.initialize`` unchanged apart from: 'auto' values (and the
keys a CLI flag names) filled from :class:`~fcd_ds.config.TrainArguments`, following the 'auto'
convention of the transformers DeepSpeed integration (``HfTrainerDeepSpeedConfig.trainer_config_process``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .errors import UsageError

__all__ = ["load_ds_config", "resolve_ds_config", "validate_ds_config", "teacher_ds_config", "zero_stage", "bf16_enabled", "fp16_enabled",
           "FP16_DYNAMIC_LOSS_SCALE"]

DEFAULT_LR = 5e-4
DEFAULT_MICRO_BATCH = 4
# --fp16: the fp16 keys filled where the JSON has none, DeepSpeed's documented defaults (DeepSpeedFP16Config,
# deepspeed/runtime/precision_config.py, 0.19): loss_scale 0 = dynamic, starting at 2**16, doubled after 1000
# steps without overflow, halved after 2 consecutive overflows (hysteresis), never below 1.
FP16_DYNAMIC_LOSS_SCALE = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}


def load_ds_config(path: str) -> dict:
    """Read a DeepSpeed JSON file.

    Raises:
        UsageError: missing, unreadable, not JSON, not an object, or holding a removed section.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--deepspeed_config: {path} does not exist; pass one of ds_configs/*.json")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"--deepspeed_config: cannot read {path} as JSON ({exc}); fix the file or pass ds_configs/zero2.json") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"--deepspeed_config: {path} must hold a JSON object, got {type(cfg).__name__}")
    if "compression_training" in cfg:
        raise UsageError(
            f"--deepspeed_config: {path} has a 'compression_training' section, removed from DeepSpeed in 0.19.7 "
            "(issue #8489); delete it: fcd_ds does the distillation"
        )
    return cfg


def _fill(section: dict, key: str, value, override: bool) -> None:
    if value is not None and (override or section.get(key, "auto") == "auto"):
        section[key] = value


def resolve_ds_config(cfg: dict, args, micro_batch: int = DEFAULT_MICRO_BATCH, world_size: int = 1) -> dict:
    """Copy of ``cfg`` with CLI overrides applied and 'auto' values filled.

    Args:
        cfg: the JSON as loaded. args: a :class:`~fcd_ds.config.TrainArguments`.
        micro_batch: the launcher's micro-batch for an 'auto' ``train_micro_batch_size_per_gpu`` when
            ``--per_device_train_batch_size`` is not given (a number in the JSON is kept).

        world_size: the data-parallel ranks, from which a global batch (``--train_batch_size``, or a number
            in the JSON's ``train_batch_size`` with the accumulation 'auto' or absent) derives the accumulation,
            as DeepSpeed derives it.

    Returns:
        A new dict; ``train_batch_size`` is dropped when 'auto' (DeepSpeed derives it from micro-batch x
        accumulation x data-parallel size).

    ``--fp16`` enables the ``fp16`` section with :data:`FP16_DYNAMIC_LOSS_SCALE` under the keys the JSON
    sets; ``--bf16`` the ``bf16`` section; an 'auto' ``fp16.enabled`` / ``bf16.enabled`` follows the flag (as
    the transformers integration does).

    Raises:
        UsageError: an 'auto' value that no flag fills; a precision flag against a JSON that enables the
            other precision, or a JSON that enables both.
    """
    out = copy.deepcopy(cfg)
    for name in ("bf16", "fp16"):
        section = out.get(name)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = bool(getattr(args, name, False))
    for flag, other in (("bf16", "fp16"), ("fp16", "bf16")):
        if getattr(args, flag, False) and _enabled(out, other):
            raise UsageError(f"--{flag}: the DeepSpeed JSON enables {other}; set its {other}.enabled false, or drop --{flag}")
    if getattr(args, "fp16", False):
        out["fp16"] = {**FP16_DYNAMIC_LOSS_SCALE, **out.get("fp16", {}), "enabled": True}
    _fill(out, "train_micro_batch_size_per_gpu", args.per_device_train_batch_size, True)
    _fill(out, "train_micro_batch_size_per_gpu", micro_batch, False)
    _fill(out, "gradient_accumulation_steps", args.gradient_accumulation_steps, True)
    global_batch = getattr(args, "train_batch_size", None)
    flag = "--train_batch_size"
    if global_batch is None and isinstance(out.get("train_batch_size"), int) and out.get("gradient_accumulation_steps", "auto") == "auto":
        global_batch, flag = out["train_batch_size"], "--deepspeed_config: train_batch_size"
    if global_batch is not None:
        per_step = out["train_micro_batch_size_per_gpu"] * world_size  # sequences per micro-step over the ranks
        if global_batch % per_step:
            raise UsageError(f"{flag}: {global_batch} is not a multiple of micro-batch {out['train_micro_batch_size_per_gpu']} x {world_size} "
                             f"ranks = {per_step}; pick a multiple, or another --per_device_train_batch_size")
        out["gradient_accumulation_steps"], out["train_batch_size"] = global_batch // per_step, global_batch
    _fill(out, "gradient_accumulation_steps", 1, False)
    if out.get("train_batch_size") == "auto":
        del out["train_batch_size"]
    if args.bf16:
        out["bf16"] = {**out.get("bf16", {}), "enabled": True}
    if bf16_enabled(out) and fp16_enabled(out):
        raise UsageError("--deepspeed_config: the JSON enables both bf16 and fp16; enable one (bf16 where the GPU has it, else fp16)")
    opt = out.get("optimizer", {}).get("params")
    if opt is not None:
        _fill(opt, "lr", args.learning_rate, True)
        _fill(opt, "lr", DEFAULT_LR, False)
    sched = out.get("scheduler", {}).get("params")
    if sched is not None:
        peak = opt["lr"] if opt is not None else (args.learning_rate or DEFAULT_LR)
        for key in ("warmup_max_lr", "cos_max_lr"):
            if key in sched:
                _fill(sched, key, args.learning_rate, True)
                _fill(sched, key, peak, False)
        warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.max_steps // 10)
        _fill(sched, "warmup_num_steps", args.warmup_steps, True)
        _fill(sched, "warmup_num_steps", warmup, False)
        if "total_num_steps" in sched:
            _fill(sched, "total_num_steps", args.max_steps, True)
    autos = _find_auto(out)
    if autos:
        raise UsageError(f"--deepspeed_config: no flag fills {', '.join(autos)} (value 'auto'); put a number in the JSON")
    return out


class _ReadKeys(dict):
    """A dict that records which of its keys are looked up (``get``, ``[]``, ``in``)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def validate_ds_config(cfg: dict, path: str, world_size: int, device: str, *, fp16_flag: bool = False) -> None:
    """Check a resolved DeepSpeed config before any process starts, with DeepSpeed's own parser
    (``deepspeed.runtime.config.DeepSpeedConfig``: its pydantic section models forbid unknown keys, e.g.
    a misspelt ``zero_optimization.overlap_com``), plus what that parser lets through: a top-level key it
    never reads (recorded while it parses), fp16 on the CPU accelerator (which trains in fp32 or bf16),
    and a ``train_batch_size`` other than micro-batch x gradient accumulation x ranks.

    Args:
        cfg: from :func:`resolve_ds_config`. path: ``--deepspeed_config`` (for the message).
        world_size: the data-parallel ranks of the run. device: the accelerator's name (``cpu``, ``cuda``).
        fp16_flag: ``--fp16`` was given (the CPU refusal then names the flag rather than the JSON).

    Raises:
        UsageError: the first problem, naming the key and the fix.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    micro, accum = cfg["train_micro_batch_size_per_gpu"], cfg.get("gradient_accumulation_steps", 1)
    if "train_batch_size" in cfg and cfg["train_batch_size"] != micro * accum * world_size:
        raise UsageError(f"--deepspeed_config: train_batch_size {cfg['train_batch_size']} in {path} is not micro-batch {micro} x gradient "
                         f"accumulation {accum} x {world_size} rank(s) = {micro * accum * world_size}; set it to that, or to \"auto\"")
    if device == "cpu" and fp16_flag:
        raise UsageError("--fp16: the CPU accelerator trains in fp32 or bf16 only (fp16 with loss scaling is for GPUs); drop --fp16 (--bf16 for bf16)")
    if device == "cpu" and cfg.get("fp16", {}).get("enabled") not in (None, False):
        raise UsageError(f"--deepspeed_config: fp16 is enabled in {path}, and the CPU accelerator trains in fp32 or bf16 only (fp16, as --fp16, "
                         "is for GPUs); set fp16.enabled false (--bf16 for bf16)")
    checked = _ReadKeys({k: v for k, v in copy.deepcopy(cfg).items() if k != "train_batch_size"})  # the batch is checked above, over the real ranks
    try:
        DeepSpeedConfig(checked)
    except Exception as exc:  # pydantic's ValidationError, DeepSpeed's assertions and ValueErrors
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = "; ".join(lines[:3]) or type(exc).__name__
        raise UsageError(f"--deepspeed_config: DeepSpeed refuses {path}: {detail}") from None
    unknown = sorted(set(checked) - checked.read)
    if unknown:
        raise UsageError(f"--deepspeed_config: {path} has top-level key(s) {unknown} that DeepSpeed does not read; fix the spelling or remove them")


def _find_auto(node, prefix="") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _find_auto(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def zero_stage(cfg: dict) -> int:
    """ZeRO stage of a config (0 when the section is absent)."""
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def _enabled(cfg: dict, name: str) -> bool:
    return bool(cfg.get(name, {}).get("enabled", False))


def bf16_enabled(cfg: dict) -> bool:
    """Whether the config trains in bf16."""
    return _enabled(cfg, "bf16")


def fp16_enabled(cfg: dict) -> bool:
    """Whether the config trains in fp16 (with DeepSpeed's loss scaling)."""
    return _enabled(cfg, "fp16")


TEACHER_LIVE_PARAMETERS = 10**8  # default cap on the teacher's gathered parameters (2 x DeepSpeed's default prefetch bucket)


def teacher_ds_config(student_cfg: dict, offload: str | None = None) -> dict:
    """Config of the frozen, optimizer-less teacher engine.

    ZeRO-3 with the student's stage-3 settings when the student runs stage 3 (the teacher is sharded over
    the same ranks; gathered parameters are released after use: ``stage3_max_reuse_distance`` 0 and
    ``stage3_max_live_parameters`` at most two prefetch buckets), stage 0 otherwise; same precision and micro-batch (fp16 without
    loss-scaling keys: no optimizer, so nothing is scaled); no optimizer, scheduler or
    gradient settings. As trl ``prepare_deepspeed`` and DeepSpeed-Chat ``_init_ref``.

    Args:
        student_cfg: the student's resolved JSON.
        offload: ``--teacher_offload``: ``"cpu"`` makes the teacher ZeRO-3 with ``offload_param`` to CPU
            memory whatever the student's stage (DeepSpeed's ZeRO-Infinity parameter offload: each rank
            keeps its shard in host memory and fetches layers for the forward); ``"none"`` drops any
            offload; None keeps the student JSON's ``offload_param`` when the student runs stage 3.
    """
    zero = student_cfg.get("zero_optimization", {})
    cfg = {
        "train_micro_batch_size_per_gpu": student_cfg["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": student_cfg.get("gradient_accumulation_steps", 1),
        "bf16": {"enabled": bf16_enabled(student_cfg)},
        "fp16": {"enabled": fp16_enabled(student_cfg)},
        "steps_per_print": student_cfg.get("steps_per_print", 10**9),
    }
    if zero_stage(student_cfg) == 3 or offload == "cpu":
        keep = {k: v for k, v in zero.items() if k.startswith("stage3_") and "gather_16bit" not in k}
        # Forward only: a gathered block is not needed again before the next step, so release it at once
        # (reuse distance 0) and keep at most two prefetch buckets live; with DeepSpeed's defaults (1e9
        # each) a teacher under a billion parameters stayed whole on every rank after its first forward.
        bucket = int(keep.get("stage3_prefetch_bucket_size", TEACHER_LIVE_PARAMETERS // 2))
        keep["stage3_max_reuse_distance"] = 0
        keep["stage3_max_live_parameters"] = min(int(keep.get("stage3_max_live_parameters", 10**9)), 2 * bucket)
        cfg["zero_optimization"] = {"stage": 3, **keep}
        if offload == "cpu":
            cfg["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": False}
        elif offload is None and "offload_param" in zero:
            cfg["zero_optimization"]["offload_param"] = zero["offload_param"]
    else:
        cfg["zero_optimization"] = {"stage": 0}
    return cfg
