"""fcd_ds and TRL's GKDTrainer side by side: the same logit distillation, tokens/s and peak memory, one run.

    pip install -c constraints.txt -e ".[bench]"       # trl==1.16.0 (benchmarks only: fcd_ds never imports trl)
    python benchmarks/vs_trl.py                         # 2 rounds x (2 warm-up + 6 timed steps) per case; prints, appends to RESULTS.md
    python benchmarks/vs_trl.py --steps 1 --warmup 1 --max_seq_length 32 --no_write    # smoke test

What is distilled, identically in every case: the default teacher (SmolLM2-135M, ``prepare_default_assets``)
into the default student (its blocks pruned to 10 of 30 by ``fcd_ds.models.prune_teacher``: the same
initial weights in every case), float32, on the same 4 x 256-token blocks of the default BBC News corpus
(``CausalLMTask.load_datasets``) in the same order (fcd_ds's ``MicroBatches`` order, fed to TRL with
``train_sampling_strategy="sequential"``), under the same DeepSpeed JSON (ds_configs/zero2.json: ZeRO-2,
AdamW, WarmupDecayLR; fcd_ds fills its "auto" values itself, TRL through ``TrainingArguments(deepspeed=...)``),
with the same learning rate, warm-up and ``max_steps`` (= warm-up + timed steps), gradient accumulation 1, one
process (RANK=0, WORLD_SIZE=1), the teacher frozen in its own stage-0 DeepSpeed engine in both, no
activation checkpointing, ``use_cache`` off in both models. Cases, each in its own process:

* ``TRL GKDTrainer``: ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=0`` (no on-policy sampling: its
  ``training_step`` samples only when ``random.random() <= lmbda``, in practice never at 0; the models'
  ``generate`` calls are counted and reported) and ``beta=0`` (its generalized JSD is then the forward
  KL(teacher || student)). Its ``compute_loss`` holds both models' (B, N, V) logits. (TRL's other
  distiller, ``trl.DistillationTrainer``, the one with a chunked loss that never holds the logits, trains
  on-policy only: the student generates completions to prompts, so it cannot run this off-policy comparison.)
* ``fcd_ds KD``: the library's own step (``plan_run`` + ``trainer.setup`` + ``DistillEngine.train_step``,
  as step_cost.py) with ``--ce_weight 0 --kd_weight 1 --fcd_weight 0`` (its default ``--fused_logit_loss``, read off
  ``DistillArguments`` at run time), then the same with the other value (the materialised logits);
* ``fcd_ds KD + FCD``: the same with ``--fcd_weight 1`` (the default layer map);
* host memory: fcd_ds keeps freed host memory in glibc's heap (``--host_memory_reuse``, default auto: on
  when training on CPUs; ``fcd_ds.runtime.host_memory``), which TRL does not. So TRL also runs with the same
  setting made in its process before its trainer is built (``TRL GKDTrainer ..., host memory reused``),
  and fcd_ds's default KD case also runs with ``--host_memory_reuse false``: both comparisons, side by side.

The loss: GKDTrainer's ``compute_loss`` calls ``generalized_jsd_loss`` without its temperature, so its loss is
always at T = 1 (``GKDConfig.temperature`` is the sampling temperature) and has no T^2 factor; it averages
over the shifted positions 0..N-2 (``labels[:, 1:] != -100``, divided by the Trainer's
``num_items_in_batch``, counted over ``labels[..., 1:]``). fcd_ds's ``logit_kd_loss`` is
``T^2 KL(p_t || p_s)`` averaged over every attended position 0..N-1. So fcd_ds runs at ``--temperature``
(its ``--kd_temperature``; default 1 here, not fcd_ds's 2, so that both train on the same loss, which then
differs only by fcd_ds's last position), and a first, separate process computes both on the first batch with the initial weights: TRL's
function as its ``compute_loss`` calls it, fcd_ds's ``logit_kd_loss`` on TRL's positions and on its own, and
``fused_linear_kd`` from the last hidden states, so the values can be compared number to number.

The cases run in ``--rounds`` rounds, each case in a fresh process per round, the order reversed every other
round (TRL, fcd_ds ..., then fcd_ds ... reversed, TRL): this shared machine's matmul rate drifts within minutes
(77 to 144 GFLOP/s in one hour), and a drift then weighs alike on every case. Per case: median step seconds of
the ``--steps`` after ``--warmup`` of every round, pooled (fcd_ds: one ``train_step``, data to optimizer step;
TRL: from one ``on_step_end`` callback to the next, the Trainer's own loop), tokens/s = real tokens of a step /
that median, the ratio to TRL's also round by round, peak RSS during the training steps (VmHWM, reset through /proc/self/clear_refs once the
engines are built; the whole process's ru_maxrss where that is not allowed), both as ratios to TRL's, the RSS
before the steps, the first and last steps' KD loss, achieved FLOP/s (``transformer_flops_per_token``: student
forward + backward and teacher forward, both with their heads; FCD's relations not counted) as a fraction of
the machine's measured fp32 matmul rate (``measure_matmul_tflops``). Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

from launch import REPO, spawn  # benchmarks/launch.py (python puts benchmarks/ on sys.path)
from results import command_line, publish, utc_stamp  # benchmarks/results.py

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental.gkd is what is measured
DS_JSON = REPO / "ds_configs" / "zero2.json"
TRL = "TRL GKDTrainer (lmbda 0, beta 0)"
TRL_REUSE = "TRL GKDTrainer (lmbda 0, beta 0), host memory reused as fcd_ds does"


def fused_default() -> bool:
    """fcd_ds's default of ``--fused_logit_loss`` (a field of ``DistillArguments``)."""
    from fcd_ds.config import DistillArguments

    return next(f.default for f in dataclasses.fields(DistillArguments) if f.name == "fused_logit_loss")


