"""Bad data gets one line naming the file (and row) and the fix: at plan time when the first rows show
it (exit 2, nothing written), while tokenising otherwise (before any rank trains, output dir untouched)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import LAUNCHER, run_launcher, snapshot
from fcd_ds.config import DataArguments
from fcd_ds.data import TextCorpus
from fcd_ds.errors import UsageError

spec = importlib.util.spec_from_file_location("distill_gpt", LAUNCHER)
distill_gpt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(distill_gpt)


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path, corpus) -> dict[str, Path]:
    text = [line for line in corpus["train"].read_text(encoding="utf-8").splitlines() if line.strip()][:30]
    d = tmp_path / "data"
    d.mkdir()
    (d / "empty.jsonl").write_bytes(b"")
    latin = "Caf\u00e9 society, na\u00efve readers and a r\u00e9sum\u00e9.\n" * 3 + "\n".join(text)
    (d / "latin1.txt").write_bytes(latin.encode("latin-1"))
    (d / "notes.md").write_text("x")
    (d / "not_saved").mkdir()
    return {
        "good": jsonl(d / "good.jsonl", [{"text": t} for t in text]),
        "two strings": jsonl(d / "two.jsonl", [{"body": t, "title": t[:10]} for t in text]),
        "int column": jsonl(d / "ints.jsonl", [{"text": t, "n": i} for i, t in enumerate(text)]),
        "unknown role": jsonl(d / "roles.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": t}]}
                                                  for t in text[:5]] + [{"messages": [{"role": "robot", "content": "beep"}]}]),
        "no assistant": jsonl(d / "noanswer.jsonl", [{"messages": [{"role": "user", "content": t}]} for t in text[:3]]),
        "chat": jsonl(d / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": t}]} for t in text]),
        **{name: d / name for name in ("empty.jsonl", "latin1.txt", "notes.md", "not_saved")},
        "dir": d,
    }


@pytest.fixture
def base(tiny_models, tmp_path):
    return ["--teacher", tiny_models["gpt2_teacher"], "--student_num_layers", "2", "--max_seq_length", "32", "--output_dir", tmp_path / "out"]


PLAN_CASES = {
    "glob matching nothing": (lambda f: ["--train_file", str(f["dir"] / "shards-*.parquet")], "--train_file: the glob '{dir}/shards-*.parquet' matches no file"),
    "empty shard": (lambda f: ["--train_file", f"{f['good']},{f['empty.jsonl']}"], "--train_file: {dir}/empty.jsonl is empty; remove it from the list or fill it"),
    "unknown suffix": (lambda f: ["--train_file", str(f["notes.md"])], "--train_file: cannot read files ending in .md"),
    "mixed formats": (lambda f: ["--train_file", f"{f['good']},{f['latin1.txt']}"], "--train_file: the files mix formats (json, text)"),
    "folder not saved": (lambda f: ["--train_file", str(f["not_saved"])], "--train_file: {dir}/not_saved is a folder but not one written by datasets' save_to_disk"),
    "no text column": (lambda f: ["--train_file", str(f["two strings"])], "--train_file: {dir}/two.jsonl has no 'text' column (columns: body (str), title (str)); pass --text_column NAME"),
    "text column not text": (lambda f: ["--train_file", str(f["int column"]), "--text_column", "n"], "--text_column: column 'n' of {dir}/ints.jsonl holds int, not text"),
    "missing text column": (lambda f: ["--train_file", str(f["good"]), "--text_column", "body"], "--text_column: no column 'body' in {dir}/good.jsonl (columns: text (str))"),
    "no chat template": (lambda f: ["--train_file", str(f["chat"])], "--train_file: {dir}/chat.jsonl holds chat turns but the teacher's tokenizer has no chat template; pass --chat_template_path FILE"),
    "assistant-only on text": (lambda f: ["--train_file", str(f["good"]), "--assistant_only_loss"], "--assistant_only_loss: {dir}/good.jsonl holds plain text"),
    "streaming without held-out data": (lambda f: ["--train_file", str(f["good"]), "--streaming"], "--streaming: a stream cannot hold out a percentage; pass --validation_file"),
    "per-document without packing": (lambda f: ["--train_file", str(f["good"]), "--packing", "false", "--per_document_attention"], "--per_document_attention: with --packing false"),
    "prepared folder that is not one": (lambda f: ["--dataset_prepared_path", str(f["not_saved"])], "--dataset_prepared_path: {dir}/not_saved exists but is not a folder written by fcd-ds-prepare-data"),
    "unknown encoding": (lambda f: ["--train_file", str(f["good"]), "--encoding", "utf-9"], "--encoding: 'utf-9' is not a Python codec"),
    "prefetch without workers": (lambda f: ["--train_file", str(f["good"]), "--dataloader_prefetch_factor", "4"], "--dataloader_prefetch_factor: needs --dataloader_num_workers > 0"),
}


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_bad_data_is_refused_at_plan_time_in_one_line(case, files, base, capsys, tmp_path):
    flags, message = PLAN_CASES[case]
    code = distill_gpt.main([str(a) for a in [*base, *flags(files)]])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: " + message.format(dir=files["dir"])), err
    assert not (tmp_path / "out").exists()


def test_bad_rows_found_while_tokenising_name_the_row_and_file(files, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    template = tmp_path / "chatml.jinja"
    template.write_text("{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")
    for name, message in (("unknown role", "row 5 of {dir}/roles.jsonl: role 'robot' is not one of system, user, assistant, tool; fix the row"),
                          ("no assistant", "row 0 of {dir}/noanswer.jsonl: no assistant turn (nothing for the student to learn to answer); fix the row")):
        args = DataArguments(train_file=str(files[name]), validation_file=str(files["chat"]), max_seq_length=32,
                             chat_template_path=str(template))
        corpus = TextCorpus(tok, args, "causal_lm")  # the first row is fine: found while tokenising
        with pytest.raises(UsageError) as info:
            corpus.load()
        assert str(info.value) == "--train_file: " + message.format(dir=files["dir"])
    # a shard that holds no rows (a parquet file with a schema and nothing else)
    from datasets import Dataset

    Dataset.from_dict({"text": []}).to_parquet(str(files["dir"] / "zero.parquet"))
    Dataset.from_dict({"text": ["one document", "two"]}).to_parquet(str(files["dir"] / "one.parquet"))
    args = DataArguments(train_file=f"{files['dir'] / 'one.parquet'},{files['dir'] / 'zero.parquet'}", validation_file=str(files["good"]))
    with pytest.raises(UsageError) as info:
        TextCorpus(tok, args, "causal_lm").load()
    assert str(info.value) == f"--train_file: {files['dir'] / 'zero.parquet'} holds no rows; remove it from the list or fill it"
    # a file that is not UTF-8: the first bad byte's offset; read with its stated --encoding it loads
    args = DataArguments(train_file=str(files["latin1.txt"]), validation_file=str(files["good"]), max_seq_length=32)
    with pytest.raises(UsageError) as info:
        TextCorpus(tok, args, "causal_lm").load()
    assert str(info.value).startswith(f"--train_file: {files['latin1.txt']} is not valid utf-8 (byte 3: invalid continuation byte); convert it")
    args = DataArguments(train_file=str(files["latin1.txt"]), validation_file=str(files["good"]), max_seq_length=32, encoding="latin-1")
    train, _ = TextCorpus(tok, args, "causal_lm").load()
    assert len(train) > 10
    from fcd_ds.data.sources import load_split, resolve_source

    assert load_split(resolve_source(args, "train"), args)[0][0]["text"] == "Caf\u00e9 society, na\u00efve readers and a r\u00e9sum\u00e9."


def test_a_bad_row_stops_every_rank_with_one_line_before_training(files, base, tiny_models, tmp_path):
    """Found while rank 0 tokenises (the other rank waiting at the barrier): exit 2 on both ranks, one
    error line, no traceback, the output folder as before (absent)."""
    template = tmp_path / "chatml.jinja"
    template.write_text("{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("the user's own file")
    before = snapshot(tmp_path / "out")
    result = run_launcher([*base, "--train_file", files["unknown role"], "--validation_file", files["chat"], "--chat_template_path", template,
                           "--max_steps", 1])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and errors == [f"error: --train_file: row 5 of {files['unknown role']}: role 'robot' is not one of "
                                                 "system, user, assistant, tool; fix the row"], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and snapshot(tmp_path / "out") == before


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_row_met_in_a_stream_is_one_line(files, tokenizer_dir, tmp_path, workers):
    """Found mid-stream, in this process or in a DataLoader worker: the same one line, no worker traceback."""
    from functools import partial

    from transformers import AutoTokenizer

    from fcd_ds.data import make_micro_batches
    from fcd_ds.tasks import CausalLMTask

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    template = tmp_path / "chatml.jinja"
    template.write_text("{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}")
    args = DataArguments(train_file=str(files["unknown role"]), validation_file=str(files["chat"]), max_seq_length=32,
                         chat_template_path=str(template), streaming=True)
    epochs, _ = TextCorpus(tok, args, "causal_lm").load()
    stream = make_micro_batches(epochs, 2, 0, 1, 0, partial(CausalLMTask(max_seq_length=32).collate, train=True), num_workers=workers)
    with pytest.raises(UsageError) as info:
        next(stream)
    assert str(info.value).startswith("--train_file: row 5 of the stream of ") and str(info.value).endswith(
        "role 'robot' is not one of system, user, assistant, tool; fix the row")
    assert "Traceback" not in str(info.value)
