"""The run around the engine, task-free: ``setup`` (process group, data, engines, resume or initial
evaluation, output folder), ``train`` (the step loop: TensorBoard, tqdm, checkpoints), ``evaluate``
(final held-out metrics) and ``save`` (export with a model card, metrics.json). Every launcher is these
four calls on a checked :class:`~fcd_ds.plan.RunPlan` (torchtune's recipe shape: setup / train / save).

Progress and state live in one :class:`TrainState`, saved as the DeepSpeed checkpoint's ``client_state``
so that ``--resume`` continues with the losses an uninterrupted run would have given.

Stops: a stop signal (SIGTERM, SIGUSR1, SIGINT) on any rank is agreed at every step boundary and after every
evaluation batch (:mod:`fcd_ds.runtime.preemption`); the run saves a checkpoint of the last finished step and
raises :class:`~fcd_ds.runtime.preemption.Preempted`. A non-finite training loss raises :class:`NonFiniteLoss`
without saving. A launcher catches :data:`STOPS` and returns :func:`finish`'s exit status.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path

import datasets
import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import set_seed

from .build import build_student_engine, build_teacher_engine, current_loss_scale, gather_param_shares, model_dtype, uses_activation_checkpointing
from .data import eval_batches, make_micro_batches
from .engine import DistillEngine
from .errors import UsageError
from .layer_map import layer_map_to_str
from .model_card import model_card
from .output_dir import check_free_space, claim, clear_run_files, OutputLock, run_entries
from .plan import student_num_params
from .runtime.checkpoint import (
    check_output_dir,
    check_resume_layout,
    convert_to_universal,
    export_student,
    latest_tag,
    load_checkpoint,
    load_rank_state,
    reshard_position,
    save_checkpoint,
)
from .runtime.distributed import all_reduce_host, is_main_process, main_process_first, release_deepspeed_shm_buffer
from .runtime.host_memory import apply_host_memory_reuse
from .runtime.metrics import measure_matmul_tflops, MetricLogger, transformer_flops_per_token
from .runtime.preemption import NONFINITE_EXIT_CODE, REQUEUE_EXIT_CODE, Preempted, StopFlag

__all__ = ["TrainState", "Job", "NonFiniteLoss", "OutputWriteError", "STOPS", "setup", "train", "evaluate", "save", "usage_error", "finish", "exit_now"]


class NonFiniteLoss(Exception):
    """A training loss term was NaN or Inf on some rank at ``step``; ``latest`` names the last good checkpoint."""
    def __init__(self, step: int, terms: list[str], latest: str | None):
        kept = f"the last good checkpoint {latest} is kept as latest" if latest else "no checkpoint was saved before it"
        super().__init__(f"step {step}: non-finite training loss in {', '.join(terms)}; stopped without saving ({kept}); "
                         "lower --learning_rate, check the data, or resume from the checkpoint with other settings")


class OutputWriteError(Exception):
    """Writing to the output folder failed mid-run (disk full, folder made read-only, quota): one line
    naming the file, the system's reason and what ``latest`` still names; the exit status is 1."""

    def __init__(self, what: str, exc: Exception, latest: str | None, output_dir: Path):
        kept = f"latest still names the complete {latest}" if latest else "no complete checkpoint was saved before it"
        if isinstance(exc, OSError):
            why = f"{exc.strerror or exc}: {exc.filename or '?'}"
        else:  # torch.save's zip writer reports a short write as RuntimeError("... unexpected pos ...")
            free = shutil.disk_usage(output_dir).free
            why = f"torch.save: {str(exc).splitlines()[0]}; {free / 2**20:.1f} MiB left on the file system"
        super().__init__(f"--output_dir: writing {what} failed ({why}); {kept}; free space or make the folder writable, then --resume")


def _is_write_failure(exc: Exception) -> bool:
    """An OSError, or the RuntimeError torch.save's zip writer (caffe2 inline_container.cc) raises when a write comes up short."""
    return isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and any(
        s in str(exc) for s in ("inline_container", "PytorchStreamWriter", "file write failed")))