def cases(fused: bool) -> dict[str, list[str]]:
    """``{case name: fcd_ds flags on top of :func:`fcd_flags`}`` in run order, for ``fused`` the default of
    ``--fused_logit_loss``. The TRL case reads the first fcd_ds case's plan (teacher, student, data, JSON)."""
    name = {True: "fused logit loss", False: "logits materialised"}
    return {TRL: [], TRL_REUSE: [], f"fcd_ds KD, {name[fused]} (default)": [],
            f"fcd_ds KD, {name[fused]}, --host_memory_reuse false": ["--host_memory_reuse", "false"],
            f"fcd_ds KD, {name[not fused]} (--fused_logit_loss {str(not fused).lower()})": ["--fused_logit_loss", str(not fused).lower()],
            f"fcd_ds KD + FCD, {name[fused]} (default)": ["--fcd_weight", "1"]}


def warmup_steps(total: int) -> int:
    """LR warm-up steps given to both trainers: fcd_ds's default, a tenth of ``max_steps`` (at least 1)."""
    return max(1, total // 10)


def fcd_flags(opts, out: str, extra: list[str]) -> list[str]:
    """fcd_ds's launcher flags of a case: the default GPT launcher's run, KD only, at the benchmark's sizes."""
    total = opts.warmup + opts.steps
    flags = ["--output_dir", out, "--overwrite_output_dir", "--eval_on_start", "false", "--deepspeed_config", DS_JSON,
             "--max_seq_length", opts.max_seq_length, "--per_device_train_batch_size", opts.batch_size,
             "--gradient_accumulation_steps", 1, "--max_steps", total, "--warmup_steps", warmup_steps(total),
             "--learning_rate", opts.learning_rate, "--kd_temperature", opts.temperature,
             "--ce_weight", 0, "--kd_weight", 1, "--fcd_weight", 0, "--student_num_layers", 10]
    flags = [str(f) for f in flags]
    for i in range(0, len(extra), 2):  # a case's flag replaces the common one
        if extra[i] in flags:
            flags[flags.index(extra[i]) + 1] = extra[i + 1]
        else:
            flags += extra[i : i + 2]
    return flags


# --- measurement helpers (child processes) ---------------------------------------------------------------

def _status_gib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 2**20


def reset_peak() -> tuple[float, str]:
    """Collect garbage and reset the RSS high-water mark; returns ``(RSS now in GiB, method)``."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_gib("VmRSS"), "VmHWM"
    except OSError:
        return _status_gib("VmRSS"), "ru_maxrss"


def peak_gib(method: str) -> float:
    """The RSS high-water mark (GiB) since :func:`reset_peak` (VmHWM), or of the whole process (ru_maxrss)."""
    return _status_gib("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _plan(opts, out: str, extra: list[str]):
    from fcd_ds import defaults
    from fcd_ds.config import parse_args
    from fcd_ds.plan import plan_run

    return plan_run(*parse_args(fcd_flags(opts, out, extra), defaults.GPT.flags), defaults.GPT)


def _first_batches(plan, n: int):
    """The first ``n`` micro-batches fcd_ds's engine would train on, in order: ``(n, B, N)`` input ids."""
    from functools import partial

    import torch

    from fcd_ds.data import MicroBatches

    train, _ = plan.task.load_datasets(plan.tokenizer, plan.data_args)
    stream = MicroBatches(train, plan.ds_config["train_micro_batch_size_per_gpu"], 0, 1, plan.train_args.seed,
                          partial(plan.task.collate, train=True))
    return torch.stack([next(stream)["input_ids"] for _ in range(n)])


def _models(plan):
    """Teacher and 10-block student as fcd_ds builds them (float32, ``use_cache`` off), without DeepSpeed."""
    import torch

    from fcd_ds.models import load_causal_lm, prune_teacher

    teacher = load_causal_lm(plan.teacher, torch.float32, "--teacher")
    student = prune_teacher(plan.teacher, plan.teacher_config, plan.model_args.student_num_layers, torch.float32)
    for m in (teacher, student):
        m.config.use_cache = False
    return teacher, student


def _flat(node, prefix: str = "") -> dict:
    """A nested dict (a DeepSpeed JSON) as ``{"a.b.c": value}``."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def _flops_per_token(plan) -> float:
    from fcd_ds.runtime.metrics import transformer_flops_per_token

    n = plan.data_args.max_seq_length
    return (transformer_flops_per_token(plan.student_config, n, head=True, backward=True)
            + transformer_flops_per_token(plan.teacher_config, n, head=True))


def run_loss_check(opts, out: str) -> dict:
    """Both libraries' KD loss on the first batch with the initial weights (no training, no DeepSpeed)."""
    import torch
    from trl.experimental.gkd import GKDTrainer

    from fcd_ds.losses import fused_linear_kd, logit_kd_loss

    plan = _plan(opts, out, [])
    ids = _first_batches(plan, 1)[0]  # (B, N)
    mask = torch.ones_like(ids)
    teacher, student = _models(plan)
    t = opts.temperature
    with torch.no_grad():
        h_s = student.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, N, C): after the final norm
        h_t = teacher.model(input_ids=ids, attention_mask=mask).last_hidden_state
        w_s, w_t = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight  # (V, C)
        z_s, z_t = h_s @ w_s.T, h_t @ w_t.T  # (B, N, V): what the heads compute (no bias)
        shifted = mask.clone()
        shifted[:, -1] = 0  # TRL's positions 0..N-2
        values = {
            "trl": GKDTrainer.generalized_jsd_loss(z_s[:, :-1], z_t[:, :-1], ids[:, 1:], beta=0.0).item(),
            "trl_at_t": (t**2 * GKDTrainer.generalized_jsd_loss(z_s[:, :-1], z_t[:, :-1], ids[:, 1:], beta=0.0, temperature=t)).item(),
            "fcd_trl_positions": logit_kd_loss(z_s, z_t, shifted, temperature=t).item(),
            "fcd": logit_kd_loss(z_s, z_t, mask, temperature=t).item(),
            "fcd_fused": fused_linear_kd(h_s, w_s, h_t, w_t, mask, temperature=t).item(),
            "fcd_fused_trl_positions": fused_linear_kd(h_s, w_s, h_t, w_t, shifted, temperature=t).item(),
        }
    return {"values": values, "positions": [int(shifted.sum()), int(mask.sum())]}


