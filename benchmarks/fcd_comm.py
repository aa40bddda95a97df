"""FCD's collectives beside ZeRO's: bytes and seconds per step, measured on CPU ranks (gloo), modelled at 16 ranks.

    flock /tmp/bench.lock env PYTHONPATH=/work/main deepspeed --num_gpus 4 benchmarks/fcd_comm.py          # prints, appends to RESULTS.md
    flock /tmp/bench.lock env PYTHONPATH=/work/main deepspeed --num_gpus 2 benchmarks/fcd_comm.py --no_write
    ... benchmarks/fcd_comm.py --no_write -- --deepspeed_config ds_configs/zero3.json   # flags after -- go to the launcher

Every rank builds the launcher's engines in-process (``plan_run`` + ``trainer.setup`` on launchers/distill_gpt.py's
flags, as step_cost.py): a random-init Llama teacher (8 blocks x 384, SmolLM2's tokenizer, saved once under
/tmp by local rank 0) and a fresh student half as wide (4 x 192: the 4096 / 2048 ratio of the modelled
pair), BBC News from ``python -m fcd_ds.assets``, 4 x 128 tokens per rank, ZeRO-2 unless flags say
otherwise, CE + FCD over the ``uniform`` map. Three engines share the models: FCD's global batch on and off
(``--fcd_global_batch``), and on with the sequence relation read at N / 16 positions (``--fcd_sequence_positions``,
the fraction the 16-rank model's 128 of 2048 reads). After --warmup steps of each, --steps rounds of one step of each, interleaved.

How collectives are measured: before DeepSpeed starts its communication backend (which keeps references to
``torch.distributed.all_gather_into_tensor`` and ``reduce_scatter_tensor``), every collective of
``torch.distributed`` (and its ``distributed_c10d`` module) is wrapped: a call during the measured steps
records its op, payload bytes and wall seconds (synchronous on gloo; an ``async_op`` call would count only
until it returns: none of these configs issues one, ``overlap_comm`` is off) and is tagged by the first
frame outside torch.distributed, deepspeed.comm and this file: ``FCD`` for fcd_ds/losses and the gather
functions of fcd_ds/runtime/distributed.py, ``ZeRO`` for any other frame in deepspeed, ``other`` for the rest
(fcd_ds's metrics). Payload bytes are turned into bytes each rank sends under ring algorithms, the
model's unit: all_gather (world - 1) x input, reduce_scatter (world - 1) / world x input, all_reduce
2 (world - 1) / world x tensor, all_to_all (world - 1) / world x input, broadcast and reduce 1 x tensor.
gloo's own algorithms differ; the ring bytes are what NCCL's rings send, so they are what the model scales.
Numbers are rank 0's, per step. torch.profiler was not used: on CPU it records gloo collectives without
their sizes.

The model (:func:`fcd_model`, :func:`zero_model`) computes the same ring bytes from the shapes: FCD per layer
pair (the position sequence relation with the global batch; the token term adds two float32 sums), ZeRO
from the parameter counts; it is printed at the measured shapes beside the measurement, and at 16 ranks
(2 nodes x 8) x micro-batch 4 x N 2048, student width 2048 (a Llama-3.2-1B shape: 16 blocks, 1.24B
parameters) and teacher width 4096 (Llama-3-8B: 32 blocks, 8.03B), bf16, 16 layer pairs (``uniform``: one
per student block), ZeRO-3 for both, seconds from bytes at the link bandwidths assumed (:data:`LINKS`;
no latency term). Both FCD schemes are modelled: ``gather`` (features all-gathered, the student's with a
gradient all-reduced in backward: the code before issue 21) and ``gram`` (features moved once by
all_to_all, per-position Gram matrices all-reduced: ``fcd_ds.runtime.distributed.global_sample_gram``); the
measured section says which the running code has. Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from results import command_line, machine, matmul_rate, publish, utc_stamp  # benchmarks/results.py

__all__ = ["LINKS", "SCALE", "fcd_model", "zero_model", "ring_bytes"]

LINKS = {"NVLink (within a node)": 450e9, "network (between nodes)": 50e9}  # bytes/s per GPU and direction: H100 NVLink 4 (900 GB/s both ways), 400 Gb/s NIC per GPU
SCALE = dict(world=16, ranks_per_node=8, micro_batch=4, seq=2048, c_s=2048, c_t=4096, feature_bytes=2, pairs=16,
             student_params=1.236e9, teacher_params=8.03e9, param_bytes=2, positions=128)  # the modelled cluster step
OPS = ("all_gather", "all_gather_into_tensor", "_all_gather_base", "all_reduce", "reduce_scatter", "reduce_scatter_tensor",
       "_reduce_scatter_base", "all_to_all", "all_to_all_single", "broadcast", "reduce")
TEACHER = dict(num_hidden_layers=8, hidden_size=384, intermediate_size=1024, num_attention_heads=6, num_key_value_heads=6)
STUDENT = dict(num_hidden_layers=4, hidden_size=192, intermediate_size=512, num_attention_heads=3, num_key_value_heads=3)
HERE = os.path.abspath(__file__)

_log: dict | None = None  # (tag, op) -> [calls, payload bytes, ring bytes, seconds] while measuring


def _nbytes(t) -> int:
    return sum(x.numel() * x.element_size() for x in t) if isinstance(t, (list, tuple)) else t.numel() * t.element_size()


def ring_bytes(op: str, payload: int, world: int) -> float:
    """Bytes one rank sends for a collective under ring algorithms; ``payload`` is the input of
    all_gather / reduce_scatter / all_to_all (one rank's), the tensor of all_reduce / broadcast / reduce."""
    f = (world - 1) / world
    if "all_gather" in op:
        return (world - 1) * payload
    if "all_reduce" in op:
        return 2 * f * payload
    if "reduce_scatter" in op or "all_to_all" in op:
        return f * payload
    return float(payload)


def _payload(op: str, args, kwargs) -> int:
    a = list(args) + list(kwargs.values())
    if op in ("all_gather", "all_to_all"):  # (outputs, input(s))
        return _nbytes(a[1])
    if op in ("all_gather_into_tensor", "_all_gather_base", "reduce_scatter_tensor", "_reduce_scatter_base",
              "all_to_all_single", "reduce_scatter"):  # (output, input)
        return _nbytes(a[1])
    return _nbytes(a[0])


def _tag() -> str:
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename.replace("\\", "/")
        if not (name == HERE or "/torch/distributed/" in name or "/deepspeed/comm/" in name):
            if "/fcd_ds/losses/" in name or (name.endswith("fcd_ds/runtime/distributed.py") and f.f_code.co_name != "all_reduce_host"):
                return "FCD"
            return "ZeRO" if "/deepspeed/" in name else "other"
        f = f.f_back
    return "other"


def _wrap(op: str, fn):
    def counted(*args, **kwargs):
        if _log is None:
            return fn(*args, **kwargs)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
        payload = _payload(op, args, kwargs)
        row = _log[(_tag(), op.removeprefix("_").replace("_base", "_into_tensor" if "gather" in op else "_tensor"))]
        row[0] += 1
        row[1] += payload
        row[2] += ring_bytes(op, payload, dist.get_world_size())
        row[3] += seconds
        return out

    return counted


def install_counters() -> None:
    """Wrap every collective of :data:`OPS` in ``torch.distributed`` and ``distributed_c10d`` (before DeepSpeed's
    backend starts: it keeps references)."""
    for op in OPS:
        fn = getattr(c10d, op, None)
        if fn is not None:
            wrapped = _wrap(op, fn)
            setattr(c10d, op, wrapped)
            if hasattr(dist, op):
                setattr(dist, op, wrapped)


def fcd_model(scheme: str, world: int, micro_batch: int, seq: int, c_s: int, c_t: int, feature_bytes: int, pairs: int,
              mask_bytes: int, positions: int = 0, groups: int | None = None) -> dict[tuple[str, str], float]:
    """Ring bytes one rank sends per step for FCD's global batch (position relation, both terms on), by
    (op, what). ``scheme``: ``"gather"`` (all_gather of features, the student's gradient all-reduced over the
    whole gathered tensor) or ``"gram"`` (all_to_all of features in their dtype, all-reduce of the float32
    per-position Gram's upper triangle, N m (m + 1) / 2 for m = world B; no backward collective but the inverse
    all_to_all). ``world`` is the ranks the batch spans (8 for a node-local global batch). ``positions``: the
    sequence relation read at that many of the ``seq`` positions (``--fcd_sequence_positions``; 0 = all), which
    is what its collectives move. ``groups``: how many stacked groups the pairs form (``fcd_pair_terms``; default
    ``pairs``, one per pair): the masks are gathered once per group, the rest scales with the pairs."""
    b, f = micro_batch, (world - 1) / world
    seq = min(positions, seq) if positions else seq
    pad = lambda c: -(-c // world) * world  # noqa: E731 (channels zero-padded to a multiple of world)
    rows = {}
    if scheme == "gather":
        rows[("all_gather", "student features")] = ring_bytes("all_gather", b * seq * c_s * feature_bytes, world)
        rows[("all_reduce", "student feature gradient (backward)")] = ring_bytes("all_reduce", world * b * seq * c_s * feature_bytes, world)
        rows[("all_gather", "teacher features")] = ring_bytes("all_gather", b * seq * c_t * feature_bytes, world)
        rows[("all_gather", "token-term sums")] = ring_bytes("all_gather", 2 * 4, world)
        rows[("all_reduce", "token-term sums (backward)")] = ring_bytes("all_reduce", world * 2 * 4, world)
    else:
        rows[("all_to_all_single", "student features")] = f * b * seq * pad(c_s) * feature_bytes
        rows[("all_to_all_single", "student feature gradient (backward)")] = f * b * seq * pad(c_s) * feature_bytes
        rows[("all_to_all_single", "teacher features")] = f * b * seq * pad(c_t) * feature_bytes
        m = world * b
        rows[("all_reduce", "Gram matrices (upper triangles), student and teacher")] = 2 * ring_bytes("all_reduce", seq * m * (m + 1) // 2 * 4, world)
        rows[("all_reduce", "token-term sums")] = ring_bytes("all_reduce", 2 * 4, world)
    out = {k: v * pairs for k, v in rows.items()}
    out[("all_gather", "masks")] = ring_bytes("all_gather", b * seq * mask_bytes, world) * (pairs if groups is None else groups)
    return out


def zero_model(stage: int, world: int, student_params: float, teacher_params: float, param_bytes: int) -> dict[tuple[str, str], float]:
    """Ring bytes one rank sends per step for ZeRO (no accumulation): the student's gradients reduce-scattered,
    its parameters all-gathered (after the step at stage 1-2; in forward and again in backward at stage 3),
    the teacher's parameters all-gathered in its forward at stage 3."""
    f = (world - 1) / world
    rows = {("reduce_scatter", "student gradients"): f * student_params * param_bytes}
    if stage == 3:
        rows[("all_gather", "student parameters, forward + backward")] = 2 * f * student_params * param_bytes
        rows[("all_gather", "teacher parameters, forward")] = f * teacher_params * param_bytes
    else:
        rows[("all_gather", "student parameters after the step")] = f * student_params * param_bytes
    return rows


def scale_table(scheme: str, node_local: bool = False, positions: int = 0) -> list[str]:
    """The 16-rank model as table rows: bytes per rank and seconds per step at each link bandwidth; with
    ``node_local`` FCD's batch spans one node's ranks (its collectives then cross NVLink only); ``positions``
    as :func:`fcd_model`'s."""
    s = SCALE
    fcd = fcd_model(scheme, s["ranks_per_node"] if node_local else s["world"], s["micro_batch"], s["seq"], s["c_s"], s["c_t"],
                    s["feature_bytes"], s["pairs"], 1 if scheme == "gram" else 8, positions)
    zero = zero_model(3, s["world"], s["student_params"], s["teacher_params"], s["param_bytes"])
    lines = []
    for tag, rows in (("FCD", fcd), ("ZeRO-3", zero)):
        for (op, what), v in rows.items():
            lines.append(f"| {tag} | {op} | {what} | {v / 2**20:,.1f} | " + " | ".join(f"{v / bw:.4f}" for bw in LINKS.values()) + " |")
        total = sum(rows.values())
        lines.append(f"| **{tag} total** | | | **{total / 2**20:,.1f}** | " + " | ".join(f"**{total / bw:.3f}**" for bw in LINKS.values()) + " |")
    grad = zero[("reduce_scatter", "student gradients")]
    if node_local:
        lines.append("| FCD bytes between nodes | | | 0.0 | | |")
    lines.append(f"| FCD / ZeRO's gradient bytes | | | {sum(fcd.values()) / grad:.2f} | | |")
    return lines


def positions_at(seq: int) -> int:
    """The ``--fcd_sequence_positions`` variant's K: the fraction of positions the 16-rank model reads
    (``SCALE["positions"]`` of ``SCALE["seq"]``) at ``seq`` positions."""
    return max(2, seq * SCALE["positions"] // SCALE["seq"])


def make_models(root: Path) -> tuple[Path, Path]:
    """The random-init teacher (saved with SmolLM2's tokenizer) and the student's config, once per machine."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fcd_ds.assets import default_assets

    common = dict(vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    teacher, student = root / "teacher", root / "student_config"
    if not (teacher / "config.json").is_file():
        torch.manual_seed(0)
        tmp = Path(tempfile.mkdtemp(dir=root))
        LlamaForCausalLM(LlamaConfig(**common, **TEACHER)).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(default_assets().teacher).save_pretrained(tmp)
        LlamaConfig(**common, **STUDENT).save_pretrained(tmp / "s")
        (tmp / "s").rename(student)
        tmp.rename(teacher)  # last: its config.json says both are ready
    return teacher, student


def main() -> None:
    global _log
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="measured rounds (one step of each variant per round)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no_write", action="store_true", help="print only")
    p.add_argument("--no_model", action="store_true", help="leave out the 16-rank model tables")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    p.add_argument("flags", nargs="*", help="launcher flags (after --)")
    args = p.parse_args()
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]  # the quoted command: as typed
    world, local_size = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))  # the ranks share the cores
    install_counters()

    from fcd_ds import defaults, trainer
    from fcd_ds.assets import default_assets
    from fcd_ds.config import DistillArguments, parse_args
    from fcd_ds.engine import DistillEngine
    from fcd_ds.plan import plan_run
    from fcd_ds.runtime import distributed as fdist
    from fcd_ds.runtime.metrics import measure_matmul_tflops

    root = Path(tempfile.gettempdir()) / "fcd_comm_models"
    root.mkdir(exist_ok=True)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        make_models(root)
    while not (root / "teacher" / "config.json").is_file():
        time.sleep(0.5)
    assets = default_assets()
    out = Path(tempfile.gettempdir()) / f"fcd_comm_run_{os.environ.get('MASTER_PORT', '0')}"
    launcher = defaults.GPT
    flags = ["--teacher", str(root / "teacher"), "--student_config", str(root / "student_config" / "config.json"),
             "--train_file", str(assets.train_file), "--validation_file", str(assets.validation_file),
             "--max_seq_length", "128", "--per_device_train_batch_size", "4", "--loss", "ce+fcd", "--eval_on_start", "false",
             "--report_to", "none", "--output_dir", str(out), "--overwrite_output_dir", *args.flags]
    plan = plan_run(*parse_args(flags, launcher.flags), launcher)
    job = trainer.setup(plan)
    rank = dist.get_rank()
    peak = measure_matmul_tflops() if rank == 0 else 0.0
    dist.barrier()

    def engine_for(on: bool, positions: int = 0) -> DistillEngine:
        a = DistillArguments(**{**dataclasses.asdict(plan.distill_args), "fcd_global_batch": on, "fcd_sequence_positions": positions,
                                **{f"{t}_weight": None for t in ("ce", "fcd", "kd", "hidden_mse", "minilm", "dist")}})
        return DistillEngine(job.distiller.student, job.distiller.teacher, plan.pairs, a, plan.task, plan.attention_pairs)

    k = positions_at(plan.data_args.max_seq_length)
    variants = {"CE + FCD, global batch on": engine_for(True), "CE + FCD, global batch off": engine_for(False),
                f"CE + FCD, global batch on, {k} positions": engine_for(True, k)}
    logs = {name: defaultdict(lambda: [0, 0, 0.0, 0.0]) for name in variants}
    times = defaultdict(list)
    for engine in variants.values():
        for _ in range(args.warmup):
            engine.train_step(job.micro_batches)
    for _ in range(args.steps):
        for name, engine in variants.items():
            dist.barrier()
            _log = logs[name]
            start = time.perf_counter()
            engine.train_step(job.micro_batches)
            times[name].append(time.perf_counter() - start)
            _log = None
    peak = (peak + (measure_matmul_tflops() if rank == 0 else 0.0)) / 2
    if rank == 0:
        report(args, plan, world, logs, times, peak, "gram" if hasattr(fdist, "global_sample_gram") else "gather")
    trainer.finish()


def report(args, plan, world: int, logs: dict, times: dict, peak: float, scheme: str) -> None:
    """Rank 0: the measured tables, the model at the measured shapes beside them, and the 16-rank model."""
    s_cfg, t_cfg = plan.student_config, plan.teacher_config
    b, n, pairs = plan.ds_config["train_micro_batch_size_per_gpu"], plan.data_args.max_seq_length, len(plan.pairs)
    stage = plan.ds_config["zero_optimization"]["stage"]
    steps = args.steps
    median = {name: statistics.median(t) for name, t in times.items()}
    off = median["CE + FCD, global batch off"]
    k = positions_at(n)
    a = plan.distill_args
    stacked = {"true": True, "false": False}.get(a.fcd_stack_pairs, world > 1)  # 'auto' on CPUs: stacked when the global batch spans ranks
    per_group = max(1, a.fcd_chunk_size // n) if stacked else 1
    groups = -(-pairs // per_group)
    env = f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else ""
    lines = [f"Command: `{env}deepspeed --num_gpus {world} {command_line('fcd_comm.py').removeprefix('python ')}`; {machine()}, {world} ranks (gloo), "
             f"{torch.get_num_threads()} torch thread(s) per rank; {matmul_rate(peak)} (rank 0, mean of before and after, the other ranks idle). "
             f"Teacher: random-init Llama {t_cfg.num_hidden_layers} x {t_cfg.hidden_size}; student: fresh {s_cfg.num_hidden_layers} x "
             f"{s_cfg.hidden_size} ({sum(p.numel() for p in _student_params(plan)) / 1e6:.1f}M parameters); micro-batch {b} x {n} tokens per rank, "
             f"{pairs} layer pairs ({groups} stacked group(s): --fcd_stack_pairs {a.fcd_stack_pairs}), ZeRO-{stage}, float32; FCD code: `{scheme}`. Per step, rank 0, mean of {steps} steps per variant "
             f"(interleaved, after {args.warmup} warm-up each); ring MiB = MiB one rank sends under ring algorithms.", "",
             "| variant | median step s | step / step with the global batch off | tokens/s (all ranks) |", "|---|---|---|---|",
             *(f"| {name} | {t:.3f} | {t / off:.3f} | {world * b * n / t:.0f} |" for name, t in median.items()), "",
             "| variant | by | collective | calls | payload MiB | ring MiB, measured | ring MiB, modelled | seconds |", "|---|---|---|---|---|---|---|---|"]
    by_op = {}
    for name, positions in (("CE + FCD, global batch on", 0), (f"CE + FCD, global batch on, {k} positions", k)):
        by_op[name] = defaultdict(float)
        for (op, _), v in fcd_model(scheme, world, b, n, s_cfg.hidden_size, t_cfg.hidden_size, 4, pairs, 1 if scheme == "gram" else 8, positions,
                                    groups).items():
            by_op[name][op] += v
    for name, log in logs.items():
        for (tag, op), (calls, payload, ring, seconds) in sorted(log.items()):
            modelled = f"{by_op[name][op] / 2**20:.3f}" if tag == "FCD" and name in by_op else ""
            lines.append(f"| {name} | {tag} | {op} | {calls / steps:g} | {payload / steps / 2**20:.3f} | {ring / steps / 2**20:.3f} | {modelled} | {seconds / steps:.4f} |")
    for name, log in logs.items():
        fcd = sum(v[2] for (tag, _), v in log.items() if tag == "FCD") / steps
        zero = sum(v[2] for (tag, _), v in log.items() if tag == "ZeRO") / steps
        fcd_s = sum(v[3] for (tag, _), v in log.items() if tag == "FCD") / steps
        zero_s = sum(v[3] for (tag, _), v in log.items() if tag == "ZeRO") / steps
        lines.append(f"| {name} | **FCD / ZeRO** | all | | | {fcd / 2**20:.3f} / {zero / 2**20:.3f} = {fcd / max(zero, 1):.3f} | | {fcd_s:.4f} / {zero_s:.4f} |")
    s = SCALE
    head = (f"Modelled at {s['world']} ranks ({s['world'] // s['ranks_per_node']} nodes x {s['ranks_per_node']}) x micro-batch {s['micro_batch']} x N "
            f"{s['seq']}, student width {s['c_s']} ({s['student_params'] / 1e9:.2f}B parameters), teacher width {s['c_t']} "
            f"({s['teacher_params'] / 1e9:.2f}B), bf16, {s['pairs']} layer pairs, ZeRO-3 for both; seconds = ring bytes / bandwidth "
            f"({', '.join(f'{k}: {v / 1e9:.0f} GB/s per GPU' for k, v in LINKS.items())}), no latency term:")
    schemes = (("gather", False, 0, "before (features all-gathered)"), ("gram", False, 0, "after (all_to_all + Gram all-reduce)"),
               ("gram", True, 0, "after, with a node-local global batch (8 ranks; modelled only, not an option of fcd_ds)"),
               ("gram", False, s["positions"], f"after, the sequence relation at {s['positions']} of the {s['seq']} positions "
                                               f"(`--fcd_sequence_positions {s['positions']}`)"))
    for sch, local, positions, title in () if args.no_model else schemes:
        lines += ["", f"{head} FCD {title}.", "",
                  "| by | collective | what | ring MiB per rank | " + " | ".join(f"s at {k}" for k in LINKS) + " |", "|---|---|---|---|---|---|"]
        lines += scale_table(sch, local, positions)
    publish(lines, write=not args.no_write, heading=f"\n## FCD's collectives beside ZeRO's: {world} CPU ranks, FCD code `{scheme}`"
            f"{'' if args.no_model else ', modelled at 16 ranks'} ({utc_stamp()})\n\n")


def _student_params(plan):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return list(AutoModelForCausalLM.from_config(plan.student_config).parameters())


if __name__ == "__main__":
    main()