@contextmanager
def _writing(what: str, partial: Path, output_dir: Path):
    """Turn a write failure inside the block into :class:`OutputWriteError` (other errors pass through),
    after removing ``partial``, the half-written folder (frees the space; ``latest`` is untouched)."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if not _is_write_failure(exc):
            raise

        shutil.rmtree(partial, ignore_errors=True)
        raise OutputWriteError(what, exc, latest_tag(output_dir), output_dir) from None


STOPS = (UsageError, Preempted, NonFiniteLoss, OutputWriteError)  # what a launcher catches and hands to finish()


@dataclass
class TrainState:
    """Everything a resumed run needs besides the DeepSpeed checkpoint (model, optimizer, scheduler) and
    the per-rank RNG states. ``data_layout`` is the micro-batch size, world size, sequence length and
    seed that ``data_position`` counts in."""

    step: int = 0
    data_position: int = 0
    train_seconds: float = 0.0
    train_tokens: float = 0.0
    train_loss_tokens: float = 0.0  # targets the task loss read (assistant tokens with --assistant_only_loss)
    train_padded_tokens: float = 0.0  # B x N of every micro-batch as run, all ranks (the FLOP count's tokens)
    data_layout: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    log_rows: int = 0  # train_log.jsonl rows written up to this state (rank 0): a resume drops later ones


@dataclass
class Job:
    """A running job: the plan, the distributed engines, the data streams and the state."""
    plan: object
    rank: int
    world: int
    out: Path
    distiller: object  # fcd_ds.engine.DistillEngine
    micro_batches: object  # fcd_ds.data.MicroBatches, or StreamingMicroBatches with --streaming
    eval_set: list
    state: TrainState
    flops_per_token: float
    teacher_shares: list | None
    logger: object  # fcd_ds.runtime.metrics.MetricLogger: --report_to sinks + train_log.jsonl (rank 0), closed by save()
    stop: StopFlag  # SIGTERM/SIGUSR1 handlers, agreed at step boundaries
    saved_step: int = 0  # step of the newest checkpoint this process saved or loaded
    threads: int = 0  # torch's intra-op threads on this rank
    matmul_tflops: float = 0.0  # this rank's measured dense matmul rate in the run's dtype, all ranks measuring at once


REPORT_GRACE_S = 5.0  # how long a non-main rank waits before a failing exit (see _let_rank0_report)


def _let_rank0_report() -> None:
    """On ranks other than 0, wait :data:`REPORT_GRACE_S` before a failing exit: DeepSpeed's launcher
    terminates every rank as soon as one exits non-zero (deepspeed/launcher/launch.py), which could kill
    rank 0 before it printed the one-line reason."""
    if not is_main_process():
        time.sleep(REPORT_GRACE_S)


def _report_usage(exc: UsageError) -> int:
    """Print ``error: <message>`` (rank 0 only); the exit status 2, as argparse."""
    if is_main_process():
        print(f"error: {exc}", file=sys.stderr, flush=True)
    return 2


def usage_error(exc: UsageError) -> int:
    """Print ``error: <message>`` (rank 0 only) and return exit status 2, as argparse; other ranks
    first give rank 0 the time to print (:func:`_let_rank0_report`)."""
    code = _report_usage(exc)
    _let_rank0_report()
    return code


def _prefixed(prefix: str, metrics: dict, suffix: str = "") -> dict:
    return {f"{prefix}_eval_{k}{suffix}": v for k, v in metrics.items()}


def setup(plan) -> Job:
    """Set host memory reuse (``--host_memory_reuse``, :mod:`fcd_ds.runtime.host_memory`), start the process group,
    tokenise the data (rank 0 first), build the engines, then resume from the latest checkpoint or measure
    the starting point, and only then write to the output folder.
    SIGTERM, SIGUSR1 and SIGINT are caught from here on, and a launcher that exits makes the ranks stop
    too (:class:`~fcd_ds.runtime.preemption.StopFlag`).

    Raises:
        UsageError: a problem found after the process group started (too little data for the batch,
            a checkpoint written with another data layout, world size or schedule); the caller reports it
            with :func:`finish`.
        Preempted: a stop signal arrived during the start-up or the initial evaluation (nothing saved).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    stop = StopFlag().install().watch_launcher()  # a launcher that exits unsignalled (SIGINT to `deepspeed` alone) stops the ranks too
    host_memory = apply_host_memory_reuse(plan.train_args.host_memory_reuse, get_accelerator().device_name())  # before any data or engine
    deepspeed.init_distributed(timeout=timedelta(seconds=plan.train_args.ddp_timeout))  # HF's --ddp_timeout
    release_deepspeed_shm_buffer()  # DeepSpeed never frees it: see the function's docstring
    rank, world = dist.get_rank(), dist.get_world_size()
    _lock_output_dir(plan)  # every rank has planned by now: a second run on this folder is refused here
    if rank != 0:

        datasets.disable_progress_bars()  # rank 0 shows the tokenising and packing progress
    d, t, task = plan.data_args, plan.train_args, plan.task
    set_seed(t.seed)
    out = Path(t.output_dir)

    # Data: rank 0 (local rank 0 of each node with --preprocess_on_each_node) tokenises or prepares first,
    # the others reuse its datasets cache or prepared folder; the barrier waits up to --ddp_timeout.
    data_start = time.perf_counter()
    with main_process_first(local=d.preprocess_on_each_node):
        train_set, valid_set = task.load_datasets(plan.tokenizer, d, rank=rank, world=world, seed=t.seed)
    micro_bs = plan.ds_config["train_micro_batch_size_per_gpu"]
    eval_set = eval_batches(valid_set, t.per_device_eval_batch_size, rank, world, d.max_eval_samples,
                            collate=partial(task.collate, train=False))
    micro_batches = make_micro_batches(train_set, micro_bs, rank, world, t.seed, partial(task.collate, train=True),
                                       t.dataloader_num_workers, t.dataloader_prefetch_factor,
                                       accumulation=plan.ds_config.get("gradient_accumulation_steps", 1))
    if rank == 0:
        blocks = f"{len(train_set):,} train blocks" if hasattr(train_set, "__len__") else "train blocks streamed"
        print(f"[fcd_ds] data ready in {time.perf_counter() - data_start:.2f} s: {blocks}, {len(eval_set)} held-out batches per rank", flush=True)
    stop.check("startup")

    # Engines: the student trains under the JSON; the teacher is frozen, ZeRO-3 sharded iff the student is
    # (or --teacher_offload cpu).
    projection_width = plan.teacher_config.hidden_size if plan.distill_args.hidden_mse_weight else None
    student = build_student_engine(plan.model_args, plan.teacher, plan.teacher_config, plan.ds_config, task, projection_width)
    teacher = build_teacher_engine(plan.teacher, plan.ds_config, task, t.teacher_offload, plan.model_args) if plan.teacher is not None else None
    distiller = DistillEngine(student, teacher, plan.pairs, plan.distill_args, task, plan.attention_pairs)
    teacher_shares = gather_param_shares(teacher.module) if teacher is not None else None
    stop.check("startup")

    # Resume (same data layout and schedule only), or measure the starting point.
    layout = plan.layout(world)
    if t.resume:
        if latest_tag(out) is None:  # seen by rank 0 at planning time, gone since, or not on this node
            raise UsageError(f"--resume: no checkpoint in {out / 'checkpoints'} on rank {rank}; drop --resume to start a new run")
        if plan.resume_universal:  # another number of ranks: the ZeRO states re-partitioned from the universal form
            if rank == 0:
                print(f"[fcd_ds] converting checkpoint {latest_tag(out)} to a universal checkpoint for {world} ranks ...", flush=True)
                convert_to_universal(out, latest_tag(out))
            dist.barrier()
        saved = load_checkpoint(student, out, keys=tuple(TrainState.__dataclass_fields__), optional=("train_loss_tokens", "train_padded_tokens"),
                                universal=plan.resume_universal)
        state = TrainState(**saved)
        if check_resume_layout(state.data_layout, layout):  # the same global samples, counted in this layout's micro-batches
            position = reshard_position(state.data_layout, layout, state.data_position)
            if rank == 0:
                was = state.data_layout
                print(f"[fcd_ds] resuming step {state.step} of a run on {was['world_size']} ranks (micro-batch {was['micro_batch_size']}, "
                      f"accumulation {was.get('gradient_accumulation_steps', 1)}) on {world} ranks (micro-batch {layout['micro_batch_size']}, "
                      f"accumulation {layout['gradient_accumulation_steps']}): global batch {layout['train_batch_size']} kept", flush=True)
            state.data_layout, state.data_position = layout, position
            micro_batches.position = position
        else:
            micro_batches.load_state_dict(load_rank_state(out, rank) or {"position": state.data_position})
    else:
        state = TrainState(data_layout=layout)
        if t.eval_on_start:
            check = partial(stop.check, "the initial evaluation")
            if teacher is not None:
                state.metrics.update(_prefixed("teacher", distiller.evaluate("teacher", eval_set, check)))
            state.metrics.update(_prefixed("student", distiller.evaluate("student", eval_set, check), "_initial"))

    # Output directory: only now, with every input and the checkpoint checked, is anything written; what
    # --overwrite_output_dir removes is what the manifest records, and the run records its own names first.
    if rank == 0:
        global _WROTE
        _WROTE = True
        if t.overwrite_output_dir:
            clear_run_files(out)
        claim(out, run_entries(plan.launcher.export_name))
        for partial_save in (out / "checkpoints").glob("global_step*.tmp"):  # a save that died half-way
            shutil.rmtree(partial_save, ignore_errors=True)
        (out / "run_config.json").write_text(json.dumps(plan.run_config(world), indent=2))
    dist.barrier()

    seq = d.max_seq_length
    flops = transformer_flops_per_token(plan.student_config, seq, head=task.vocab_head and distiller.student_logits, backward=True) * (
        4 / 3 if uses_activation_checkpointing(plan.model_args, plan.ds_config) else 1)
    if distiller.needs_teacher:
        flops += transformer_flops_per_token(plan.teacher_config, seq, head=task.vocab_head and plan.distill_args.uses_teacher_logits)
    logger = MetricLogger(out / "runs", out / "train_log.jsonl", resume_rows=state.log_rows if t.resume else None,
                          resume_step=state.step if t.resume else None, report_to=t.report_to, wandb_dir=out,
                          run_config=plan.run_config(world) if "wandb" in t.report_to else None)
    threads, matmul = _measure_compute(plan.ds_config)
    if rank == 0:
        print(f"fcd_ds: {world} rank(s) x {threads} torch thread(s) (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); "
              f"measured matmul {matmul * 1e3:.1f} GFLOP/s per rank with every rank measuring at once; "
              f"{flops / 1e9:.2f} GFLOP per token of a step; host memory reuse {host_memory}", flush=True)
    return Job(plan, rank, world, out, distiller, micro_batches, eval_set, state, flops, teacher_shares, logger, stop,
               saved_step=state.step if t.resume else 0, threads=threads, matmul_tflops=matmul)