def run_trl(opts, out: str, reuse_host_memory: bool = False) -> dict:
    """Train with TRL's GKDTrainer (lmbda 0, beta 0) under the DeepSpeed JSON; times, losses, memory. With
    ``reuse_host_memory``, glibc keeps freed host memory first, as fcd_ds's ``--host_memory_reuse`` does."""
    if reuse_host_memory:
        from fcd_ds.runtime.host_memory import reuse_freed_host_memory

        reuse_freed_host_memory()
    import datasets
    import torch
    from transformers import TrainerCallback, set_seed
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    plan = _plan(opts, out, [])
    total = opts.warmup + opts.steps
    set_seed(plan.train_args.seed)
    ids = _first_batches(plan, total).flatten(0, 1)  # (total * B, N), in fcd_ds's order
    teacher, student = _models(plan)
    generate_calls = []
    for name, m in (("student", student), ("teacher", teacher)):
        plain = m.generate
        m.generate = lambda *a, _plain=plain, _name=name, **k: generate_calls.append(_name) or _plain(*a, **k)
    real_tokens = []

    def collate(rows: list[dict]) -> dict:
        x = torch.tensor([r["input_ids"] for r in rows])  # (B, N)
        real_tokens.append(x.numel())  # every block is full: all tokens are real
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.losses, self.last, self.rss0, self.method = [], [], None, None, None

        def on_train_begin(self, args, state, control, **kwargs):  # engines built
            self.rss0, self.method = reset_peak()

        def on_step_begin(self, args, state, control, **kwargs):
            if self.last is None:
                self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    ds = json.loads(DS_JSON.read_text())
    opt = ds["optimizer"]["params"]  # values HF checks against TrainingArguments: set them equal
    config = GKDConfig(
        output_dir=str(Path(out) / "trl"), deepspeed=str(DS_JSON), per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=1, max_steps=total, learning_rate=opts.learning_rate, warmup_steps=warmup_steps(total),
        weight_decay=opt["weight_decay"], adam_beta1=opt["betas"][0], adam_beta2=opt["betas"][1], adam_epsilon=opt["eps"],
        max_grad_norm=ds["gradient_clipping"], bf16=False, fp16=False, gradient_checkpointing=False,
        lmbda=0.0, beta=0.0, temperature=opts.temperature, seq_kd=False, max_length=opts.max_seq_length,
        seed=plan.train_args.seed, train_sampling_strategy="sequential", dataloader_num_workers=0,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
    )
    clock = Clock()
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, data_collator=collate,
                         train_dataset=datasets.Dataset.from_dict({"input_ids": ids.tolist()}),
                         processing_class=plan.tokenizer, callbacks=[clock])
    trainer.train()
    import trl

    used = _flat(trainer.accelerator.state.deepspeed_plugin.deepspeed_config)
    ours = _flat(plan.ds_config)
    differences = {k: [ours.get(k), used.get(k)] for k in sorted(set(ours) | set(used)) if ours.get(k) != used.get(k)}
    return {"times": clock.times, "losses": clock.losses, "tokens": real_tokens[-len(clock.times):],
            "rss_setup_gib": clock.rss0, "peak_gib": peak_gib(clock.method), "method": clock.method,
            "flops_per_token": _flops_per_token(plan), "threads": torch.get_num_threads(),
            "generate_calls": len(generate_calls), "trl_version": trl.__version__, "ds_config_differences": differences}


