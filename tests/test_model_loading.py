"""Model loading as users expect: --attn_implementation reaches every teacher and student build,
--revision selects a hub snapshot (tested offline on a real hub cache layout), weights are safetensors
unless --use_safetensors false, and --fp16 resolves to DeepSpeed's dynamic loss scaling, which the fused
logit loss honours (a scaled backward scales its gradients, none lost to fp16 underflow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from fcd_ds import defaults
from fcd_ds.config import DEFAULT_DS_CONFIG, TrainArguments, parse_args
from fcd_ds.errors import UsageError
from fcd_ds.plan import plan_run


def _args(tiny_models, corpus, tmp_path, *extra, teacher="gpt2_teacher") -> list[str]:
    base = ["--teacher", tiny_models[teacher] if teacher in tiny_models else teacher, "--train_file", corpus["train"],
            "--validation_file", corpus["valid"], "--max_seq_length", 32, "--output_dir", tmp_path / "out", *extra]
    return [str(a) for a in base]


def _plan(argv):
    return plan_run(*parse_args(argv, defaults.GPT.flags), defaults.GPT)


def _built(plan):
    """(student, teacher) modules as build_student_engine / build_teacher_engine build them, before DeepSpeed."""
    from fcd_ds.build import model_dtype, student_model, teacher_model

    dtype = model_dtype(plan.ds_config)
    return (student_model(plan.model_args, plan.teacher, plan.teacher_config, dtype, plan.task),
            teacher_model(plan.teacher, dtype, plan.task, plan.model_args))


def _student_sources(tiny_models, tmp_path) -> dict[str, list[str]]:
    config = tmp_path / "student_config.json"
    config.write_text((tiny_models["gpt2_student"] / "config.json").read_text())
    return {"pruned": ["--student_num_layers", "2"], "pretrained": ["--student", str(tiny_models["gpt2_student"])],
            "config": ["--student_config", str(config)]}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attn_implementation_reaches_teacher_and_every_kind_of_student(impl, tiny_models, corpus, tmp_path):
    for kind, source in _student_sources(tiny_models, tmp_path).items():
        plan = _plan(_args(tiny_models, corpus, tmp_path, *source, "--attn_implementation", impl))
        student, teacher = _built(plan)
        assert (kind, student.config._attn_implementation, teacher.config._attn_implementation) == (kind, impl, impl)
        assert plan.run_config()["model"]["attn_implementation"] == impl


def test_without_the_flag_transformers_chooses(tiny_models, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    own = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2_teacher"]).config._attn_implementation
    student, teacher = _built(_plan(_args(tiny_models, corpus, tmp_path, "--student_num_layers", "2")))
    assert student.config._attn_implementation == teacher.config._attn_implementation == own == "sdpa"


def _main_errors(argv, capsys) -> tuple[int, list[str]]:
    import importlib.util

    from conftest import LAUNCHER

    spec = importlib.util.spec_from_file_location("distill_gpt", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(argv)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_flash_attention_2_is_refused_in_one_line_where_it_cannot_run(tiny_models, corpus, tmp_path, capsys, monkeypatch):
    code, err = _main_errors(_args(tiny_models, corpus, tmp_path, "--attn_implementation", "flash_attention_2"), capsys)
    assert code == 2 and err == ["error: --attn_implementation flash_attention_2: the cpu accelerator is not CUDA; "
                                 "use sdpa (or eager), or run on a CUDA GPU with flash-attn installed"]
    assert not (tmp_path / "out").exists()
    code, err = _main_errors(_args(tiny_models, corpus, tmp_path, "--attn_implementation", "flash"), capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --attn_implementation: must be one of eager, sdpa, flash_attention_2")

    import transformers.utils

    from fcd_ds.models import check_attn_implementation

    assert not transformers.utils.is_flash_attn_2_available()  # this machine: no flash_attn, no CUDA
    with pytest.raises(UsageError, match="the flash_attn package is not installed"):
        check_attn_implementation("flash_attention_2", "cuda", torch.bfloat16)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)  # a GPU machine with flash_attn
    with pytest.raises(UsageError, match=r"its kernels take fp16 or bf16, and the models are torch.float32; add --bf16"):
        check_attn_implementation("flash_attention_2", "cuda", torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        check_attn_implementation("flash_attention_2", "cuda", dtype)
    check_attn_implementation("eager", "cpu", torch.float32)


def test_finetune_arguments_carry_attn_implementation_and_revision():
    model, *_ = parse_args(["--model_name_or_path", "m", "--attn_implementation", "eager", "--revision", "v1"], finetune=True)
    assert (model.student, model.attn_implementation, model.revision) == ("m", "eager", "v1")
    with pytest.raises(UsageError, match="--attn_implementation: must be one of"):
        parse_args(["--model_name_or_path", "m", "--attn_implementation", "Eager"], finetune=True)


# --revision: a hub cache with two snapshots of one repository, read offline --------------------------

COMMIT_1, COMMIT_2 = "1" * 40, "2" * 40
REPO_ID = "fcd-test/tiny-gpt2"

_HUB_SCRIPT = r"""
import json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from fcd_ds import defaults
from fcd_ds.build import student_model, teacher_model
from fcd_ds.config import parse_args
from fcd_ds.models import load_config, load_model, load_tokenizer
from fcd_ds.plan import plan_run