_LOCK = None  # this process's OutputLock (rank 0), held until the process exits
_WROTE = False  # whether this process has begun writing the output folder (after that the lock file stays)


def _lock_output_dir(plan) -> None:
    """Global rank 0 takes the output folder's run lock, checks the folder again under it (another run may
    have started since planning) and that its file system has room for a checkpoint and the export; every
    rank raises the same :class:`UsageError` when it fails. Collective.

    Raises:
        UsageError: another run holds the folder, it cannot be written, it changed since planning, or its
            file system lacks the room (:func:`~fcd_ds.output_dir.check_free_space`).
    """
    global _LOCK
    t = plan.train_args
    message = [None]
    if dist.get_rank() == 0:
        try:
            _LOCK = OutputLock(t.output_dir).acquire()
            check_output_dir(t.output_dir, resume=t.resume, overwrite=t.overwrite_output_dir, export_name=plan.launcher.export_name,
                             holding_lock=True)
            params = student_num_params(plan.task, plan.student_config)
            check_free_space(t.output_dir, params * CHECKPOINT_BYTES_PER_PARAM,
                             f"a checkpoint and the export of the {params / 1e6:.1f}M-parameter student ({CHECKPOINT_BYTES_PER_PARAM} bytes each)")
        except UsageError as exc:
            message[0] = str(exc)
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise UsageError(message[0])