def run_fcd(opts, out: str, extra: list[str]) -> dict:
    """Train with fcd_ds's engine (``trainer.setup`` + ``DistillEngine.train_step``); times, losses, memory."""
    import torch
    from deepspeed.accelerator import get_accelerator

    from fcd_ds import trainer

    plan = _plan(opts, out, extra)
    job = trainer.setup(plan)
    rss0, method = reset_peak()
    times, losses, tokens = [], [], []
    for _ in range(opts.warmup + opts.steps):
        get_accelerator().synchronize()
        start = time.perf_counter()
        m = job.distiller.train_step(job.micro_batches)
        get_accelerator().synchronize()
        times.append(time.perf_counter() - start)
        losses.append(m["loss/kd"])
        tokens.append(m["tokens"])
    result = {"times": times, "losses": losses, "tokens": tokens, "rss_setup_gib": rss0, "peak_gib": peak_gib(method),
              "method": method, "flops_per_token": job.flops_per_token, "threads": torch.get_num_threads()}
    trainer.finish()
    return result


# --- the run (parent process) --------------------------------------------------------------------------

def run_case(opts, name: str, kind: str) -> dict:
    """Run one case (``kind``: loss_check, trl, fcd) in its own process (``launch.spawn``, one rank);
    returns its result dict, or ``{"error": ...}``."""
    with tempfile.TemporaryDirectory(prefix="fcd_vs_trl_") as tmp:
        result = Path(tmp) / "result.json"
        flags = ["--_case", kind, "--_name", name, "--_result", result, "--_out", Path(tmp) / "run",
                 "--steps", opts.steps, "--warmup", opts.warmup, "--max_seq_length", opts.max_seq_length,
                 "--batch_size", opts.batch_size, "--learning_rate", opts.learning_rate, "--temperature", opts.temperature]
        codes, wall = spawn("benchmarks/vs_trl.py", flags, 1, timeout=opts.timeout)
        if codes != [0] or not result.is_file():
            return {"error": f"failed (exit {codes[0]})"}
        out = json.loads(result.read_text())
    out["wall_s"] = wall
    print(f"[{name}] {wall:.0f} s", flush=True)
    return out


