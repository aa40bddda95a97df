"""Every data format gives the blocks of the .txt path on the same text; documents carry BOS/EOS as the
tokenizer defines them; one document per sequence pads and truncates; a prepared folder and a stream give
the raw path's blocks. All in-process on real BBC News text (no DeepSpeed)."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from fcd_ds.config import DataArguments
from fcd_ds.data import TextCorpus
from fcd_ds.data.prepare import main as prepare_main
from fcd_ds.errors import UsageError


@pytest.fixture(scope="module")
def documents(corpus) -> list[str]:
    """60 real BBC paragraphs (one document each), train and held-out."""
    lines = [line for line in corpus["train"].read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[:60]


@pytest.fixture(scope="module")
def tiny_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def smollm_tokenizer():
    from transformers import AutoTokenizer

    from fcd_ds.assets import prepare_default_assets

    return AutoTokenizer.from_pretrained(prepare_default_assets().teacher)


def blocks(tokenizer, task: str = "causal_lm", **flags):
    """(train, validation) rows as plain lists."""
    train, valid = TextCorpus(tokenizer, DataArguments(task=task, max_seq_length=flags.pop("max_seq_length", 32), **flags), task).load()
    return train.to_dict(), valid.to_dict()


def write_formats(docs: list[str], d: Path) -> dict[str, dict]:
    """The same documents (one per row) in every accepted form: name -> data flags."""
    from datasets import Dataset, DatasetDict

    d.mkdir(parents=True, exist_ok=True)
    rows = [{"text": t, "id": i} for i, t in enumerate(docs)]
    (d / "docs.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    (d / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (d / "docs.json").write_text(json.dumps(rows), encoding="utf-8")
    with gzip.open(d / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    for name, delimiter in (("docs.csv", ","), ("docs.tsv", "\t")):
        with open(d / name, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "text"], delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
    ds = Dataset.from_list(rows)
    ds.to_parquet(str(d / "docs.parquet"))
    (d / "shards").mkdir(exist_ok=True)
    for k in range(3):  # contiguous shards, sorted by name
        ds.select(range(k * 20, (k + 1) * 20)).to_parquet(str(d / "shards" / f"part-{k:02d}.parquet"))
    ds.save_to_disk(str(d / "saved"))
    DatasetDict(train=ds, validation=ds.select(range(5))).save_to_disk(str(d / "saved_dict"))
    (d / "hub_like").mkdir(exist_ok=True)
    (d / "hub_like" / "train.jsonl").write_text((d / "docs.jsonl").read_text())
    shards = sorted(str(p) for p in (d / "shards").glob("*.parquet"))
    return {
        "txt": {"train_file": str(d / "docs.txt")},
        "jsonl": {"train_file": str(d / "docs.jsonl")},
        "json": {"train_file": str(d / "docs.json")},
        "jsonl.gz": {"train_file": str(d / "docs.jsonl.gz")},
        "csv": {"train_file": str(d / "docs.csv"), "text_column": "text"},
        "tsv": {"train_file": str(d / "docs.tsv"), "text_column": "text"},
        "parquet": {"train_file": str(d / "docs.parquet")},
        "glob": {"train_file": str(d / "shards" / "*.parquet")},
        "comma list": {"train_file": ",".join(shards)},
        "save_to_disk": {"train_file": str(d / "saved")},
        "DatasetDict folder": {"train_file": str(d / "saved_dict"), "validation_file": None},
        "dataset_name folder": {"dataset_name": str(d / "hub_like")},
        "dataset_name saved": {"dataset_name": str(d / "saved_dict"), "validation_split": "no_such_split"},
    }


def test_every_format_gives_the_blocks_of_the_txt_path(documents, tiny_tokenizer, tmp_path):
    forms = write_formats(documents, tmp_path)
    valid = str(tmp_path / "docs.jsonl")
    expected = None
    for name, flags in forms.items():
        flags = {"validation_file": valid, **flags} if "dataset_name" not in flags else flags
        if flags.get("validation_file", "") is None:
            flags.pop("validation_file")
        train, _ = blocks(tiny_tokenizer, **flags)  # a DatasetDict folder holds out its own validation split
        got = (train["input_ids"], train["document_starts"])
        if name == "txt":
            expected = got
            assert len(got[0]) > 20 and all(len(b) == 32 for b in got[0])
        elif name in ("dataset_name folder", "dataset_name saved"):  # no held-out split: the last 5 % of train blocks
            n = len(expected[0])
            keep = n - max(1, n * 5 // 100)
            assert got == (expected[0][:keep], expected[1][:keep]), name
        else:
            assert got == expected, name


def test_documents_end_with_eos_and_start_with_bos_as_the_tokenizer_defines(documents, smollm_tokenizer, tiny_tokenizer, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents[:12]), encoding="utf-8")
    # SmolLM2-135M-Instruct defines BOS <|im_start|> (1) and EOS <|im_end|> (2): every document is 1 ... 2.
    tok = smollm_tokenizer
    train, _ = blocks(tok, train_file=str(path), validation_file=str(path), max_seq_length=64)
    stream = [t for b in train["input_ids"] for t in b]
    docs = [tok(t, add_special_tokens=False)["input_ids"] for t in documents[:12]]
    expected = [t for d in docs for t in (tok.bos_token_id, *d, tok.eos_token_id)]
    assert stream == expected[: len(stream)] and len(stream) > len(expected) - 64
    for b, starts in zip(train["input_ids"], train["document_starts"]):
        assert all(b[s] == tok.bos_token_id and b[s - 1] == tok.eos_token_id for s in starts)
    # A tokenizer whose BOS is its EOS (GPT-2's <|endoftext|>, the tiny one here): one separator, no BOS.
    train, _ = blocks(tiny_tokenizer, train_file=str(path), validation_file=str(path), max_seq_length=32)
    stream = [t for b in train["input_ids"] for t in b]
    docs = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in documents[:12]]
    expected = [t for d in docs for t in (*d, tiny_tokenizer.eos_token_id)]
    assert stream == expected[: len(stream)]


def test_masked_lm_blocks_keep_the_frame_and_separate_documents(documents, tmp_path):
    from transformers import AutoTokenizer

    from fcd_ds.assets import prepare_encoder_assets

    bert = AutoTokenizer.from_pretrained(prepare_encoder_assets().minilm)
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(documents[:20]) + "\n", encoding="utf-8")
    train, _ = blocks(bert, task="masked_lm", train_file=str(path), validation_file=str(path), max_seq_length=48)
    docs = [bert(t, add_special_tokens=False)["input_ids"] for t in documents[:20]]
    body = [t for d in docs for t in (*d, bert.sep_token_id)]
    inner = [t for b in train["input_ids"] for t in b[1:-1]]
    assert all(b[0] == bert.cls_token_id and b[-1] == bert.sep_token_id and len(b) == 48 for b in train["input_ids"])
    assert inner == body[: len(inner)]
    # one document per sequence: [CLS] doc [SEP], no separator of its own, padded in collate
    train, _ = blocks(bert, task="masked_lm", train_file=str(path), validation_file=str(path), max_seq_length=48, packing=False)
    assert train["input_ids"][0] == [bert.cls_token_id, *docs[0][:46], bert.sep_token_id]


def test_one_document_per_sequence_is_truncated_and_padded(documents, tiny_tokenizer, tmp_path):
    from fcd_ds.tasks import CausalLMTask

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents[:10]), encoding="utf-8")
    train, _ = blocks(tiny_tokenizer, train_file=str(path), validation_file=str(path), max_seq_length=32, packing=False)
    docs = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id] for t in documents[:10]]
    assert train["input_ids"] == [d[:32] for d in docs]
    batch = CausalLMTask(pad_id=0, max_seq_length=32).collate({"input_ids": train["input_ids"][:4]}, train=True)
    lengths = [min(len(d), 32) for d in docs[:4]]
    assert batch["input_ids"].shape == (4, 32) and batch["attention_mask"].sum(1).tolist() == lengths


def test_txt_documents_by_line_paragraph_or_file(tiny_tokenizer, tmp_path):
    from fcd_ds.config import DataArguments
    from fcd_ds.data.sources import load_split, resolve_source

    path = tmp_path / "prose.txt"
    path.write_text("First line of a\nparagraph.\n\nSecond paragraph.\n", encoding="utf-8")
    rows = {}
    for sample_by in ("line", "paragraph", "document"):
        args = DataArguments(train_file=str(path), sample_by=sample_by)
        rows[sample_by] = load_split(resolve_source(args, "train"), args)[0]["text"]
    assert rows["line"] == ["First line of a", "paragraph.", "", "Second paragraph."]
    assert rows["paragraph"] == ["First line of a\nparagraph.", "Second paragraph.\n"]
    assert rows["document"] == ["First line of a\nparagraph.\n\nSecond paragraph.\n"]


def test_prepared_folder_equals_the_raw_path_and_refuses_other_settings(documents, tiny_tokenizer, tokenizer_dir, tmp_path, capsys):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents) + "", encoding="utf-8")
    out = tmp_path / "prepared"
    flags = ["--train_file", str(path), "--validation_split_percentage", "10", "--max_seq_length", "32", "--tokenizer_name",
             str(tokenizer_dir), "--dataset_prepared_path", str(out)]
    assert prepare_main([*flags, "--num_proc", "2"]) == 0
    record = json.loads((out / "fcd_ds_data.json").read_text())
    assert record["settings"]["max_seq_length"] == 32 and record["num_proc"] == 2
    raw = blocks(tiny_tokenizer, train_file=str(path), validation_split_percentage=10)
    prepared = blocks(tiny_tokenizer, dataset_prepared_path=str(out))  # no data flags: the folder is the data
    assert prepared == raw and record["blocks"] == {"train": len(raw[0]["input_ids"]), "validation": len(raw[1]["input_ids"])}
    assert prepare_main([*flags]) == 0  # already there, same settings and inputs: reused
    capsys.readouterr()
    for other_flags, message in (({"max_seq_length": 64}, "was prepared with --max_seq_length 32, this run has 64"),
                                 ({"max_seq_length": 32, "packing": False}, "was prepared with --packing True, this run has False")):
        with pytest.raises(UsageError, match=message):
            TextCorpus(tiny_tokenizer, DataArguments(dataset_prepared_path=str(out), **other_flags), "causal_lm")
    from transformers import AutoTokenizer

    from fcd_ds.assets import prepare_default_assets

    other = AutoTokenizer.from_pretrained(prepare_default_assets().teacher)
    with pytest.raises(UsageError, match="was prepared with the tokenizer"):
        TextCorpus(other, DataArguments(dataset_prepared_path=str(out), max_seq_length=32), "causal_lm")
    path.write_text(path.read_text() + json.dumps({"text": "one more document"}) + "\n", encoding="utf-8")
    with pytest.raises(UsageError, match="prepared from other data"):
        TextCorpus(tiny_tokenizer, DataArguments(dataset_prepared_path=str(out), train_file=str(path), max_seq_length=32,
                                                 validation_split_percentage=10), "causal_lm")
    assert prepare_main(["--dataset_prepared_path", str(tmp_path / "x"), "--train_file", str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --train_file: {tmp_path / 'none.jsonl'} does not exist; pass an existing file, a comma-separated list or a glob"]
    assert not (tmp_path / "x").exists()


def test_prepare_data_console_script_runs_as_a_module(tokenizer_dir, corpus, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "prepared"
    result = subprocess.run([sys.executable, "-m", "fcd_ds.data.prepare", "--train_file", str(corpus["train"]), "--validation_file",
                             str(corpus["valid"]), "--tokenizer_name", str(tokenizer_dir), "--max_seq_length", "32",
                             "--dataset_prepared_path", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["blocks"]["train"] > 100 and (out / "train" / "dataset_info.json").is_file()


def test_one_ranks_stream_gives_the_map_style_blocks_in_order(documents, tiny_tokenizer, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents), encoding="utf-8")
    args = DataArguments(train_file=str(path), validation_file=str(path), max_seq_length=32, streaming=True)
    stream, held_out = TextCorpus(tiny_tokenizer, args, "causal_lm").load(rank=0, world=1, seed=0)
    raw, raw_valid = blocks(tiny_tokenizer, train_file=str(path), validation_file=str(path))
    rows = list(stream(0))
    assert [r["input_ids"] for r in rows] == raw["input_ids"] and [r["document_starts"] for r in rows] == raw["document_starts"]
    assert held_out.to_dict()["input_ids"] == raw_valid["input_ids"][:64]
    # two ranks: disjoint shares whose union is every block's rows (one file: every other row per rank)
    shares = [list(TextCorpus(tiny_tokenizer, args, "causal_lm").load(rank=r, world=2, seed=0)[0](0)) for r in range(2)]
    assert shares[0] and shares[1] and shares[0] != shares[1]