# A checkpoint of an fp32 Adam run holds 16 bytes per student parameter (weights 4, fp32 master copy or
# the module's own 4, exp_avg 4, exp_avg_sq 4); the exported student adds 4 (fp32 safetensors).
CHECKPOINT_BYTES_PER_PARAM = 20


def _measure_compute(ds_config: dict) -> tuple[int, float]:
    """This rank's torch thread count and its dense matmul rate (TFLOP/s) in the run's dtype, measured
    by every rank at the same moment (so on a shared CPU each rank gets its share of the cores, as during
    training). The rank-0 mean is what achieved FLOP/s is divided by. Collective."""
    dtype = model_dtype(ds_config)  # bf16, fp16 or float32, as the models train
    dist.barrier()
    mine = torch.tensor([measure_matmul_tflops(n=2048 if dtype == torch.float32 else 4096, repeats=5, dtype=dtype)],
                        dtype=torch.float64)
    mine = all_reduce_host(mine)  # mean over ranks: one figure for every rank's fraction
    return torch.get_num_threads(), mine.item() / dist.get_world_size()


def _summed_over_ranks(*values: float) -> list[float]:
    """Sum of each value over the ranks (one small all-reduce; the values themselves without a process group)."""
    return all_reduce_host(torch.tensor(values, dtype=torch.float64)).tolist()