repo, c1, snap1, train, valid, out = sys.argv[1:]
result = {}
for name, rev in (("main", None), ("c1", c1)):
    model = load_model(repo, AutoModelForCausalLM, torch.float32, "--teacher", revision=rev)
    result[name] = {"config_layers": load_config(repo, "--teacher", revision=rev).num_hidden_layers,
                    "model_layers": len(model.transformer.h), "tokenizer_len": len(load_tokenizer(repo, "--teacher", revision=rev))}
weights = load_file(f"{snap1}/model.safetensors")
model = load_model(repo, AutoModelForCausalLM, torch.float32, "--teacher", revision=c1)
result["c1_weights_are_snapshot_1"] = all(torch.equal(v, weights[k]) for k, v in model.state_dict().items() if k in weights)
for name, extra in (("plan_main", []), ("plan_c1", ["--revision", c1])):
    argv = ["--teacher", repo, "--student_num_layers", "2", "--train_file", train, "--validation_file", valid, "--max_seq_length", "32",
            "--output_dir", out, *extra]
    plan = plan_run(*parse_args(argv, defaults.GPT.flags), defaults.GPT)
    student = student_model(plan.model_args, plan.teacher, plan.teacher_config, torch.float32, plan.task)
    teacher = teacher_model(plan.teacher, torch.float32, plan.task, plan.model_args)
    last = plan.teacher_config.num_hidden_layers - 1  # the pruned student's block 1 is the teacher's last block
    result[name] = {"teacher_layers": plan.teacher_config.num_hidden_layers, "loaded_teacher_layers": len(teacher.transformer.h),
                    "tokenizer_len": len(plan.tokenizer), "revision_recorded": plan.run_config()["model"]["revision"],
                    "student_block_1_is_teacher_last": torch.equal(student.transformer.h[1].mlp.c_fc.weight, teacher.transformer.h[last].mlp.c_fc.weight)}
print("RESULT " + json.dumps(result))
"""


def _hub_cache(tiny_models, root: Path) -> tuple[Path, Path]:
    """``root/hub/models--fcd-test--tiny-gpt2``: snapshot COMMIT_1 = the 4-block tiny teacher, snapshot
    COMMIT_2 = a 3-block model whose tokenizer has one extra token, refs/main -> COMMIT_2 (huggingface_hub's cache layout)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import tiny_config

    repo = root / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    snap1, snap2 = repo / "snapshots" / COMMIT_1, repo / "snapshots" / COMMIT_2
    shutil.copytree(tiny_models["gpt2_teacher"], snap1)
    torch.manual_seed(5)
    config = tiny_config("gpt2", 3)
    config.vocab_size = 520  # room for the extra token
    AutoModelForCausalLM.from_config(config).save_pretrained(snap2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["gpt2_teacher"])
    tokenizer.add_tokens(["<only-on-main>"])
    tokenizer.save_pretrained(snap2)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_2)
    return root / "hub", snap1


def test_revision_selects_a_hub_snapshot_for_config_tokenizer_and_weights(tiny_models, corpus, tmp_path):
    hub, snap1 = _hub_cache(tiny_models, tmp_path)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", _HUB_SCRIPT, REPO_ID, COMMIT_1, str(snap1), str(corpus["train"]), str(corpus["valid"]),
                             str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    got = json.loads(lines[0][len("RESULT "):])
    assert got["main"] == {"config_layers": 3, "model_layers": 3, "tokenizer_len": 513}
    assert got["c1"] == {"config_layers": 4, "model_layers": 4, "tokenizer_len": 512}
    assert got["c1_weights_are_snapshot_1"]
    assert got["plan_main"] == {"teacher_layers": 3, "loaded_teacher_layers": 3, "tokenizer_len": 513, "revision_recorded": None,
                                "student_block_1_is_teacher_last": True}
    assert got["plan_c1"] == {"teacher_layers": 4, "loaded_teacher_layers": 4, "tokenizer_len": 512, "revision_recorded": COMMIT_1,
                              "student_block_1_is_teacher_last": True}
    assert "warning: --revision" not in result.stderr  # a hub name: the revision is used


