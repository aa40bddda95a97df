"""Export and tracking: the exported model card carries the Hub metadata (read back by huggingface_hub),
and ``--report_to`` sends the scalars to TensorBoard, Weights & Biases (offline) or neither."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, ModelCardData

from conftest import assert_ok, read_train_log, run_launcher, run_plain
from fcd_ds import defaults
from fcd_ds.config import TrainArguments, parse_args
from fcd_ds.errors import UsageError
from fcd_ds.runtime.metrics import MetricLogger
from fcd_ds.model_card import hub_origin, model_card
from fcd_ds.output_dir import read_manifest
from fcd_ds.plan import plan_run

METRICS = {"teacher_eval_perplexity": 36.8, "student_eval_perplexity_initial": 4.6e6, "student_eval_perplexity": 206.2, "steps": 120}


def wandb_records(run_dir: Path) -> tuple[list[dict], dict]:
    """(history rows, config with the run id as ``_run_id``) of an offline wandb run folder, read from its ``.wandb`` file: W&B's 7-byte
    header, then LevelDB log records (32 KiB blocks; 7-byte record headers: CRC32C, little-endian length,
    type 1 FULL / 2 FIRST / 3 MIDDLE / 4 LAST) holding ``wandb.proto`` ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("*.wandb")).read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, chunk, rows, config, block = 7, b"", [], {}, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            kind_name = record.WhichOneof("record_type")
            if kind_name == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
            elif kind_name in ("run", "config"):  # the run record holds the init config, config records later updates
                update = record.run.config.update if kind_name == "run" else record.config.update
                if kind_name == "run":
                    config["_run_id"] = record.run.run_id
                config.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in update})
    return rows, config


# --- --report_to -------------------------------------------------------------------------------------


def _close(logger: MetricLogger) -> None:
    """Close, then end this process's wandb service: wandb-core writes a second run of one service's life
    to disk only when the service ends (a launch has one run, ended with its process)."""
    import wandb

    logger.close()
    wandb.teardown()


def test_report_to_takes_transformers_values_and_refuses_the_rest_in_one_line(monkeypatch):
    assert TrainArguments().report_to == ["tensorboard"]
    assert TrainArguments(report_to="wandb,tensorboard").report_to == ["wandb", "tensorboard"]
    assert TrainArguments(report_to=["tensorboard", "wandb"]).report_to == ["tensorboard", "wandb"]  # a recipe's list
    assert TrainArguments(report_to="all").report_to == ["tensorboard", "wandb"]  # wandb is installed (dev extra)
    assert TrainArguments(report_to="none").report_to == []
    assert parse_args(["--report_to", "wandb"], defaults.GPT.flags)[3].report_to == ["wandb"]
    with pytest.raises(UsageError) as caught:
        TrainArguments(report_to="tensorbord")
    assert str(caught.value) == "--report_to: 'tensorbord' is not one of tensorboard, wandb, all, none; pick from those (several joined by commas)"
    with pytest.raises(UsageError, match="none stands alone"):
        TrainArguments(report_to="none,wandb")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: importlib finds no spec
    with pytest.raises(UsageError) as caught:
        TrainArguments(report_to="tensorboard,wandb")
    assert "`pip install wandb`" in str(caught.value) and "\n" not in str(caught.value)
    assert TrainArguments(report_to="all").report_to == ["tensorboard"]


def test_an_unknown_report_to_stops_the_launcher_in_one_line(tmp_path):
    result = run_plain(["--report_to", "mlflow", "--output_dir", tmp_path / "out"])
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: --report_to: 'mlflow' is not one of tensorboard, wandb, all, none; pick from those (several joined by commas)"]
    assert not (tmp_path / "out").exists()


