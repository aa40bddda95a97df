"""Text tasks' data (causal LM, masked LM): data flags -> documents -> blocks, from raw files, a prepared
folder or a stream.

:func:`text_data_spec` checks the data at plan time (files, columns, row form, chat template) from the
first row of each split, in milliseconds; :func:`load_text_blocks` then builds the train and held-out
blocks: tokenised with ``--preprocessing_num_workers`` processes (``datasets.map``, cached by
``datasets``), packed (:func:`~fcd_ds.data.blocks.pack_table`), the held-out slice taken from the end of
the train blocks when no held-out data is given (deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..runtime.distributed import is_main_process
from ..errors import UsageError
from .blocks import PACK_GROUP, pack_table, special_token_frame, truncate_table
from .documents import DocumentEncoder, DocumentSpec, detect_form, document_markers, read_chat_template
from .sources import DataSource, RowLocator, load_split, peek_columns, resolve_source

__all__ = ["TextData", "text_data_spec", "tokenize_documents", "documents_to_blocks", "load_text_blocks", "block_frame"]


@dataclass(frozen=True)
class TextData:
    """A text task's resolved data: the sources (None: held out from train / a prepared folder), the
    document spec and the task (``causal_lm`` or ``masked_lm``)."""

    task: str
    train: DataSource | None
    validation: DataSource | None
    spec: DocumentSpec


def block_frame(tokenizer, task: str) -> tuple[list[int], list[int]]:
    """Special tokens around every block: the tokenizer's own for masked LM (``[CLS]``/``[SEP]``), none for causal LM."""
    return special_token_frame(tokenizer) if task == "masked_lm" else ([], [])


def _spec_of(source: DataSource, tokenizer, data_args, task: str, template: str | None) -> DocumentSpec | None:
    peeked = peek_columns(source, data_args)
    if peeked is None:
        return None  # a saved DatasetDict without this split
    columns, row = peeked
    form, text_column = detect_form(columns, row, data_args.text_column, source.flag, source.described)
    if form != "text" and task != "causal_lm":
        raise UsageError(f"{source.flag}: {source.described} holds {form.replace('_', '/')} rows, which are for --task causal_lm; "
                         "pass a text column (--text_column)")
    if data_args.assistant_only_loss and form == "text":
        raise UsageError(f"--assistant_only_loss: {source.described} holds plain text (column {text_column!r}), so there is no "
                         "assistant turn; give 'messages' or 'prompt'/'completion' rows, or drop the flag")
    if form != "text" and template is None and getattr(tokenizer, "chat_template", None) is None and _needs_template(form, row):
        raise UsageError(f"{source.flag}: {source.described} holds chat turns but the teacher's tokenizer has no chat template; "
                         "pass --chat_template_path FILE")
    bos, eos = document_markers(tokenizer, task, data_args.packing)
    return DocumentSpec(form, text_column, bos, eos, data_args.assistant_only_loss, template)


def _needs_template(form: str, row: dict) -> bool:
    return form == "messages" or not (isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str))


def text_data_spec(tokenizer, data_args, task: str) -> TextData:
    """Resolve and check a text task's data from the flags, reading only the first row of each split.

    Raises:
        UsageError: as :func:`~fcd_ds.data.sources.resolve_source` and
            :func:`~fcd_ds.data.documents.detect_form`; chat rows for a masked LM; assistant-only loss on
            plain text; chat rows without a chat template; train and held-out data of different forms.
    """
    train = resolve_source(data_args, "train")
    if train is None:
        raise UsageError("--train_file: no training data; pass --train_file, --dataset_name or --dataset_prepared_path")
    valid = resolve_source(data_args, "validation")
    template = read_chat_template(data_args.chat_template_path)  # read once, for both splits
    spec = _spec_of(train, tokenizer, data_args, task, template)
    if spec is None:
        raise UsageError(f"{train.flag}: {train.described} has no split {train.split!r}; pass --train_split")
    if valid is not None and valid.kind != "hub":
        other = _spec_of(valid, tokenizer, data_args, task, template)
        if other is None:
            valid = None  # the saved DatasetDict has no held-out split: a slice of train
        elif (other.form, other.text_column) != (spec.form, spec.text_column):
            raise UsageError(f"{valid.flag}: its rows are {other.form} ({other.text_column or '-'}) but the training data's are "
                             f"{spec.form} ({spec.text_column or '-'}); give both the same columns")
    if data_args.streaming and valid is None:
        raise UsageError("--streaming: a stream cannot hold out a percentage; pass --validation_file (or a --validation_split)")
    return TextData(task, train, valid, spec)


def _log(message: str) -> None:
    if is_main_process():
        print(f"[fcd_ds] {message}", flush=True)