def test_revision_on_local_folders_warns_once_that_it_has_no_effect(tiny_models, corpus, tmp_path, capsys):
    plan = _plan(_args(tiny_models, corpus, tmp_path, "--student", str(tiny_models["gpt2_student"]), "--revision", "v2"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --revision v2 has no effect: --teacher, --student are local paths (a revision selects a commit of a hub name)"]
    assert plan.run_config()["model"]["revision"] == "v2"
    _plan(_args(tiny_models, corpus, tmp_path, "--student_num_layers", "2"))
    assert "warning:" not in capsys.readouterr().err


# --use_safetensors and --trust_remote_code -------------------------------------------------------------

def _bin_only(tiny_models, tmp_path) -> Path:
    """The tiny teacher with its weights as a pickled pytorch_model.bin and no safetensors file."""
    from safetensors.torch import load_file

    teacher = tmp_path / "bin_teacher"
    shutil.copytree(tiny_models["gpt2_teacher"], teacher)
    torch.save(load_file(str(teacher / "model.safetensors")), teacher / "pytorch_model.bin")
    (teacher / "model.safetensors").unlink()
    return teacher


def test_pickled_weights_are_refused_in_one_line_unless_use_safetensors_false(tiny_models, corpus, tmp_path, capsys):
    teacher = _bin_only(tiny_models, tmp_path)
    student = ["--student", str(tiny_models["gpt2_student"])]
    code, err = _main_errors(_args(tiny_models, corpus, tmp_path, *student, teacher=str(teacher)), capsys)
    assert code == 2 and err == [f"error: --teacher: {teacher} has only pickled .bin weights (unpickling can run code); pass "
                                 "--use_safetensors false if you trust the folder, or save it again with save_pretrained (safetensors)"]
    assert not (tmp_path / "out").exists()
    plan = _plan(_args(tiny_models, corpus, tmp_path, *student, "--use_safetensors", "false", teacher=str(teacher)))
    from fcd_ds.build import teacher_model
    from fcd_ds.models import load_model

    loaded = teacher_model(plan.teacher, torch.float32, plan.task, plan.model_args)
    reference = torch.load(teacher / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items() if k in reference) and len(reference) > 10
    with pytest.raises(UsageError, match=r"it has no safetensors weights: pass --use_safetensors false to read its \.bin files$"):
        load_model(str(teacher), plan.task.auto_class, torch.float32, "--teacher")  # the loader's own refusal, for a folder planned elsewhere


def test_trust_remote_code_is_off_by_default_and_never_implied():
    from fcd_ds.config import FinetuneModelArguments, ModelArguments

    assert ModelArguments().trust_remote_code is False and FinetuneModelArguments().trust_remote_code is False
    model, *_ = parse_args(["--teacher", "t", "--revision", "v1", "--attn_implementation", "eager", "--use_safetensors", "false"])
    assert model.trust_remote_code is False  # no other flag turns it on (the refusal itself: tests/test_safety.py)


# --fp16 --------------------------------------------------------------------------------------------------

def _resolved(tmp_path, flag=True, **sections):
    from fcd_ds.ds_config import load_ds_config, resolve_ds_config

    cfg = {**load_ds_config(str(DEFAULT_DS_CONFIG)), **sections}
    return resolve_ds_config(cfg, TrainArguments(fp16=flag, output_dir=str(tmp_path / "out")))


def test_fp16_enables_dynamic_loss_scaling_with_deepspeeds_defaults(tmp_path):
    from deepspeed.runtime.precision_config import DeepSpeedFP16Config

    from fcd_ds.build import model_dtype
    from fcd_ds.ds_config import FP16_DYNAMIC_LOSS_SCALE, teacher_ds_config, validate_ds_config

    ds_defaults = DeepSpeedFP16Config()
    assert FP16_DYNAMIC_LOSS_SCALE == {k: getattr(ds_defaults, k) for k in FP16_DYNAMIC_LOSS_SCALE}  # the installed DeepSpeed's own
    cfg = _resolved(tmp_path)
    assert cfg["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    assert cfg["bf16"] == {"enabled": False} and model_dtype(cfg) == torch.float16
    validate_ds_config(cfg, "zero2.json", 1, "cuda", fp16_flag=True)  # DeepSpeed's own parser accepts it on a GPU
    kept = _resolved(tmp_path, fp16={"enabled": False, "initial_scale_power": 12, "hysteresis": 4})
    assert kept["fp16"] == {**FP16_DYNAMIC_LOSS_SCALE, "initial_scale_power": 12, "hysteresis": 4, "enabled": True}
    assert _resolved(tmp_path, flag=False, fp16={"enabled": "auto"})["fp16"] == {"enabled": False}
    assert _resolved(tmp_path, fp16={"enabled": "auto"})["fp16"]["enabled"] is True
    teacher = teacher_ds_config(cfg)
    assert teacher["fp16"] == {"enabled": True} and teacher["bf16"] == {"enabled": False}  # no optimizer: nothing to scale
    assert teacher_ds_config(_resolved(tmp_path, flag=False))["fp16"] == {"enabled": False}
    validate_ds_config(teacher, "teacher", 1, "cuda")


def test_fp16_refusals_are_one_line(tmp_path, tiny_models, corpus, capsys):
    with pytest.raises(UsageError, match=r"^--bf16 and --fp16 both set the precision; pass one"):
        TrainArguments(bf16=True, fp16=True)
    with pytest.raises(UsageError, match=r"^--fp16: the DeepSpeed JSON enables bf16; set its bf16.enabled false, or drop --fp16$"):
        _resolved(tmp_path, bf16={"enabled": True})
    with pytest.raises(UsageError, match=r"^--deepspeed_config: the JSON enables both bf16 and fp16; enable one"):
        _resolved(tmp_path, flag=False, bf16={"enabled": True}, fp16={"enabled": True})
    code, err = _main_errors(_args(tiny_models, corpus, tmp_path, "--student_num_layers", "2", "--fp16"), capsys)
    assert code == 2 and err == ["error: --fp16: the CPU accelerator trains in fp32 or bf16 only (fp16 with loss scaling is for GPUs); drop --fp16 (--bf16 for bf16)"]
    code, err = _main_errors(_args(tiny_models, corpus, tmp_path, "--student_num_layers", "2", "--fp16", "--bf16"), capsys)
    assert code == 2 and err == ["error: --bf16 and --fp16 both set the precision; pass one (--bf16 where the GPU has it)"]


def test_the_loss_scale_accessors_exist_on_every_deepspeed_fp16_optimizer():
    """train/loss_scale reads ``engine.optimizer.loss_scale`` and metrics.json ``engine.skipped_steps``
    (fcd_ds.build.current_loss_scale): both must exist on the installed DeepSpeed's fp16 paths."""
    import inspect

    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for cls in (FP16_Optimizer, FP16_UnfusedOptimizer, DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3):
        assert isinstance(inspect.getattr_static(cls, "loss_scale"), property), cls
    assert "self.skipped_steps += 1" in inspect.getsource(DeepSpeedEngine._take_model_step)


# The fused logit loss computes its gradients in forward: a scaled backward must scale them -------------

def _fused_grads(dtype, scale, weight_scale=0.02):
    from fcd_ds.losses.fused import fused_linear_ce_kd

    g = torch.Generator().manual_seed(0)
    b, n, c, c_t, v = 2, 64, 32, 48, 512
    h, w, bias = torch.randn(b, n, c, generator=g), torch.randn(v, c, generator=g) * weight_scale, torch.randn(v, generator=g) * 0.1
    h_t, w_t = torch.randn(b, n, c_t, generator=g), torch.randn(v, c_t, generator=g) * 0.02
    ids, mask = torch.randint(0, v, (b, n), generator=g), torch.ones(b, n, dtype=torch.long)
    leaves = [x.to(dtype).requires_grad_() for x in (h, w, bias)]
    out = fused_linear_ce_kd(leaves[0], leaves[1], h_t.to(dtype), w_t.to(dtype), ids, mask, student_bias=leaves[2], chunk_size=48)
    out.loss.backward(gradient=torch.tensor(scale))
    return [x.grad for x in leaves]


def test_a_scaled_backward_scales_the_fused_gradients_exactly():
    plain, scaled = _fused_grads(torch.float32, 1.0), _fused_grads(torch.float32, 1024.0)
    for p, s in zip(plain, scaled):
        assert torch.equal(s, p * 1024) and p.abs().max() > 0


def test_fp16_gradients_survive_under_a_loss_scale():
    """In fp16 a small head's gradients underflow unscaled (what loss scaling exists for); under DeepSpeed's
    scale they must come out as the float32 ones: the fused loss may not form them in fp16 before the scale."""
    reference = _fused_grads(torch.float32, 1.0, weight_scale=2e-4)
    unscaled = _fused_grads(torch.float16, 1.0, weight_scale=2e-4)[0].float()
    assert (unscaled == 0).float().mean() > 0.01  # the hidden-state gradient underflows in fp16 without a scale
    for ref, got in zip(reference, _fused_grads(torch.float16, 1024.0, weight_scale=2e-4)):
        got = got.float() / 1024
        assert ((got - ref).norm() / ref.norm()).item() < 2e-3 and (got == 0).sum() == 0
