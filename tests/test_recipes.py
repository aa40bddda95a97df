"""Recipe files (``--config``): every shipped recipe parses and passes the checks; a launcher's default
recipe is its default run; a finished run's run_config.json given back plans the same run; flags on the
command line override a recipe; a key that is no flag is one line naming the closest ones."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from conftest import REPO
from fcd_ds import defaults
from fcd_ds.runtime.checkpoint import comparable_run_config
from fcd_ds.config import parse_args
from fcd_ds.errors import UsageError
from fcd_ds.plan import plan_run

RECIPES = REPO / "recipes"
LAUNCHERS = {"distill_gpt": defaults.GPT, "distill_bert": defaults.BERT, "distill_roberta": defaults.ROBERTA,
             "finetune_teacher": defaults.FINETUNE}


def _parsed(launcher, argv) -> dict:
    groups = parse_args([str(a) for a in argv], launcher.flags, finetune=launcher.finetune)
    out = {}
    for group in groups:
        out.update({k: v for k, v in asdict(group).items() if k != "config"})
    return out


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_a_launchers_default_recipe_is_its_default_run(name):
    launcher = LAUNCHERS[name]
    assert _parsed(launcher, ["--config", RECIPES / f"{name}.yaml"]) == _parsed(launcher, [])


@pytest.mark.parametrize("name", ["distill_gpt", "finetune_teacher"])  # the encoder distillers' default teacher is made by `make teacher-bert`
def test_a_default_recipe_plans_the_default_run(name, tmp_path):
    launcher = LAUNCHERS[name]
    out = ["--output_dir", tmp_path / "out"]
    with_recipe = plan_run(*parse_args([str(a) for a in ["--config", RECIPES / f"{name}.yaml", *out]], launcher.flags, finetune=launcher.finetune), launcher)
    without = plan_run(*parse_args([str(a) for a in out], launcher.flags, finetune=launcher.finetune), launcher)
    assert comparable_run_config(with_recipe.run_config(1)) == comparable_run_config(without.run_config(1))
    assert with_recipe.ds_config == without.ds_config


def test_the_large_recipe_parses_and_its_deepspeed_json_and_batch_pass_the_checks():
    """Its teacher (/models/Llama-3.1-8B) is not on this machine, so it is parsed and checked, not planned."""
    from deepspeed.accelerator import get_accelerator

    from fcd_ds.ds_config import load_ds_config, resolve_ds_config, validate_ds_config

    model, data, distill, train = parse_args(["--config", str(RECIPES / "llama8b_to_1b_2x8.yaml")], defaults.GPT.flags)
    assert (model.teacher, model.student_num_layers, distill.weights) == (
        "/models/Llama-3.1-8B", 5, {"ce": 1.0, "fcd": 1.0, "kd": 1.0, "hidden_mse": 0.0, "minilm": 0.0, "dist": 0.0})
    assert data.dataset_prepared_path == "/data/prepared-llama-2048" and data.max_seq_length == 2048
    assert model.attn_implementation == "flash_attention_2"
    cfg = resolve_ds_config(load_ds_config(str(REPO / train.deepspeed_config)), train, defaults.GPT.micro_batch)
    assert cfg["bf16"]["enabled"] and cfg["zero_optimization"]["stage"] == 3
    assert cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 16 * data.max_seq_length == 524_288
    validate_ds_config(cfg, train.deepspeed_config, 16, "cuda")  # as on the 2 x 8 GPUs


def test_a_finished_runs_run_config_given_back_plans_the_same_run_and_flags_override_it(finished_run, tmp_path):
    saved = json.loads((finished_run / "run_config.json").read_text())
    out = tmp_path / "again"
    argv = ["--config", str(finished_run / "run_config.json"), "--output_dir", str(out)]
    plan = plan_run(*parse_args(argv, defaults.GPT.flags), defaults.GPT)
    again = comparable_run_config(plan.run_config(1))
    expected = comparable_run_config(saved)
    expected["train"]["output_dir"] = str(out)
    assert again == expected and plan.ds_config == saved["deepspeed_config"]
    override = plan_run(*parse_args([*argv, "--max_steps", "5", "--kd_weight", "0.5", "--loss", "ce+fcd+kd"], defaults.GPT.flags), defaults.GPT)
    assert override.train_args.max_steps == 5 and override.distill_args.kd_weight == 0.5
    assert override.data_args.train_file == saved["data"]["train_file"]  # the rest still from the recipe


def test_a_recipe_with_a_key_that_is_no_flag_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_step: 10\nfcd_wieght: 2\n")
    with pytest.raises(UsageError) as caught:
        parse_args(["--config", str(bad)], defaults.GPT.flags)
    assert str(caught.value) == (f"--config: {bad} sets max_step, fcd_wieght, which this launcher has no flag for "
                                 "(closest: max_steps, fcd_weight); fix or remove them")
    planted = tmp_path / "planted.yaml"
    planted.write_text("max_steps: !!python/object/apply:os.system ['touch x']\n")  # safe_load builds no objects
    with pytest.raises(UsageError, match=r"--config: cannot read .*planted.yaml \(could not determine a constructor"):
        parse_args(["--config", str(planted)], defaults.GPT.flags)
    with pytest.raises(UsageError, match="does not exist"):
        parse_args(["--config", str(tmp_path / "missing.yaml")], defaults.GPT.flags)
    assert not Path("x").exists()