def tokenize_documents(raw, tokenizer, spec: DocumentSpec, flag: str, locate: RowLocator, num_proc: int | None = None, desc: str = "tokenize"):
    """Rows -> documents (``input_ids`` int32 lists, ``loss_mask`` int8 lists with assistant-only loss), by
    ``datasets.map`` with ``num_proc`` processes (None or 1: in this process). Returns the documents' ``datasets.Dataset`` (or
    ``IterableDataset`` for a stream)."""
    from datasets import Dataset, Features, Sequence, Value

    features = Features({"input_ids": Sequence(Value("int32")), **({"loss_mask": Sequence(Value("int8"))} if spec.assistant_only_loss else {})})
    encoder = DocumentEncoder(tokenizer, spec, flag, locate)
    kwargs = {"batched": True, "batch_size": PACK_GROUP, "with_indices": True}
    if isinstance(raw, Dataset):
        # One process: this one, whose fast tokenizer batches on every core (its Rust threads). datasets runs
        # num_proc >= 1 in worker processes, each with TOKENIZERS_PARALLELISM=false (one thread).
        workers = num_proc if num_proc and num_proc > 1 else None
        return raw.map(encoder, features=features, num_proc=workers, desc=desc, remove_columns=raw.column_names, **kwargs)
    # A stream's columns are unknown before it is read: keep the form's own, then replace them.
    read = {"text": [spec.text_column], "messages": ["messages"], "prompt_completion": ["prompt", "completion"]}[spec.form]
    return raw.select_columns(read).map(encoder, features=features, remove_columns=read, **kwargs)


def documents_to_blocks(docs, max_seq_length: int, frame: tuple[list[int], list[int]], packing: bool, desc: str = "pack"):
    """Documents -> blocks (:func:`~fcd_ds.data.blocks.pack_table` in groups of :data:`PACK_GROUP`
    documents, or :func:`~fcd_ds.data.blocks.truncate_table` with ``packing=False``), one process (NumPy
    on Arrow: seconds per GB), so the blocks do not depend on the tokenising processes' count."""
    from datasets import Dataset

    fn = pack_table if packing else truncate_table
    kwargs = {"batched": True, "batch_size": PACK_GROUP, "fn_kwargs": {"max_seq_length": max_seq_length, "prefix": frame[0], "suffix": frame[1]}}
    arrow = docs.with_format("arrow")
    if isinstance(docs, Dataset):
        return arrow.map(fn, desc=desc, remove_columns=docs.column_names, **kwargs).with_format(None)
    return arrow.map(fn, **kwargs).with_format(None)  # a stream's map keeps only what the function returns


def _token_count(docs) -> int:
    import pyarrow.compute as pc

    lengths = pc.list_value_length(docs.data.table.column("input_ids"))
    return int(pc.sum(lengths).as_py() or 0)


def load_text_blocks(tokenizer, data_args, data: TextData, num_proc: int | None = None):
    """``(train, validation)`` block ``datasets.Dataset`` objects from raw data (map-style): rows ``input_ids``
    (int32, ``max_seq_length`` each when packed, at most that when not), ``document_starts`` (packed) and
    ``loss_mask`` (with assistant-only loss). Without held-out data the last ``validation_split_percentage``
    percent of train blocks are held out. Logs rows, documents, tokens and blocks (rank 0).

    Raises:
        UsageError: as :func:`~fcd_ds.data.sources.load_split`, a bad row (names it), no full block.
    """
    frame = block_frame(tokenizer, data.task)
    out = {}
    for which, source in (("train", data.train), ("validation", data.validation)):
        if source is None:
            continue
        raw, locate = load_split(source, data_args)
        if raw is None:
            if which == "train":
                raise UsageError(f"{source.flag}: {source.described} has no split {source.split!r}; pass --train_split")
            continue  # no held-out split: a slice of train below
        docs = tokenize_documents(raw, tokenizer, data.spec, source.flag, locate, num_proc, desc=f"tokenize {which}")
        blocks = documents_to_blocks(docs, data_args.max_seq_length, frame, data_args.packing, desc=f"pack {which}")
        skipped = raw.num_rows - docs.num_rows
        _log(f"{source.flag} {source.described}: {raw.num_rows:,} rows -> {docs.num_rows:,} documents"
             f"{f' ({skipped:,} empty rows skipped)' if skipped else ''} -> {_token_count(docs):,} tokens -> "
             f"{blocks.num_rows:,} {'blocks' if data_args.packing else 'sequences'} of {data_args.max_seq_length}")
        out[which] = blocks
    train = out["train"]
    if "validation" in out:
        valid = out["validation"]
    else:
        n_valid = max(1, len(train) * data_args.validation_split_percentage // 100)
        train, valid = train.select(range(len(train) - n_valid)), train.select(range(len(train) - n_valid, len(train)))
    unit = "full block" if data_args.packing else "document"
    for flag, ds in (("--train_file", train), ("--validation_file", valid)):
        if len(ds) == 0:
            raise UsageError(f"{flag}: no {unit} of {data_args.max_seq_length} tokens; use more text or a smaller --max_seq_length")
    return train, valid