def test_the_logger_writes_each_sink_it_is_given_and_a_resume_continues_the_wandb_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_PROJECT", "fcd_ds_tests")
    out = tmp_path / "run"
    out.mkdir()
    logger = MetricLogger(out / "runs", out / "train_log.jsonl", report_to=["wandb"], wandb_dir=out, run_config={"train": {"max_steps": 3}})
    logger.log_dict(1, {"train/loss/total": 2.5, "train/lr": 1e-4})
    logger.log_dict(2, {"train/loss/total": 2.0, "train/lr": 2e-4})
    _close(logger)
    assert not (out / "runs").exists()  # no tensorboard in --report_to: no events
    run_id = (out / "wandb" / "fcd_ds_run_id").read_text().strip()
    (first,) = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))  # offline by default
    rows, config = wandb_records(first)
    assert [(r["_step"], r["train/loss/total"], r["train/lr"]) for r in rows] == [(1, 2.5, 1e-4), (2, 2.0, 2e-4)]
    assert config["train"] == {"max_steps": 3} and config["_run_id"] == run_id

    resumed = MetricLogger(out / "runs", out / "train_log.jsonl", report_to=["wandb", "tensorboard"], wandb_dir=out,
                           run_config={"train": {"max_steps": 3}}, resume_step=2, resume_rows=2)
    resumed.log_dict(3, {"train/loss/total": 1.5, "train/lr": 3e-4})
    _close(resumed)
    assert (out / "wandb" / "fcd_ds_run_id").read_text().strip() == run_id
    (second,) = [r for r in (out / "wandb").glob("offline-run-*") if r != first]
    rows, config = wandb_records(second)
    assert config["_run_id"] == run_id and [r["_step"] for r in rows] == [3]  # the same run: `wandb sync` joins them
    assert list((out / "runs").glob("events.out.tfevents.*"))
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]

    quiet = tmp_path / "quiet"
    quiet.mkdir()
    logger = MetricLogger(quiet / "runs", quiet / "train_log.jsonl", report_to=[], wandb_dir=quiet)
    logger.log_dict(1, {"train/loss/total": 2.5})
    _close(logger)
    assert sorted(p.name for p in quiet.iterdir()) == ["train_log.jsonl"]  # --report_to none: the JSON lines alone

    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's own WANDB_MODE wins over offline
    logger = MetricLogger(quiet / "runs", None, report_to=["wandb"], wandb_dir=quiet)
    logger.log_dict(1, {"train/loss/total": 2.5})
    _close(logger)
    assert not list((quiet / "wandb").glob("offline-run-*"))