def child(opts) -> None:
    """A case's process: run it and write its result JSON."""
    extra = cases(fused_default()).get(opts._name, [])
    if opts._case == "loss_check":
        result = run_loss_check(opts, opts._out)
    elif opts._case == "trl":
        result = run_trl(opts, opts._out, reuse_host_memory=opts._name == TRL_REUSE)
    else:
        result = run_fcd(opts, opts._out, extra)
    Path(opts._result).write_text(json.dumps(result))


def pool_rounds(rounds: list[dict], warmup: int) -> dict:
    """One case's results over its rounds as one: its timed steps (each round's steps after ``warmup``) pooled
    in ``timed`` / ``timed_tokens``, tokens/s of each round in ``round_tps``, the highest peak RSS; losses,
    set-up RSS and the rest from the first round. A failed round gives ``{"error": ...}``."""
    if any("error" in r for r in rounds):
        return next(r for r in rounds if "error" in r)
    out = dict(rounds[0])
    out["timed"] = [t for r in rounds for t in r["times"][warmup:]]
    out["timed_tokens"] = [n for r in rounds for n in r["tokens"][warmup:]]
    out["round_tps"] = [statistics.median(r["tokens"][warmup:]) / statistics.median(r["times"][warmup:]) for r in rounds]
    out["peak_gib"] = max(r["peak_gib"] for r in rounds)
    return out


def _speed(r: dict) -> tuple[float, float]:
    """(median step seconds, tokens/s) over a pooled case's timed steps."""
    step = statistics.median(r["timed"])
    return step, statistics.median(r["timed_tokens"]) / step