def _tflops_per_device(job: Job, tokens: float, seconds: float) -> float:
    return job.flops_per_token * tokens / job.world / max(seconds, 1e-9) / 1e12


def _save(job: Job) -> None:

    state = job.state
    state.data_position = job.micro_batches.position
    state.log_rows = job.logger.rows
    with _writing(f"checkpoint global_step{state.step}", job.out / "checkpoints" / f"global_step{state.step}.tmp", job.out):
        save_checkpoint(job.distiller.student, job.out, state.step, asdict(state), job.plan.train_args.save_total_limit,
                        rank_state=job.micro_batches.state_dict())
    job.saved_step = state.step


def train(job: Job) -> None:
    """Run optimizer steps up to ``--max_steps``: log every term, throughput and memory to TensorBoard
    and train_log.jsonl (rank 0), show a tqdm bar, evaluate every ``--eval_steps`` (not counted in the
    training seconds), save checkpoints every ``--save_steps`` and at the end. At every step boundary the
    ranks agree on stop signals and on non-finite loss terms (one all-reduce).

    Raises:
        Preempted: a stop signal on some rank; a checkpoint of the last finished step was saved first.
        NonFiniteLoss: a loss term was NaN or Inf on some rank; nothing saved (``latest`` is the last good one).
    """
    from deepspeed.accelerator import get_accelerator

    t, state, student, logger = job.plan.train_args, job.state, job.distiller.student, job.logger
    bar = tqdm(total=t.max_steps, initial=state.step, desc=job.plan.launcher.name, disable=job.rank != 0, dynamic_ncols=True)
    try:
        while state.step < t.max_steps:
            start = time.perf_counter()
            job.distiller.objective.progress = state.step / t.max_steps  # --fcd_weight_schedule
            m = job.distiller.train_step(job.micro_batches, bool(t.grad_norm_steps) and (state.step + 1) % t.grad_norm_steps == 0)
            seconds = time.perf_counter() - start
            state.step += 1
            loss_terms = sorted(k for k in m if k.startswith("loss/"))
            signum, bad = job.stop.agree([not math.isfinite(m[k]) for k in loss_terms])
            # One all-reduce: tokens summed (padding differs between ranks), every loss term averaged over the
            # ranks: the step's loss is that of the global batch, whatever its split over ranks and micro-batches.
            terms = [k for k in m if not k.startswith("time/") and k not in ("tokens", "loss_tokens", "padded_tokens")]
            tokens, loss_tokens, padded, *sums = _summed_over_ranks(m.pop("tokens"), m.pop("loss_tokens"), m.pop("padded_tokens"),
                                                                    *(m[k] for k in terms))
            m.update({k: v / job.world for k, v in zip(terms, sums)})
            state.train_seconds += seconds
            state.train_tokens += tokens
            state.train_loss_tokens += loss_tokens
            state.train_padded_tokens += padded
            payload = {k if k.startswith("time/") else f"train/{k}": v for k, v in m.items()}  # loss terms, per-pair terms
            samples = job.plan.ds_config["train_micro_batch_size_per_gpu"] * student.gradient_accumulation_steps() * job.world
            payload.update({
                "train/lr": student.get_lr()[0],
                "perf/tokens_per_second": tokens / seconds,
                "perf/tokens_per_second_per_device": tokens / seconds / job.world,
                "perf/samples_per_second": samples / seconds,
                "perf/step_seconds": seconds,
                "train_tokens": state.train_tokens,  # so far, every rank: tokens the models read
                "train_loss_tokens": state.train_loss_tokens,  # so far: targets the task loss read
                "perf/tflops_per_device": _tflops_per_device(job, padded, seconds),  # the tokens as run (variable-length batches)
                "memory/max_allocated_gib": get_accelerator().max_memory_allocated() / 2**30,
            })
            payload["perf/matmul_peak_fraction"] = payload["perf/tflops_per_device"] / job.matmul_tflops
            if (scale := current_loss_scale(student)) is not None:  # fp16: DeepSpeed's dynamic loss scale, overflow-skipped steps so far
                payload.update({"train/loss_scale": scale, "train/skipped_steps": student.skipped_steps})
            if t.peak_tflops:
                payload["perf/mfu"] = payload["perf/tflops_per_device"] / t.peak_tflops
            if state.step % t.logging_steps == 0 or state.step == t.max_steps or any(bad):
                logger.log_dict(state.step, payload)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss/total']:.3f}", tok_s=f"{tokens / seconds:.0f}")
            if any(bad):  # the optimizer step already used these gradients: never save this state
                raise NonFiniteLoss(state.step, [k for k, b in zip(loss_terms, bad) if b], latest_tag(job.out))
            if t.eval_steps and state.step % t.eval_steps == 0 and state.step < t.max_steps:
                scores = _prefixed("student", job.distiller.evaluate("student", job.eval_set, partial(job.stop.check, "evaluation")))
                logger.log_dict(state.step, {**{f"eval/{k}": v for k, v in scores.items()}, "eval/train_seconds": state.train_seconds})
            if state.step == t.max_steps or (t.save_steps and state.step % t.save_steps == 0):
                _save(job)
            if signum:
                raise Preempted("training", signum)
    except Preempted:
        if state.step > job.saved_step:
            _save(job)
        raise
    finally:
        bar.close()
        job.micro_batches.close()  # DataLoader workers are not needed after training


