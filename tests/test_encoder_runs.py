"""Real 2-rank DeepSpeed runs of the encoder launchers on tiny random BERT and RoBERTa models and
real data the asset step installs (Rotten Tomatoes snippets, BBC News text): sequence classification
(single sentences and pairs, classification and regression) at ZeRO-2 and ZeRO-3, a 64 -> 32 width
pair, task-agnostic masked-LM distillation with and without an MLM head, teacher fine-tuning, exported
models reloaded with the Auto classes giving the same held-out metric, and bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import REPO, assert_ok, read_train_log, run_launcher, run_plain, snapshot
from fcd_ds.config import DS_CONFIG_DIR
from fcd_ds.tasks.glue_metrics import compute_metrics

BERT = REPO / "launchers" / "distill_bert.py"
ROBERTA = REPO / "launchers" / "distill_roberta.py"
FINETUNE = REPO / "launchers" / "finetune_teacher.py"
SEQ = 32


@pytest.fixture(scope="module")
def rt(tmp_path_factory) -> dict[str, Path]:
    """Small Rotten Tomatoes csv files (single sentence, pair, regression) cut from the prepared assets."""
    from fcd_ds.assets import prepare_encoder_assets

    assets = prepare_encoder_assets()
    d = tmp_path_factory.mktemp("rt")
    read = lambda p: list(csv.DictReader(p.open(encoding="utf-8")))  # noqa: E731
    splits = {"train": read(assets.rotten_tomatoes_train)[:256], "valid": read(assets.rotten_tomatoes_validation)[:40]}
    out = {}
    for split, rows in splits.items():
        pairs = [{"premise": a["text"], "hypothesis": b["text"], "label": "same" if a["label"] == b["label"] else "different"}
                 for a, b in zip(rows, rows[1:] + rows[:1])]
        regression = [{"text": r["text"], "score": round(len(r["text"].split()) / 7, 3) + 0.001} for r in rows]
        for name, data in (("single", rows), ("pair", pairs), ("regression", regression)):
            path = d / f"{name}_{split}.csv"
            with path.open("w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=list(data[0]))
                writer.writeheader()
                writer.writerows(data)
            out[f"{name}_{split}"] = path
    return out


def _roberta_tokenizer(path: Path, text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import RobertaTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                                        show_progress=False))
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
    fast = RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
                                unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="module")
def encoders(tmp_path_factory, rt) -> dict[str, Path]:
    """Seeded random tiny encoders (4 blocks x 64) saved with their tokenizers: BERT with the real
    all-MiniLM-L6-v2 WordPiece tokenizer (classifier fresh/rotten, regression, MLM head, bare encoder),
    RoBERTa with a 512-token byte-level BPE (pair classifier), and a 2 x 32 RoBERTa student config."""
    from transformers import BertConfig, RobertaConfig

    from fcd_ds.assets import prepare_encoder_assets

    root = tmp_path_factory.mktemp("encoders")
    bert_tok = AutoTokenizer.from_pretrained(prepare_encoder_assets().minilm)
    roberta_tok = _roberta_tokenizer(root / "roberta_tok", rt["single_train"].read_text(encoding="utf-8"))
    bert = dict(vocab_size=bert_tok.vocab_size, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=64)
    roberta = dict(vocab_size=len(roberta_tok), hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                   max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    labels = {"id2label": {0: "fresh", 1: "rotten"}, "label2id": {"fresh": 0, "rotten": 1}}
    pair_labels = {"id2label": {0: "different", 1: "same"}, "label2id": {"different": 0, "same": 1}}
    specs = {
        "bert_cls": (AutoModelForSequenceClassification, BertConfig(**bert, **labels), bert_tok),
        "bert_reg": (AutoModelForSequenceClassification, BertConfig(**bert, num_labels=1, problem_type="regression"), bert_tok),
        "bert_mlm": (AutoModelForMaskedLM, BertConfig(**bert), bert_tok),
        "bert_base": (AutoModel, BertConfig(**bert), bert_tok),
        "roberta_pair": (AutoModelForSequenceClassification, RobertaConfig(**roberta, **pair_labels), roberta_tok),
    }
    out = {}
    for name, (cls, cfg, tok) in specs.items():
        torch.manual_seed(0)
        model = cls.from_config(cfg)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    for name, cfg in (("roberta_student_32", RobertaConfig(**{**roberta, "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64})),
                      ("bert_student_32", BertConfig(**{**bert, "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64}))):
        cfg.save_pretrained(root / name)
        out[name] = root / name / "config.json"
    return out


def zero3_json(directory: Path) -> Path:
    """zero3.json with parameter persistence off, so even tiny parameters are partitioned."""
    cfg = json.loads((DS_CONFIG_DIR / "zero3.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = directory / "zero3_tiny.json"
    path.write_text(json.dumps(cfg))
    return path


def common(out: Path, steps: int = 3) -> list:
    return ["--max_seq_length", SEQ, "--per_device_train_batch_size", 4, "--per_device_eval_batch_size", 8, "--max_steps", steps,
            "--learning_rate", 3e-3, "--warmup_steps", 1, "--output_dir", out]


def reloaded_metrics(folder: Path, valid_csv: Path, text: str, pair: str | None, label: str, names: tuple) -> dict:
    """Held-out metrics of the exported model, recomputed in this process with the Auto class."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    rows = list(csv.DictReader(valid_csv.open(encoding="utf-8")))
    enc = tok([r[text] for r in rows], [r[pair] for r in rows] if pair else None, truncation=True, max_length=SEQ,
              padding="max_length", return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    if model.config.problem_type == "regression":
        return compute_metrics(names, logits.squeeze(-1).numpy(), [float(r[label]) for r in rows])
    return compute_metrics(names, logits.argmax(-1).numpy(), [model.config.label2id[r[label]] for r in rows])


def test_bert_classification_zero2_exports_a_reloadable_student_with_label_names_and_card(encoders, rt, tmp_path):
    out = tmp_path / "run"
    assert_ok(run_launcher(["--teacher", encoders["bert_cls"], "--student_num_layers", 2, "--kd_weight", 0.5,
                            "--train_file", rt["single_train"], "--validation_file", rt["single_valid"], *common(out)],
                           launcher=BERT))
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("accuracy", "f1"):
        for key in (f"teacher_eval_{name}", f"student_eval_{name}_initial", f"student_eval_{name}"):
            assert 0 <= metrics[key] <= 1, key
    assert metrics["zero_stage"] == 2 and metrics["layer_map"] == "0:1@1,1:3@1"
    rows = read_train_log(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["train/loss/kd"] >= 0 and 0 < r["train/loss/fcd"] < 4 for r in rows)
    assert rows[0]["train/loss/total"] == pytest.approx(
        rows[0]["train/loss/ce"] + rows[0]["train/loss/fcd"] + 0.5 * rows[0]["train/loss/kd"], rel=1e-5)
    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert student.config.id2label == {0: "fresh", 1: "rotten"} and student.config.num_hidden_layers == 2
    again = reloaded_metrics(out / "student", rt["single_valid"], "text", None, "label", ("accuracy", "f1"))
    assert again["accuracy"] == pytest.approx(metrics["student_eval_accuracy"], abs=1e-9)
    card = (out / "student" / "README.md").read_text()
    assert "FCD" in card and str(encoders["bert_cls"]) in card and "| accuracy |" in card and "0:1@1,1:3@1" in card


def test_batches_padded_to_their_longest_row_train_as_padded_to_max_seq_length(encoders, rt, tmp_path):
    """Classification pads each batch to its longest real row, and with FCD's global-batch sequence relation
    every rank pads to the longest of the global batch (the ranks' rows differ in length): the losses of
    every step and the held-out metrics equal those of batches padded to --max_seq_length. Dropout off:
    its masks are drawn per (B, N) tensor, so another width draws other (equally random) masks."""
    teacher = AutoModelForSequenceClassification.from_pretrained(encoders["bert_cls"], hidden_dropout_prob=0.0,
                                                                 attention_probs_dropout_prob=0.0)
    teacher.save_pretrained(tmp_path / "teacher")
    AutoTokenizer.from_pretrained(encoders["bert_cls"]).save_pretrained(tmp_path / "teacher")
    runs, widths = {}, set()
    for name, extra in (("longest", []), ("max_length", ["--pad_to_max_length"])):
        out = tmp_path / name
        flags = [*common(out), "--max_seq_length", 64]  # longer than most snippets: the longest row is shorter
        assert_ok(run_launcher(["--teacher", tmp_path / "teacher", "--student_num_layers", 2, "--kd_weight", 0.5,
                                "--train_file", rt["single_train"], "--validation_file", rt["single_valid"], *flags, *extra],
                               launcher=BERT))
        runs[name] = (read_train_log(out), json.loads((out / "metrics.json").read_text()))
    (rows, metrics), (padded, padded_metrics) = runs["longest"], runs["max_length"]
    for a, b in zip(rows, padded, strict=True):
        for key in ("train/loss/total", "train/loss/ce", "train/loss/fcd", "train/loss/kd"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)  # float32 sums over other widths
    for key in ("teacher_eval_accuracy", "student_eval_accuracy", "student_eval_f1"):
        assert metrics[key] == padded_metrics[key], key
    assert metrics["train_tokens"] == padded_metrics["train_tokens"]  # the real tokens: padding is not counted
    # the FLOP count follows the batches as run: fewer padded tokens than max_seq_length x the sequences
    flops = {k: m["train_tflops_per_device"] * m["train_seconds"] for k, m in (("longest", metrics), ("max_length", padded_metrics))}
    assert flops["longest"] < flops["max_length"]  # FLOP/s x seconds: the work counted


def test_roberta_pairs_zero3_narrower_student_and_sharded_teacher(encoders, rt, tmp_path):
    """A 2 x 32 RoBERTa student of a 4 x 64 teacher (FCD needs no projection), sentence pairs, ZeRO-3."""
    out = tmp_path / "run"
    assert_ok(run_launcher(["--teacher", encoders["roberta_pair"], "--student_config", encoders["roberta_student_32"],
                            "--train_file", rt["pair_train"], "--validation_file", rt["pair_valid"], "--text_column", "premise",
                            "--text_pair_column", "hypothesis", "--deepspeed_config", zero3_json(tmp_path), *common(out)],
                           launcher=ROBERTA))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["zero_stage"] == 3 and metrics["layer_map"] == "0:1@1,1:3@1"
    teacher_numel = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(encoders["roberta_pair"]).parameters())
    assert all(s <= 0.52 * teacher_numel for s in metrics["teacher_param_shard_numel_per_rank"])
    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert student.config.hidden_size == 32 and student.config.id2label == {0: "different", 1: "same"}
    again = reloaded_metrics(out / "student", rt["pair_valid"], "premise", "hypothesis", "label", ("accuracy", "f1"))
    assert again["accuracy"] == pytest.approx(metrics["student_eval_accuracy"], abs=1e-9)
    assert again["f1"] == pytest.approx(metrics["student_eval_f1"], abs=1e-9)