def _row(name: str, r: dict, peak_flops: float, trl: dict, trl_reuse: dict) -> str:
    if "error" in r:
        return f"| {name} | {r['error']} |" + " |" * 10
    step, tps = _speed(r)
    speed_ratio = f"{tps / _speed(trl)[1]:.2f}" if "timed" in trl else "—"
    reuse_ratio = f"{tps / _speed(trl_reuse)[1]:.2f}" if "timed" in trl_reuse else "—"
    by_round = ", ".join(f"{a / b:.2f}" for a, b in zip(r["round_tps"], trl["round_tps"])) if "timed" in trl else "—"
    memory_ratio = f"{r['peak_gib'] / trl['peak_gib']:.2f}" if "peak_gib" in trl else "—"
    flops = r["flops_per_token"] * tps
    losses = f"{r['losses'][0]:.4f} / {r['losses'][-1]:.4f}" if r["losses"] else "—"
    return (f"| {name} | {step:.3f} | {tps:.0f} | {speed_ratio} | {reuse_ratio} | {by_round} | {r['peak_gib']:.2f} | {memory_ratio} | "
            f"{r['rss_setup_gib']:.2f} | {flops / 1e9:.1f} | {flops / peak_flops:.3f} | {losses} |")


def report(opts, results: dict, check: dict, peaks: list[float]) -> str:
    """The markdown: set-up line, the loss check on one batch, the cases' table. ``peaks``: the matmul rates
    (FLOP/s) measured before and after the rounds; fractions are of their mean."""
    import torch

    peak_flops = statistics.mean(peaks)
    trl = results.get(TRL, {})
    threads = sorted({r["threads"] for r in results.values() if "threads" in r}) or [torch.get_num_threads()]
    total = opts.warmup + opts.steps
    lines = [f"Command: `{command_line('vs_trl.py')}`; {platform.machine()} CPU, {os.cpu_count()} cores, torch threads "
             f"{', '.join(map(str, threads))}; measured fp32 matmul {peak_flops / 1e9:.0f} GFLOP/s (2048 x 2048; the mean of "
             f"{' and '.join(f'{x / 1e9:.0f}' for x in peaks)} before and after the rounds). "
             f"trl {trl.get('trl_version', '?')} (`trl.experimental.gkd.GKDTrainer`, generate calls during training: "
             f"{trl.get('generate_calls', '?')}). SmolLM2-135M teacher -> 10-block pruned student, float32, "
             f"{opts.batch_size} x {opts.max_seq_length} tokens per step (the same blocks in the same order), GA 1, "
             f"ds_configs/zero2.json, lr {opts.learning_rate:g}, warm-up {warmup_steps(total)}, max_steps {total}, "
             f"KD temperature {opts.temperature:g}{'' if opts.temperature == 1 else ' (fcd_ds; TRL trains at T = 1 whatever its config)'}; one process per case and round (RANK=0, WORLD_SIZE=1); {opts.rounds} round(s), the cases in "
             f"order then in reverse order (so that a drift of the machine's speed weighs on every case alike); median of the "
             f"{opts.rounds} x {opts.steps} steps after {opts.warmup} warm-up in each process.", ""]
    if "ds_config_differences" in trl:
        diff = trl["ds_config_differences"]
        lines += [("DeepSpeed JSON given to `deepspeed.initialize`, fcd_ds's vs the one transformers filled for TRL: "
                   + ("identical." if not diff else "they differ in " + "; ".join(f"`{k}` {a} vs {b}" for k, (a, b) in diff.items()) + ".")), ""]
    if "values" in check:
        v, (n_trl, n_all), t = check["values"], check["positions"], opts.temperature
        rows = [("TRL `generalized_jsd_loss(beta=0)` as its `compute_loss` calls it (T = 1, no T^2)", "0..N-2", "trl")]
        if t != 1:
            rows.append((f"TRL `generalized_jsd_loss(beta=0, temperature={t:g})` x T^2 (not what it trains on)", "0..N-2", "trl_at_t"))
        rows += [(f"fcd_ds `logit_kd_loss` (T = {t:g}) on TRL's positions", "0..N-2", "fcd_trl_positions"),
                 (f"fcd_ds `fused_linear_kd` (T = {t:g}) on TRL's positions", "0..N-2", "fcd_fused_trl_positions"),
                 (f"fcd_ds `logit_kd_loss` (T = {t:g}): what the engine trains on", "0..N-1", "fcd"),
                 (f"fcd_ds `fused_linear_kd` (T = {t:g}): what the fused engine trains on", "0..N-1", "fcd_fused")]
        lines += [f"KD loss on the first batch with the initial weights (positions counted: TRL {n_trl}, fcd_ds {n_all}):", "",
                  "| loss | positions | value | relative to TRL's |", "|---|---|---|---|"]
        lines += [f"| {what} | {pos} | {v[k]:.6f} | {(v[k] - v['trl']) / v['trl']:+.1e} |" for what, pos, k in rows]
        lines.append("")
    else:
        lines += [f"KD loss check: {check.get('error', 'not run')}", ""]
    lines += ["| case | step s (median) | tokens/s | tokens/s vs TRL | tokens/s vs TRL, host memory reused | vs TRL, round by round "
              "| peak RSS in training (GiB) | peak RSS vs TRL | RSS before training (GiB) | achieved GFLOP/s | fraction of measured matmul "
              "| KD loss, first / last step |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(name, r, peak_flops, trl, results.get(TRL_REUSE, {})) for name, r in results.items()]
    methods = sorted({r["method"] for r in results.values() if "method" in r})
    if methods and methods != ["VmHWM"]:
        lines.append(f"\nPeak memory method: {', '.join(methods)} (ru_maxrss: the whole process, set-up included).")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per case and round (median of all rounds')")
    p.add_argument("--rounds", type=int, default=2, help="rounds over the cases, each in the reverse order of the one before")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (max_steps = warmup + steps)")
    p.add_argument("--max_seq_length", type=int, default=256, help="tokens per block")
    p.add_argument("--batch_size", type=int, default=4, help="micro-batch (blocks per step)")
    p.add_argument("--learning_rate", type=float, default=5e-4, help="peak learning rate of both (fcd_ds's default)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="fcd_ds's --kd_temperature (TRL's GKD loss is at T = 1 whatever its config says; see the docstring)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    p.add_argument("--no_write", action="store_true", help="print only")
    for hidden in ("--_case", "--_name", "--_result", "--_out"):  # a case's own process
        p.add_argument(hidden, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.warmup < 1 or opts.steps < 1 or opts.rounds < 1:
        p.error("--steps, --warmup and --rounds must be >= 1")
    if opts._case:
        child(opts)
        return

    from fcd_ds.assets import prepare_default_assets
    from fcd_ds.runtime.metrics import measure_matmul_tflops

    prepare_default_assets()  # once, before the cases' processes
    peaks = [measure_matmul_tflops() * 1e12]
    print(f"measured fp32 matmul rate: {peaks[0] / 1e9:.0f} GFLOP/s", flush=True)
    check = run_case(opts, "loss check", "loss_check")
    names = list(cases(fused_default()))
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    for i in range(opts.rounds):  # order, reverse order, ...: a linear drift of the machine weighs alike on every case
        for name in names if i % 2 == 0 else names[::-1]:
            rounds[name].append(run_case(opts, name, "trl" if name in (TRL, TRL_REUSE) else "fcd"))
    peaks.append(measure_matmul_tflops() * 1e12)
    results = {name: pool_rounds(rounds[name], opts.warmup) for name in names}
    publish(report(opts, results, check, peaks), write=not opts.no_write,
            heading=f"\n## fcd_ds vs TRL's GKDTrainer, side by side ({utc_stamp()})\n\n")


if __name__ == "__main__":
    main()