def evaluate(job: Job) -> dict:
    """Final held-out metrics of the student; returns the run's metrics (``teacher_eval_<m>``,
    ``student_eval_<m>_initial``, ``student_eval_<m>``). Collective.

    Raises:
        Preempted: a stop signal on some rank (the final checkpoint is already saved).
    """
    job.state.metrics.update(_prefixed("student", job.distiller.evaluate("student", job.eval_set, partial(job.stop.check, "the final evaluation"))))
    return job.state.metrics


def _peak_memory_per_rank() -> dict:
    """Every rank's peak resident host memory (``ru_maxrss``, GiB) and, on GPUs, peak allocated device
    memory (``max_memory_allocated``, GiB). Collective."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    mine = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
            acc.max_memory_allocated() / 2**30 if acc.device_name() != "cpu" else None]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    out = {"peak_host_memory_gib_per_rank": [m[0] for m in every]}
    if mine[1] is not None:
        out["peak_device_memory_gib_per_rank"] = [m[1] for m in every]
    return out


def save(job: Job, metrics: dict) -> dict:
    """Export the trained model (``student/`` or ``model/``, with its model card) and write metrics.json
    (rank 0) and the final eval scalars to TensorBoard. Collective. Returns the full metrics.

    Raises:
        Preempted: a stop signal on some rank before the export began (the final checkpoint is saved;
            a resumed run evaluates and exports again).
    """
    plan, state = job.plan, job.state
    student = job.distiller.student
    seq = plan.data_args.max_seq_length
    # B x N as run (classification pads to the batch's longest row); a checkpoint from before the count: as if padded to seq
    padded_tokens = state.train_padded_tokens or state.step * plan.ds_config["train_micro_batch_size_per_gpu"] * student.gradient_accumulation_steps() * job.world * seq
    tflops = _tflops_per_device(job, padded_tokens, state.train_seconds)
    metrics = {**metrics,
               "steps": state.step,
               "train_tokens": state.train_tokens,
               "train_loss_tokens": state.train_loss_tokens,
               "train_seconds": state.train_seconds,
               "train_tokens_per_second": state.train_tokens / max(state.train_seconds, 1e-9),
               "train_tflops_per_device": tflops,
               "threads_per_rank": job.threads,
               "measured_matmul_tflops_per_device": job.matmul_tflops,
               "train_matmul_peak_fraction": tflops / job.matmul_tflops,
               "world_size": job.world,
               "zero_stage": plan.ds_config.get("zero_optimization", {}).get("stage", 0),
               "teacher_param_shard_numel_per_rank": job.teacher_shares,
               **_peak_memory_per_rank(),
               "student_num_params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in student.module.parameters()),
               "layer_map": layer_map_to_str(plan.pairs) if plan.pairs else None}
    if student.fp16_enabled():  # optimizer steps DeepSpeed skipped on an fp16 overflow (the loss scale halved instead)
        metrics["skipped_steps"] = student.skipped_steps
    job.stop.check("export")
    name = plan.launcher.export_name
    with _writing(f"the {name} export or metrics.json", job.out / f"{name}.tmp", job.out):
        export_student(student, plan.tokenizer, job.out / plan.launcher.export_name, model_card(plan, metrics, job.world))
        job.logger.log_dict(state.step, {**{f"eval/{k}": v for k, v in metrics.items() if "_eval_" in k and isinstance(v, float)},
                                         "eval/train_seconds": state.train_seconds})
        job.logger.close()
        if job.rank == 0:
            (job.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if job.rank == 0:
        print(json.dumps({k: v for k, v in metrics.items() if "_eval_" in k or k in ("train_tokens_per_second", "train_matmul_peak_fraction", "threads_per_rank", "steps")}))
    return metrics


def finish(code: int = 0, exc: Exception | None = None) -> int:
    """Report ``exc`` (if any) as one line on rank 0, destroy the process group, return the exit status:
    2 for a :class:`~fcd_ds.errors.UsageError` (as argparse), :data:`~fcd_ds.runtime.preemption.REQUEUE_EXIT_CODE`
    (75) for :class:`~fcd_ds.runtime.preemption.Preempted` by SIGTERM or SIGUSR1 (a checkpoint is saved: requeue
    the job), :data:`~fcd_ds.runtime.preemption.INTERRUPT_EXIT_CODE` (130) for one by SIGINT,
    :data:`~fcd_ds.runtime.preemption.NONFINITE_EXIT_CODE` (3) for :class:`NonFiniteLoss`, 1 for
    :class:`OutputWriteError` (printed by every rank that met it)."""
    if isinstance(exc, UsageError):
        code = _report_usage(exc)
        if _LOCK is not None and not _WROTE:
            _LOCK.discard()  # bad input found after the lock was taken, before anything was written
    elif isinstance(exc, Preempted):
        code = exc.exit_code
        if is_main_process():
            then = "requeue, then --resume or --auto_resume continues" if code == REQUEUE_EXIT_CODE else "--resume or --auto_resume continues"
            print(f"{'preempted' if code == REQUEUE_EXIT_CODE else 'interrupted'}: {exc}; checkpoint saved, exit status {code} ({then})",
                  file=sys.stderr, flush=True)
    elif isinstance(exc, OutputWriteError):
        code = 1
        print(f"error: {exc}", file=sys.stderr, flush=True)  # on every rank that met it: the ranks may not write the same files
    elif isinstance(exc, NonFiniteLoss):
        code = NONFINITE_EXIT_CODE
        if is_main_process():
            print(f"error: {exc}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        if exc is None or isinstance(exc, UsageError):
            dist.barrier()
        dist.destroy_process_group()
    if code != 0:
        _let_rank0_report()
    return code


def exit_now(code: int) -> None:
    """Flush and leave with ``code`` without the interpreter's teardown (``os._exit``), once everything is
    written and the process group destroyed. Seen here (gloo on CPU, torch 2.13): a rank occasionally
    aborted during that teardown with "terminate called without an active exception" after a complete
    run, turning success into exit 250."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
