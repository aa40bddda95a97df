"""Bad input stops before any work: exit 2, one line naming the flag and the fix, output dir untouched."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import LAUNCHER, run_plain, snapshot
from fcd_ds.output_dir import claim

spec = importlib.util.spec_from_file_location("distill_gpt", LAUNCHER)
distill_gpt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(distill_gpt)


@pytest.fixture
def base_args(tiny_models, corpus, tmp_path):
    return ["--teacher", tiny_models["gpt2_teacher"], "--student_num_layers", "2", "--train_file", corpus["train"],
            "--validation_file", corpus["valid"], "--max_seq_length", "32", "--output_dir", tmp_path / "out"]


def run_main(args, capsys) -> tuple[int, list[str]]:
    code = distill_gpt.main([str(a) for a in args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return code, err


def _different_tokenizer_student(tiny_models, tmp_path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["completely other text for another vocabulary"] * 20, trainers.BpeTrainer(vocab_size=280, show_progress=False))
    path = tmp_path / "other_student"
    AutoModelForCausalLM.from_pretrained(tiny_models["gpt2_student"]).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)
    return path


CASES = {
    "layer index": (["--layer_map", "0:9"], "--layer_map: teacher block 9 does not exist"),
    "missing train file": (["--train_file", "/nonexistent/train.txt"], "--train_file: /nonexistent/train.txt does not exist"),
    "sequence too long": (["--max_seq_length", "256"], "--max_seq_length: 256 exceeds the teacher's 128 positions"),
    "negative weight": (["--fcd_weight", "-1"], "--fcd_weight: must be >= 0"),
    "two student sources": (["--student_config", "x.json"], "--student_config and --student_num_layers both choose"),
    "resume without checkpoint": (["--resume"], "--resume: no checkpoint"),
    "unknown flag": (["--fcd_wieght", "2"], "unknown argument(s) --fcd_wieght 2; see --help"),
    "unknown loss term": (["--loss", "ce+fdc"], "--loss: cannot read 'ce+fdc'"),
    "loss term twice": (["--loss", "ce+kd+kd"], "--loss: 'ce+kd+kd' names a term twice"),
    "weight of a term not in --loss": (["--loss", "ce+fcd", "--kd_weight", "1"], "--kd_weight: kd is not in --loss ce+fcd; add it (--loss ce+fcd+kd)"),
    "every weight zero": (["--loss", "ce+fcd", "--ce_weight", "0", "--fcd_weight", "0"], "every loss weight is 0"),
    "pruned map without pruning": (["--layer_map", "pruned", "--loss", "ce+fcd"], None),
    "minilm relation heads": (["--loss", "ce+minilm", "--minilm_relation_heads", "3"], "--minilm_relation_heads: 3 does not divide"),
    "minilm layer map": (["--loss", "ce+minilm", "--minilm_layer_map", "5:0"], "--minilm_layer_map: student block 5 does not exist"),
    "zero warm-up": (["--warmup_steps", "0"], "--warmup_steps: must be >= 1"),
    "NaN weight": (["--fcd_weight", "nan"], "--fcd_weight: must be a finite number, got nan"),
    "infinite learning rate": (["--learning_rate", "inf"], "--learning_rate: must be a finite number, got inf"),
    "stack pairs value": (["--fcd_stack_pairs", "yes"], "--fcd_stack_pairs: must be one of ('auto', 'true', 'false'), got 'yes'"),
    "sequence positions with pooled": (["--fcd_sequence_relation", "pooled", "--fcd_sequence_positions", "64"],
                                       "--fcd_sequence_positions: applies to --fcd_sequence_relation position only"),
    "loss balancer without a logit term": (["--loss", "ce+fcd", "--loss_balancer", "1"],
                                           "--loss_balancer: needs a logit term ('kd', 'dist') and a feature term"),
    "grad norms without a block-feature term": (["--loss", "ce+kd", "--grad_norm_steps", "2"],
                                                "--grad_norm_steps: reads the --layer_map student blocks of a block-feature term"),
    "fcd weight schedule value": (["--fcd_weight_schedule", "step"], "--fcd_weight_schedule: must be one of ('constant', 'linear', 'cosine'), got 'step'"),
    "host memory reuse value": (["--host_memory_reuse", "on"], "--host_memory_reuse: must be one of ('auto', 'true', 'false'), got 'on'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_flag(case, base_args, capsys, tmp_path):
    extra, message = CASES[case]
    if message is None:  # a pruned map is valid for the pruned student of base_args: it must plan, not fail
        from fcd_ds import defaults
        from fcd_ds.config import parse_args
        from fcd_ds.plan import plan_run

        plan = plan_run(*parse_args([str(a) for a in base_args + extra], defaults.GPT.flags), defaults.GPT)
        assert [(p.student, p.teacher) for p in plan.pairs] == [(0, 0), (1, 3)]  # kept_teacher_blocks(4, 2)
        return
    code, err = run_main(base_args + extra, capsys)  # base_args already has --student_num_layers
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {message}"), err
    assert not (tmp_path / "out").exists()


def test_unreadable_deepspeed_json(base_args, capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_micro_batch_size_per_gpu": 4,,}')
    code, err = run_main(base_args + ["--deepspeed_config", bad], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: --deepspeed_config: cannot read {bad} as JSON")


def test_student_with_a_different_tokenizer(base_args, capsys, tiny_models, tmp_path):
    student = _different_tokenizer_student(tiny_models, tmp_path)
    args = [a for a in base_args if a not in ("--student_num_layers", "2")] + ["--student", student]
    code, err = run_main(args, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --student: its tokenizer differs from the teacher's")


def test_output_dir_with_another_runs_checkpoints_is_left_alone(base_args, capsys, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints" / "global_step7").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("global_step7")
    (out / "checkpoints" / "global_step7" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (out / "metrics.json").write_text(json.dumps({"steps": 7}))
    (out / "my_notes.txt").write_text("mine")
    claim(out, ["checkpoints", "metrics.json"])  # as that run recorded them
    before = snapshot(out)
    code, err = run_main(base_args, capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: --output_dir:") and "--resume" in err[0] and "--overwrite_output_dir" in err[0]
    assert snapshot(out) == before
    code, err = run_main(base_args + ["--resume", "--overwrite_output_dir"], capsys)
    assert code == 2 and "contradict" in err[0] and snapshot(out) == before


def test_exit_code_and_single_line_from_a_real_process(base_args):
    result = run_plain(base_args + ["--layer_map", "7:0"])
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --layer_map: student block 7 does not exist (the student has 2 blocks, 0-1)"]


def test_help_lists_the_flags():
    result = run_plain(["--help"])
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--teacher", "--student_num_layers", "--layer_map", "--fcd_weight", "--kd_temperature", "--deepspeed_config",
                 "--resume", "--overwrite_output_dir", "--max_seq_length", "--peak_tflops"):
        assert flag in result.stdout


def test_auto_resume_refuses_another_run_and_restarts_an_attempt_without_checkpoint(base_args, tmp_path, capsys):
    """--auto_resume decides from run_config.json: another run's folder is refused naming what differs;
    the same run without a checkpoint starts afresh; with a checkpoint it resumes."""
    from fcd_ds.config import parse_args
    from fcd_ds.plan import plan_run

    out = tmp_path / "out"
    plan = plan_run(*parse_args([str(a) for a in base_args]), distill_gpt.LAUNCHER)
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps(plan.run_config(2)))
    (out / "train_log.jsonl").write_text('{"step": 1}\n')
    (out / "my_notes.txt").write_text("mine")
    claim(out, ["run_config.json", "train_log.jsonl", "checkpoints"])  # an earlier attempt of fcd_ds recorded its names
    before = snapshot(out)
    code, err = run_main(base_args + ["--auto_resume", "--learning_rate", "1e-3", "--kd_weight", "0.5"], capsys)
    assert code == 2 and len(err) == 1 and snapshot(out) == before
    assert err[0].startswith(f"error: --auto_resume: {out} holds another run (it differs in ")
    assert "distill.kd_weight" in err[0] and "train.learning_rate" in err[0]
    same = plan_run(*parse_args([str(a) for a in base_args + ["--auto_resume"]]), distill_gpt.LAUNCHER)
    assert not same.train_args.resume and same.train_args.overwrite_output_dir  # an attempt that saved nothing
    (out / "checkpoints" / "global_step3").mkdir(parents=True)
    (out / "checkpoints" / "global_step3" / "trainer_state.json").write_text(json.dumps({"data_layout": same.layout(1)}))
    (out / "checkpoints" / "latest").write_text("global_step3")
    again = plan_run(*parse_args([str(a) for a in base_args + ["--auto_resume"]]), distill_gpt.LAUNCHER)
    assert again.train_args.resume and not again.train_args.overwrite_output_dir
    code, err = run_main(base_args + ["--auto_resume", "--resume"], capsys)
    assert code == 2 and err == ["error: --resume and --auto_resume contradict each other; pass one"]
    # A run_config.json of an older fcd_ds, without an argument added since: the same run when that argument is
    # at its default (a job requeued after an upgrade resumes), another run when it is not.
    older = json.loads((out / "run_config.json").read_text())
    del older["distill"]["fcd_sequence_positions"], older["train"]["grad_norm_steps"]
    (out / "run_config.json").write_text(json.dumps(older))
    upgraded = plan_run(*parse_args([str(a) for a in base_args + ["--auto_resume"]]), distill_gpt.LAUNCHER)
    assert upgraded.train_args.resume
    code, err = run_main(base_args + ["--auto_resume", "--fcd_sequence_positions", "8"], capsys)
    assert code == 2 and len(err) == 1 and "(it differs in distill.fcd_sequence_positions)" in err[0], err


# --- bad input that used to be found late (issue 19): each is one line at plan time now ---------------

def _ds_json(tmp_path, **extra) -> Path:
    path = tmp_path / "ds.json"
    cfg = json.loads((Path(LAUNCHER).parents[1] / "ds_configs" / "zero2.json").read_text())
    for key, value in extra.items():
        section, _, sub = key.partition("__")
        if sub:
            cfg[section][sub] = value
        else:
            cfg[section] = value
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("extra, message", [
    ({"zero_optimization__overlap_com": True}, "DeepSpeed refuses {path}: 1 validation error for DeepSpeedZeroConfig; overlap_com; Extra inputs are not permitted"),
    ({"zero_optimisation": {"stage": 2}}, "{path} has top-level key(s) ['zero_optimisation'] that DeepSpeed does not read"),
    ({"fp16": {"enabled": True}}, "fp16 is enabled in {path}, and the CPU accelerator trains in fp32 or bf16 only"),
    # a numeric accumulation beside it (with the accumulation 'auto', train_batch_size derives it, as DeepSpeed does)
    ({"train_batch_size": 64, "gradient_accumulation_steps": 1}, "train_batch_size 64 in {path} is not micro-batch 4 x gradient accumulation 1 x 1 rank(s) = 4"),
])
def test_a_deepspeed_json_deepspeed_would_refuse_is_refused_at_plan_time(extra, message, base_args, capsys, tmp_path):
    path = _ds_json(tmp_path, **extra)
    code, err = run_main(base_args + ["--deepspeed_config", path, "--per_device_train_batch_size", 4], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: --deepspeed_config: {message.format(path=path)}")
    assert not (tmp_path / "out").exists()


def test_a_truncated_teacher_safetensors_is_refused_before_pruning(base_args, tiny_models, capsys, tmp_path):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_models["gpt2_teacher"], teacher)
    weights = teacher / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)  # a copy cut off half-way
    args = [str(teacher) if str(a) == str(tiny_models["gpt2_teacher"]) else a for a in base_args]
    code, err = run_main(args, capsys)
    assert code == 2 and err == [f"error: --teacher: {weights} is truncated ({size // 2:,} bytes, its header needs {size:,}); copy or save it again"]


def test_latest_naming_a_missing_folder_names_the_newest_complete_checkpoint(base_args, capsys, tmp_path):
    out = tmp_path / "out"
    for step in (2, 4):
        (out / "checkpoints" / f"global_step{step}").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("global_step6")  # step 6's folder was deleted by hand
    claim(out, ["checkpoints"])
    before = snapshot(out)
    code, err = run_main(base_args + ["--resume"], capsys)
    latest = out / "checkpoints" / "latest"
    assert code == 2 and err == [f"error: --resume: {latest} names 'global_step6', which does not exist; the newest complete one is "
                                 f"global_step4: write that name into {latest}, or drop --resume to start a new run"]
    assert snapshot(out) == before


def _csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("train, valid, message", [
    (("text,label", ["good film,1", "bad film,0", "fine film,", "dull film,0"]), None,
     "--label_column: 1 row(s) of the train data have no label (the first: row 2); fill them or drop those rows"),
    (("text,label", ["good film,1", ",0", "dull film,0"]), None,
     "--text_column: 1 row(s) of the train data have an empty 'text' (the first: row 1); fill them or drop those rows"),
    (("text,label", ["good film,1", "   ,0", "dull film,0"]), None,
     "--text_column: 1 row(s) of the train data have an empty 'text' (the first: row 1); fill them or drop those rows"),
    (("text,stars", ["good film,1", "bad film,0"]), ("text,label", ["ok,1", "meh,0"]),
     "--label_column: no column 'label' in the train data (columns: text, stars); pass --label_column NAME"),
])
def test_empty_cells_and_missing_columns_of_a_classification_csv(train, valid, message, tmp_path):
    from fcd_ds.config import DataArguments
    from fcd_ds.errors import UsageError
    from fcd_ds.tasks.classification import load_raw, read_label_spec

    files = {"train_file": str(_csv(tmp_path / "train.csv", train[0], train[1]))}
    if valid:
        files["validation_file"] = str(_csv(tmp_path / "valid.csv", valid[0], valid[1]))
    args = DataArguments(task="sequence_classification", **files)
    with pytest.raises(UsageError) as caught:
        read_label_spec(load_raw(args), args)
    assert str(caught.value) == message


def test_integer_labels_read_as_floats_keep_their_integer_class_names(tmp_path):
    """A 0/1 column that pandas reads as float in one file (a missing cell elsewhere, filled since) and as
    int in the other gives the classes '0' and '1', not '0.0', '1.0' and '0', '1'."""
    from fcd_ds.config import DataArguments
    from fcd_ds.tasks.classification import load_raw, read_label_spec

    train = _csv(tmp_path / "train.csv", "text,label", ["good film,1.0", "bad film,0.0", "dull film,0.0"])
    valid = _csv(tmp_path / "valid.csv", "text,label", ["ok film,1", "meh film,0"])
    args = DataArguments(task="sequence_classification", train_file=str(train), validation_file=str(valid))
    spec = read_label_spec(load_raw(args), args)
    assert spec.names == ("0", "1") and not spec.is_regression