def test_bert_regression_zero3(encoders, rt, tmp_path):
    out = tmp_path / "run"
    assert_ok(run_launcher(["--teacher", encoders["bert_reg"], "--student_num_layers", 2, "--label_column", "score",
                            "--kd_weight", 1, "--train_file", rt["regression_train"], "--validation_file", rt["regression_valid"],
                            "--deepspeed_config", zero3_json(tmp_path), *common(out)], launcher=BERT))
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"student_eval_pearson", "student_eval_spearmanr", "teacher_eval_pearson"} <= set(metrics)
    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert student.config.problem_type == "regression" and student.config.num_labels == 1
    again = reloaded_metrics(out / "student", rt["regression_valid"], "text", None, "score", ("pearson", "spearmanr"))
    assert again["pearson"] == pytest.approx(metrics["student_eval_pearson"], abs=1e-5)


@pytest.mark.parametrize("head", ["mlm", "base"])
def test_task_agnostic_masked_lm(head, encoders, corpus, tmp_path):
    """With an MLM head: a pruned student, masked-LM loss + FCD, perplexity. Without: a fresh 2 x 32
    student that FCD alone trains (its held-out FCD loss, the metric, falls)."""
    out = tmp_path / "run"
    teacher = encoders[f"bert_{head}"]
    student = ["--student_num_layers", 2] if head == "mlm" else ["--student_config", encoders["bert_student_32"]]
    assert_ok(run_launcher(["--task", "masked_lm", "--teacher", teacher, *student, "--train_file", corpus["train"],
                            "--validation_file", corpus["valid"], "--max_eval_samples", 16, *common(out, steps=4)], launcher=BERT))
    metrics = json.loads((out / "metrics.json").read_text())
    rows = read_train_log(out)
    if head == "mlm":
        assert metrics["student_eval_perplexity"] == pytest.approx(math.exp(metrics["student_eval_loss"]))
        assert all(r["train/loss/ce"] > 0 for r in rows)
        student = AutoModelForMaskedLM.from_pretrained(out / "student")
    else:
        assert set(k for k in metrics if "_eval_" in k) == {"student_eval_fcd_initial", "student_eval_fcd"}
        assert metrics["student_eval_fcd"] < metrics["student_eval_fcd_initial"]
        assert "train/loss/ce" not in rows[0]
        student = AutoModel.from_pretrained(out / "student")
        assert student.config.hidden_size == 32
    assert student.config.num_hidden_layers == 2


