"""Prepare once, load in seconds: a folder of tokenised, packed blocks that every rank memory-maps.

Layout of a prepared folder (``fcd-ds-prepare-data --dataset_prepared_path DIR ...``)::

    DIR/fcd_ds_data.json   what it was made with: task, tokenizer (name and fingerprint), max_seq_length,
                           packing, the document spec (form, BOS/EOS, chat template, assistant-only loss),
                           the inputs' fingerprint (paths, sizes, modification times), counts
    DIR/train/             datasets.Dataset.save_to_disk of the train blocks (Arrow)
    DIR/validation/        the held-out blocks

Arrow through ``datasets`` (``load_from_disk`` memory-maps the files: opening takes the same time and
memory whatever the corpus size; measured against a NumPy token memmap in benchmarks/data_scale.py).
A folder is written under a temporary name and renamed when complete, under a file lock beside it, so
ranks or nodes that prepare at once never see half a folder, and the second reuses the first's.
A run refuses, in one line, a folder made with another tokenizer, length, packing, task or chat settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from ..errors import UsageError

__all__ = ["METADATA", "tokenizer_fingerprint", "prepared_settings", "prepared_inputs", "read_prepared_metadata", "check_prepared",
           "write_prepared", "load_prepared"]

METADATA = "fcd_ds_data.json"
FORMAT = 1  # layout version of a prepared folder


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of what decides the token ids: the vocabulary (with added tokens) and the special token ids."""
    special = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "sep", "cls", "unk", "mask")}
    payload = json.dumps([sorted(tokenizer.get_vocab().items()), special], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def prepared_settings(tokenizer, data_args, task: str, document: dict) -> dict:
    """The settings a prepared folder must share with a run that reads it (``document``: a
    :meth:`~fcd_ds.data.documents.DocumentSpec.as_record`, or the part of one that a run knows)."""
    return {"task": task, "tokenizer": tokenizer_fingerprint(tokenizer), "max_seq_length": data_args.max_seq_length,
            "packing": data_args.packing, "document": document}


def prepared_inputs(data, data_args) -> dict:
    """The fingerprint of a run's raw inputs (:meth:`DataSource.fingerprint` and the flags that read them)."""
    return {"train": data.train.fingerprint(), "validation": data.validation.fingerprint() if data.validation else None,
            "validation_split_percentage": data_args.validation_split_percentage if data.validation is None else None,
            "sample_by": data_args.sample_by, "encoding": data_args.encoding, "text_column": data_args.text_column}


def read_prepared_metadata(path: str | Path) -> dict | None:
    """The folder's ``fcd_ds_data.json``, or None when the folder does not exist.

    Raises:
        UsageError: the folder exists but is not a complete prepared folder.
    """
    path = Path(path)
    if not path.exists():
        return None
    meta = path / METADATA
    if not (path.is_dir() and meta.is_file() and (path / "train").is_dir() and (path / "validation").is_dir()):
        raise UsageError(f"--dataset_prepared_path: {path} exists but is not a folder written by fcd-ds-prepare-data "
                         f"(no {METADATA}, train/ and validation/); pass another path, or remove it to prepare it afresh")
    try:
        record = json.loads(meta.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--dataset_prepared_path: {meta} is not valid JSON ({exc}); prepare the folder afresh") from None
    if record.get("format") != FORMAT:
        raise UsageError(f"--dataset_prepared_path: {path} has layout {record.get('format')!r}, this fcd_ds reads {FORMAT}; prepare it afresh")
    return record


def check_prepared(record: dict, settings: dict, path: str, inputs: dict | None = None) -> None:
    """Refuse a prepared folder whose settings (or, when the run names its raw data, inputs) differ.

    Raises:
        UsageError: one line naming the first setting that differs and how to fix it.
    """
    saved = record["settings"]
    names = {"task": "--task", "tokenizer": "the tokenizer", "max_seq_length": "--max_seq_length", "packing": "--packing"}
    for key, what in names.items():
        if saved.get(key) != settings[key]:
            shown = (lambda v: v[:12] if isinstance(v, str) and len(v) == 64 else v)
            raise UsageError(f"--dataset_prepared_path: {path} was prepared with {what} {shown(saved.get(key))!r}, this run has "
                             f"{shown(settings[key])!r}; prepare another folder for this run (fcd-ds-prepare-data) or use its settings")
    for key in settings["document"]:  # the run's document settings that it knows (all of them when it names its data)
        if saved["document"].get(key) != settings["document"].get(key):
            raise UsageError(f"--dataset_prepared_path: {path} was prepared with other documents ({key}: "
                             f"{saved['document'].get(key)!r}, this run: {settings['document'].get(key)!r}); prepare another folder")
    if inputs is not None and record.get("inputs") != json.loads(json.dumps(inputs)):
        raise UsageError(f"--dataset_prepared_path: {path} was prepared from other data than the data flags name (files, sizes or "
                         "times differ); drop the data flags to use it as it is, or prepare another folder")


def write_prepared(path: str | Path, tokenizer, data_args, data, num_proc: int | None = None) -> dict:
    """Tokenise and pack ``data`` (a :class:`~fcd_ds.data.text.TextData`) into the prepared folder ``path``.

    Safe to call from several processes at once: under a file lock, the first writes ``path`` (through a
    temporary folder renamed at the end), the others find it complete and check it.

    Returns:
        The folder's metadata record.

    Raises:
        UsageError: as :func:`~fcd_ds.data.text.load_text_blocks`; a folder already there made otherwise.
    """
    from filelock import FileLock

    from .text import load_text_blocks

    path = Path(path)
    settings = prepared_settings(tokenizer, data_args, data.task, data.spec.as_record())
    inputs = prepared_inputs(data, data_args)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_name(path.name + ".lock"))):
        record = read_prepared_metadata(path)
        if record is not None:
            check_prepared(record, settings, str(path), inputs)
            return record
        start = time.perf_counter()
        train, valid = load_text_blocks(tokenizer, data_args, data, num_proc)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        train.save_to_disk(str(tmp / "train"))
        valid.save_to_disk(str(tmp / "validation"))
        record = {"format": FORMAT, "settings": settings, "inputs": json.loads(json.dumps(inputs)),
                  "tokenizer_name_or_path": getattr(tokenizer, "name_or_path", None),
                  "blocks": {"train": len(train), "validation": len(valid)},
                  "tokens": {"train": len(train) * data_args.max_seq_length if data_args.packing else None},
                  "seconds": round(time.perf_counter() - start, 2), "num_proc": num_proc or 1,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / METADATA).write_text(json.dumps(record, indent=2), encoding="utf-8")
        tmp.rename(path)
    return record


def load_prepared(path: str | Path, settings: dict, inputs: dict | None = None):
    """``(train, validation)`` blocks of a prepared folder, memory-mapped (``datasets.load_from_disk``).

    Raises:
        UsageError: the folder is missing, incomplete or made with other settings (:func:`check_prepared`).
    """
    from datasets import load_from_disk

    record = read_prepared_metadata(path)
    if record is None:
        raise UsageError(f"--dataset_prepared_path: {path} does not exist; prepare it (fcd-ds-prepare-data) or give the data flags")
    check_prepared(record, settings, str(path), inputs)
    return load_from_disk(str(Path(path) / "train")), load_from_disk(str(Path(path) / "validation"))