def test_a_wandb_run_logs_the_training_scalars_and_its_card_names_the_teachers_origin(tiny_models, corpus, tmp_path, monkeypatch):
    """One launch: --report_to wandb alone (no TensorBoard events), a teacher whose fcd_ds card records its Hub origin."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_models["gpt2_teacher"], teacher)
    origin = ModelCardData(base_model="fcd-ds-tests/tiny-gpt2", license="mit", library_name="transformers", tags=["fcd_ds"])
    (teacher / "README.md").write_text(f"---\n{origin.to_yaml()}\n---\n# tiny test teacher\n", encoding="utf-8")
    out = tmp_path / "run"
    result = run_launcher(["--teacher", teacher, "--student_num_layers", 2, "--train_file", corpus["train"], "--validation_file", corpus["valid"],
                           "--max_seq_length", 32, "--per_device_train_batch_size", 2, "--max_steps", 3, "--max_eval_samples", 4,
                           "--report_to", "wandb", "--output_dir", out], ranks=1, env={"WANDB_PROJECT": "fcd_ds_tests"})
    assert_ok(result)
    assert not (out / "runs").exists() and "wandb" in read_manifest(out)
    (run_dir,) = sorted((out / "wandb").glob("offline-run-*"))
    rows, config = wandb_records(run_dir)
    logged = read_train_log(out)
    train_rows = [r for r in rows if "train/loss/total" in r]
    assert [r["_step"] for r in train_rows] == [r["step"] for r in logged] == [1, 2, 3]
    for w, j in zip(train_rows, logged):
        assert {k: w[k] for k in ("train/loss/total", "train/loss/ce", "train/loss/fcd", "train/lr")} == pytest.approx(
            {k: j[k] for k in ("train/loss/total", "train/loss/ce", "train/loss/fcd", "train/lr")}, rel=1e-6)
    assert any("eval/student_eval_perplexity" in r for r in rows)  # the final held-out scalars too
    assert config["launcher"] == "distill_gpt" and config["train"]["report_to"] == ["wandb"] and config["train"]["max_steps"] == 3

    card = ModelCard.load(out / "student" / "README.md")
    assert (card.data.base_model, card.data.license, card.data.pipeline_tag, card.data.library_name, card.data.datasets) == (
        "fcd-ds-tests/tiny-gpt2", "mit", "text-generation", "transformers", None)
    assert {"fcd_ds", "knowledge-distillation", "fcd"} <= set(card.data.tags)
    assert str(corpus["train"]) in card.text and "| perplexity |" in card.text


# --- the model card ----------------------------------------------------------------------------------


def test_the_finished_runs_card_is_a_hub_card_without_an_invented_origin(finished_run):
    """The tiny teacher is a bare local folder (no card, no Hub name): the card claims no base_model or license."""
    card = ModelCard.load(finished_run / "student" / "README.md")
    assert card.data.base_model is None and card.data.license is None and card.data.datasets is None
    assert (card.data.pipeline_tag, card.data.library_name) == ("text-generation", "transformers")
    assert card.data.eval_results is None  # local files are no Hub dataset to report results on
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert f"| perplexity | {metrics['teacher_eval_perplexity']:.4g} |" in card.text


def test_the_default_runs_card_names_smollm2_and_a_hub_teacher_or_dataset_is_named_as_given(tmp_path):
    plan = plan_run(*parse_args(["--output_dir", str(tmp_path / "out")], defaults.GPT.flags), defaults.GPT)
    card = ModelCard(model_card(plan, METRICS, 1))
    assert (card.data.base_model, card.data.license, card.data.pipeline_tag, card.data.library_name, card.data.datasets) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", "text-generation", "transformers", None)
    assert "base_model_relation" not in card.data.to_dict()  # the Hub has no 'distillation' relation
    assert "| perplexity | 36.8 | 4.6e+06 | 206.2 |" in card.text

    data = copy.copy(plan.data_args)
    data.dataset_name, data.dataset_config_name, data.train_file, data.validation_file = "SetFit/bbc-news", None, None, None
    hub = dataclasses.replace(plan, teacher="HuggingFaceTB/SmolLM2-360M-Instruct", data_args=data)
    card = ModelCard(model_card(hub, METRICS, 1))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-360M-Instruct" and card.data.datasets == ["SetFit/bbc-news"]
    (result,) = card.data.eval_results
    assert (result.task_type, result.dataset_type, result.dataset_split, result.metric_type, result.metric_value) == (
        "text-generation", "SetFit/bbc-news", "validation", "perplexity", 206.2)


def test_a_fine_tuned_classifiers_card_names_the_model_it_was_tuned_from(tmp_path):
    plan = plan_run(*parse_args(["--output_dir", str(tmp_path / "out")], defaults.FINETUNE.flags, finetune=True), defaults.FINETUNE)
    metrics = {"student_eval_accuracy_initial": 0.5, "student_eval_accuracy": 0.83, "steps": 360}
    card = ModelCard(model_card(plan, metrics, 2))
    assert (card.data.base_model, card.data.license, card.data.pipeline_tag, card.data.tags) == (
        "sentence-transformers/all-MiniLM-L6-v2", "apache-2.0", "text-classification", ["fcd_ds"])


def test_a_local_folder_names_its_hub_origin_only_where_its_files_record_it(tmp_path):
    def folder(rel: str, config: dict, card: ModelCardData | None = None) -> str:
        path = tmp_path / rel
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(config))
        if card is not None:
            (path / "README.md").write_text(f"---\n{card.to_yaml()}\n---\n", encoding="utf-8")
        return str(path)

    assert hub_origin(folder("hub/models--org--tiny/snapshots/0123abc", {})) == ("org/tiny", None)  # the Hugging Face cache layout
    assert hub_origin(folder("saved", {"_name_or_path": "org/saved-from"})) == ("org/saved-from", None)  # transformers 4's record
    assert hub_origin(folder("local-path", {"_name_or_path": "/data/run/model"})) == (None, None)  # a path, not a Hub id
    foreign = ModelCardData(base_model="org/its-parent", license="mit")  # another tool's card: the parent is not the folder
    assert hub_origin(folder("foreign", {}, foreign)) == (None, "mit")
    ours = ModelCardData(base_model="org/its-origin", license="mit", tags=["fcd_ds"])
    assert hub_origin(folder("ours", {}, ours)) == ("org/its-origin", "mit")
    assert hub_origin("org/not-a-local-folder") == ("org/not-a-local-folder", None)  # a Hub name, not in this cache


def test_the_asset_step_adds_the_origin_card_to_an_already_prepared_teacher_once(tmp_path, monkeypatch):
    from fcd_ds.assets import prepare_default_assets

    monkeypatch.setenv("FCD_DS_HOME", str(tmp_path))
    teacher = tmp_path / "smollm2-135m-instruct"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")  # prepared before the cards were written: not prepared again
    prepare_default_assets()
    readme = teacher / "README.md"
    card = ModelCard.load(readme)
    assert (card.data.base_model, card.data.license, card.data.base_model_relation) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", "quantized")
    stamp = readme.stat().st_mtime_ns
    prepare_default_assets()
    assert readme.stat().st_mtime_ns == stamp and (teacher / "config.json").read_text() == "{}"