def test_finetune_teacher_then_distil_from_it(encoders, rt, tmp_path):
    """finetune_teacher.py: the same engine with no teacher; its model/ is then a distillation teacher."""
    tuned = tmp_path / "teacher"
    assert_ok(run_launcher(["--model_name_or_path", encoders["bert_base"], "--train_file", rt["single_train"],
                            "--validation_file", rt["single_valid"], *common(tuned)], launcher=FINETUNE))
    metrics = json.loads((tuned / "metrics.json").read_text())
    assert "teacher_eval_accuracy" not in metrics and metrics["teacher_param_shard_numel_per_rank"] is None
    rows = read_train_log(tuned)
    assert rows and all("train/loss/fcd" not in r and "time/teacher_forward" in r for r in rows)
    model = AutoModelForSequenceClassification.from_pretrained(tuned / "model")
    assert model.config.id2label == {0: "fresh", 1: "rotten"}
    assert "fine-tuned on the task loss alone" in (tuned / "model" / "README.md").read_text()
    out = tmp_path / "distilled"
    assert_ok(run_launcher(["--teacher", tuned / "model", "--train_file", rt["single_train"], "--validation_file",
                            rt["single_valid"], *common(out, steps=1)], launcher=BERT))
    distilled = json.loads((out / "metrics.json").read_text())
    assert distilled["teacher_eval_accuracy"] == pytest.approx(metrics["student_eval_accuracy"], abs=1e-9)
    assert AutoModelForSequenceClassification.from_pretrained(out / "student").config.num_hidden_layers == 2  # half of 4


