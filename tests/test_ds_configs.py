"""Every shipped DeepSpeed JSON loads, resolves and passes DeepSpeed's own config validation."""

import json
from pathlib import Path

import pytest

from fcd_ds.config import DS_CONFIG_DIR, TrainArguments
from fcd_ds.ds_config import load_ds_config, resolve_ds_config, teacher_ds_config, zero_stage
from fcd_ds.errors import UsageError

SHIPPED = sorted(DS_CONFIG_DIR.glob("*.json"))


def test_the_shipped_set():
    assert {p.stem for p in SHIPPED} == {"zero0", "zero1", "zero2", "zero3", "zero3_offload"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
@pytest.mark.parametrize("bf16", [False, True])
def test_shipped_config_is_valid_for_deepspeed(path, bf16):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = resolve_ds_config(load_ds_config(str(path)), TrainArguments(max_steps=50, bf16=bf16))
    ds = DeepSpeedConfig(cfg)  # DeepSpeed's own parsing and checks (world size 1 here)
    assert ds.zero_optimization_stage == int(path.stem[4])
    assert ds.bfloat16_config.enabled is bf16
    assert ds.train_micro_batch_size_per_gpu == 4 and ds.gradient_accumulation_steps == 1
    assert cfg["scheduler"]["params"]["total_num_steps"] == 50
    assert cfg["optimizer"]["params"]["lr"] == cfg["scheduler"]["params"]["warmup_max_lr"] == 5e-4
    teacher = teacher_ds_config(cfg)
    assert "optimizer" not in teacher and "scheduler" not in teacher
    assert zero_stage(teacher) == (3 if zero_stage(cfg) == 3 else 0)
    DeepSpeedConfig(teacher)


def test_cli_flags_override_the_json_and_fill_auto():
    raw = load_ds_config(str(DS_CONFIG_DIR / "zero2.json"))
    args = TrainArguments(max_steps=10, learning_rate=1e-3, warmup_steps=3, per_device_train_batch_size=2,
                          gradient_accumulation_steps=4)
    cfg = resolve_ds_config(raw, args)
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["optimizer"]["params"]["lr"] == 1e-3 and cfg["scheduler"]["params"]["warmup_num_steps"] == 3
    assert "train_batch_size" not in cfg
    assert raw["optimizer"]["params"]["lr"] == "auto"  # the loaded JSON itself is not modified
    fixed = {**raw, "train_micro_batch_size_per_gpu": 8}
    assert resolve_ds_config(fixed, TrainArguments())["train_micro_batch_size_per_gpu"] == 8
    # the launcher's micro-batch (distill_gpt: 8) fills only "auto": a number in the JSON is kept
    assert resolve_ds_config(raw, TrainArguments(), micro_batch=8)["train_micro_batch_size_per_gpu"] == 8
    assert resolve_ds_config({**raw, "train_micro_batch_size_per_gpu": 2}, TrainArguments(), micro_batch=8)["train_micro_batch_size_per_gpu"] == 2


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "cannot read"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"compression_training": {}}', "compression_training"),
        ('{"zero_optimization": {"stage": "auto"}}', "no flag fills zero_optimization.stage"),
    ],
)
def test_bad_json_gives_one_line_naming_the_flag(tmp_path, content, message):
    path = tmp_path / "ds.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=message) as err:
        resolve_ds_config(load_ds_config(str(path)), TrainArguments())
    assert str(err.value).startswith("--deepspeed_config") and "\n" not in str(err.value)


def test_missing_json():
    with pytest.raises(UsageError, match="does not exist"):
        load_ds_config("/nonexistent/ds.json")


def test_a_non_editable_install_ships_the_json_inside_the_package(tmp_path):
    """`pip install fcd_ds` (a wheel, not the source tree) finds its default DeepSpeed JSON."""
    import subprocess
    import sys
    import zipfile

    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", str(repo), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)],
                   check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("fcd_ds-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert {p.name for p in (site / "fcd_ds" / "ds_configs").glob("*.json")} == {p.name for p in SHIPPED}
    probe = "from fcd_ds.config import DEFAULT_DS_CONFIG as d; print(d, d.is_file())"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": ""}).stdout.split()
    assert out == [str(site / "fcd_ds" / "ds_configs" / "zero2.json"), "True"]


def test_teacher_offload_flag_makes_the_teacher_zero3_with_offload_param():
    student2 = resolve_ds_config(load_ds_config(str(DS_CONFIG_DIR / "zero2.json")), TrainArguments())
    assert zero_stage(teacher_ds_config(student2)) == 0
    offloaded = teacher_ds_config(student2, "cpu")
    assert offloaded["zero_optimization"] == {"stage": 3, "stage3_max_reuse_distance": 0, "stage3_max_live_parameters": 10**8,
                                              "offload_param": {"device": "cpu", "pin_memory": False}}
    # a forward-only teacher releases what it gathers: never whole on a rank after a forward
    z3 = teacher_ds_config(resolve_ds_config(load_ds_config(str(DS_CONFIG_DIR / "zero3.json")), TrainArguments()))["zero_optimization"]
    assert z3["stage3_max_reuse_distance"] == 0 and z3["stage3_max_live_parameters"] == 2 * z3["stage3_prefetch_bucket_size"]
    student3 = resolve_ds_config(load_ds_config(str(DS_CONFIG_DIR / "zero3.json")), TrainArguments())
    student3["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    assert teacher_ds_config(student3)["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert "offload_param" not in teacher_ds_config(student3, "none")["zero_optimization"]
    assert teacher_ds_config(student3, "none")["zero_optimization"]["stage"] == 3