def _error_line(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_encoder_bad_input_is_one_line_before_any_work(encoders, rt, tmp_path):
    out = tmp_path / "out"
    base = ["--train_file", rt["single_train"], "--validation_file", rt["single_valid"], "--output_dir", out]
    cases = [
        (ROBERTA, base, "error: --teacher: distill_roberta.py needs a RoBERTa teacher"),
        (BERT, ["--teacher", encoders["bert_base"], *base], "error: --teacher: "),  # not fine-tuned for classification
        (BERT, ["--teacher", encoders["bert_cls"], "--label_column", "stars", *base], "error: --label_column: no column 'stars'"),
        (BERT, ["--teacher", encoders["bert_cls"], "--student", encoders["roberta_pair"], *base],
         "error: --student: its tokenizer differs from the teacher's"),
        (BERT, ["--teacher", encoders["bert_reg"], *base], "error: --teacher: its head has 1 labels, the data 2"),
        (BERT, ["--teacher", encoders["bert_cls"], "--max_seq_length", 100, *base], "error: --max_seq_length: 100 exceeds the teacher's 64"),
        (BERT, ["--task", "masked_lm", "--teacher", encoders["bert_base"], "--kd_weight", 1, *base[:0],
                "--output_dir", out], "error: --kd_weight: the teacher"),
    ]
    for launcher, args, message in cases:
        result = run_plain(args, launcher=launcher)
        errors = _error_line(result)
        assert result.returncode == 2 and len(errors) == 1 and errors[0].startswith(message), (message, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
    assert not out.exists() and snapshot(out) == {}
