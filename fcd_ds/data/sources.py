"""Raw data in the formats users hold -> ``datasets`` splits, with one-line errors naming the file.

Accepted, as transformers' ``run_clm.py`` / ``run_glue.py`` and ``datasets.load_dataset`` take them:

* ``--train_file`` / ``--validation_file``: one file, several files joined by commas, or a glob
  (``shards/*.parquet``), of one format: ``.txt`` (datasets' ``text`` builder), ``.json`` / ``.jsonl``
  (``json``), ``.csv`` / ``.tsv`` (``csv``), ``.parquet`` (``parquet``), each also compressed
  (``.gz``, ``.bz2``, ``.xz``, ``.zst``); or a folder written by ``Dataset.save_to_disk`` /
  ``DatasetDict.save_to_disk`` (memory-mapped by ``load_from_disk``; ``--train_split`` picks the split of
  a ``DatasetDict``).
* ``--dataset_name`` (+ ``--dataset_config_name``, ``--train_split``, ``--validation_split``): a hub
  dataset or a local dataset folder, through ``load_dataset`` itself (a ``save_to_disk`` folder through
  ``load_from_disk``).

Map-style loading reads each file as a split of its own (``data_files={"part0": [f0], ...}``) and
concatenates them, so that an empty file, a file with other columns or a file that is not in the stated
``--encoding`` is reported by name. Streaming (``--streaming``) returns a ``datasets.IterableDataset``.
"""

from __future__ import annotations

import codecs
import glob
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

__all__ = [
    "FORMATS",
    "DataSource",
    "RowLocator",
    "resolve_source",
    "load_split",
    "load_stream",
    "peek_columns",
    "describe_columns",
    "first_undecodable_byte",
]

FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
"""File suffix -> the ``datasets`` builder that reads it."""

COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def _first_line(exc: BaseException) -> str:
    """First line of the innermost error (datasets wraps the reader's own error in DatasetGenerationError)."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _suffix(path: str) -> str:
    suffixes = [s.lower() for s in Path(path).suffixes]
    if len(suffixes) > 1 and suffixes[-1] in COMPRESSED:
        return suffixes[-2]
    return suffixes[-1] if suffixes else ""


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


@dataclass(frozen=True)
class RowLocator:
    """Maps a row index of a split back to ``row k of FILE`` (files concatenated in order)."""

    files: tuple[str, ...]
    starts: tuple[int, ...] = (0,)

    def __call__(self, index: int) -> str:
        k = max(i for i, s in enumerate(self.starts) if s <= index)
        return f"row {index - self.starts[k]} of {self.files[k]}"


@dataclass(frozen=True)
class DataSource:
    """One split's data, resolved and checked (files exist, are not empty, share one format).

    ``kind`` is ``"files"`` (``builder`` + ``files``), ``"disk"`` (a ``save_to_disk`` folder, ``path`` and
    ``split`` for a ``DatasetDict``) or ``"hub"`` (``load_dataset(name, config, split=split)``).
    ``flag`` is the command-line flag it came from, for errors.
    """

    kind: str
    flag: str
    files: tuple[str, ...] = ()
    builder: str | None = None
    path: str | None = None
    name: str | None = None
    config: str | None = None
    split: str | None = None

    @property
    def described(self) -> str:
        """What the source is, for messages: the file, ``N files (first, ...)``, the folder or the hub name."""
        if self.kind == "files":
            return self.files[0] if len(self.files) == 1 else f"{len(self.files)} files ({self.files[0]}, ...)"
        return self.path if self.kind == "disk" else f"{self.name}[{self.split}]"

    def fingerprint(self) -> list:
        """Paths, sizes and modification times of the inputs (or the hub name, config and split): what a
        prepared folder records to tell whether it was made from these inputs."""
        if self.kind == "files":
            return [[f, Path(f).stat().st_size, Path(f).stat().st_mtime_ns] for f in self.files]
        if self.kind == "disk":
            files = sorted(p for p in Path(self.path).rglob("*") if p.is_file())
            return [self.split, *[[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]]
        return [self.name, self.config, self.split]


def _expand(spec: str, flag: str) -> list[str]:
    """A file, comma-separated files or globs -> the sorted file list (each existing and non-empty)."""
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if glob.has_magic(part):
            matches = sorted(p for p in glob.glob(part, recursive=True) if Path(p).is_file())
            if not matches:
                raise UsageError(f"{flag}: the glob {part!r} matches no file; check the pattern (quote it so that the shell does not expand it)")
            out += matches
        else:
            out.append(part)
    if not out:
        raise UsageError(f"{flag}: {spec!r} names no file; pass a file, a comma-separated list or a glob")
    for f in out:
        p = Path(f)
        if p.is_dir():
            raise UsageError(f"{flag}: {f} is a folder but not one written by datasets' save_to_disk; pass its files or a glob such as {f}/*.parquet")
        if not p.is_file():
            raise UsageError(f"{flag}: {f} does not exist; pass an existing file, a comma-separated list or a glob")
        if p.stat().st_size == 0:
            raise UsageError(f"{flag}: {f} is empty; remove it from the list or fill it")
    return out


def resolve_source(data_args, which: str) -> DataSource | None:
    """The :class:`DataSource` of the ``"train"`` or ``"validation"`` split from the data flags, checked
    on the file system only (nothing is read). None when that split is not given (validation: held out
    from train instead).

    Raises:
        UsageError: a missing or empty file, a glob matching nothing, a folder that is not a saved
            dataset, an unknown suffix, or files of several formats.
    """
    split = data_args.train_split if which == "train" else data_args.validation_split
    if which == "validation" and split == "validation" and data_args.task_name is not None:
        from .glue import GLUE_VALIDATION_SPLIT

        split = GLUE_VALIDATION_SPLIT.get(data_args.task_name, split)  # mnli: validation_matched
    if data_args.dataset_name is not None:
        name = data_args.dataset_name
        config = data_args.dataset_config_name or data_args.task_name
        if _is_saved_dataset(Path(name)):
            return DataSource("disk", "--dataset_name", path=name, split=split)
        return DataSource("hub", "--dataset_name", name=name, config=config, split=split)
    flag = f"--{which}_file"
    spec = data_args.train_file if which == "train" else data_args.validation_file
    if spec is None and which == "validation" and data_args.train_file and (Path(data_args.train_file) / "dataset_dict.json").is_file():
        return DataSource("disk", "--train_file", path=data_args.train_file, split=split)  # the DatasetDict's own held-out split
    if spec is None:
        return None
    if _is_saved_dataset(Path(spec)):
        return DataSource("disk", flag, path=spec, split=split)
    files = _expand(spec, flag)
    suffixes = {_suffix(f) for f in files}
    unknown = sorted(s or "(none)" for s in suffixes if s not in FORMATS)
    if unknown:
        raise UsageError(f"{flag}: cannot read files ending in {', '.join(unknown)}; pass "
                         f"{', '.join(sorted(FORMATS))} files (optionally compressed) or a save_to_disk folder")
    builders = {FORMATS[s] for s in suffixes}
    if len(builders) > 1:
        raise UsageError(f"{flag}: the files mix formats ({', '.join(sorted(builders))}); pass files of one format")
    return DataSource("files", flag, files=tuple(files), builder=builders.pop())


def _builder_kwargs(source: DataSource, data_args) -> dict:
    kwargs: dict = {}
    if source.builder in ("text", "csv", "json"):
        kwargs["encoding"] = data_args.encoding
    if source.builder == "text":
        kwargs["sample_by"] = data_args.sample_by
        kwargs["keep_linebreaks"] = data_args.sample_by != "line"  # one document per line: its end is the EOS
    if source.builder == "csv" and any(_suffix(f) == ".tsv" for f in source.files):
        kwargs["delimiter"] = "\t"
    return kwargs


def first_undecodable_byte(path: str, encoding: str) -> tuple[int, str] | None:
    """``(byte offset, reason)`` of the first byte of ``path`` that ``encoding`` cannot decode, or None.

    Reads the file (decompressed when it ends in a compression suffix) in 1 MiB chunks through an
    incremental decoder, so memory does not grow with the file.
    """
    from datasets.utils.file_utils import xopen

    decoder = codecs.getincrementaldecoder(encoding)()
    offset = 0
    with xopen(path, "rb") as f:
        while chunk := f.read(1 << 20):
            pending = len(decoder.getstate()[0])  # bytes of a character split across chunks
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                return offset - pending + exc.start, exc.reason
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            return offset - len(decoder.getstate()[0]) + exc.start, exc.reason
    return None


def _reading_error(source: DataSource, files: tuple[str, ...], exc: BaseException, data_args) -> UsageError:
    """The one-line error for a failure inside ``load_dataset``, naming the file at fault: the first
    undecodable byte when a file is not in ``--encoding``, a file that holds no rows, else the reader's own
    first line (each file of several is read alone to find the one)."""
    from datasets import load_dataset

    encoding = data_args.encoding
    if source.builder in ("text", "csv", "json"):
        for f in files:
            bad = first_undecodable_byte(f, encoding)
            if bad is not None:
                return UsageError(f"{source.flag}: {f} is not valid {encoding} (byte {bad[0]}: {bad[1]}); convert it to {encoding} "
                                  "(e.g. iconv -f latin1 -t utf-8) or pass its --encoding")
    for f in files if len(files) > 1 else ():
        try:
            load_dataset(source.builder, data_files={"part0": [f]}, **_builder_kwargs(source, data_args))
        except Exception as alone:  # noqa: BLE001  (this is the file)
            exc, files = alone, (f,)
            break
    if "corresponds to no data" in _first_line(exc):
        return UsageError(f"{source.flag}: {files[0]} holds no rows; remove it from the list or fill it")
    where = files[0] if len(files) == 1 else source.described
    return UsageError(f"{source.flag}: cannot read {where} as {source.builder or 'a dataset'} ({_first_line(exc)}); fix the file or its format")


def _from_disk(source: DataSource):
    from datasets import DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(source.path)
    except Exception as exc:  # noqa: BLE001  (a damaged folder: one line)
        raise UsageError(f"{source.flag}: cannot load the saved dataset {source.path} ({_first_line(exc)})") from None
    if isinstance(loaded, DatasetDict):
        if source.split not in loaded:
            return None
        loaded = loaded[source.split]
    return loaded


def load_split(source: DataSource, data_args):
    """The split as ``(dataset, locate)``: a map-style ``datasets.Dataset`` (memory-mapped Arrow) and the
    :class:`RowLocator` of its rows; ``(None, None)`` when a ``DatasetDict`` folder or a hub dataset has
    no such split.

    Raises:
        UsageError: a file that cannot be read (names it: the first undecodable byte for an encoding
            error), a file that holds no rows, or files whose columns differ.
    """
    from datasets import concatenate_datasets, load_dataset

    whole = RowLocator((source.described,))
    if source.kind == "disk":
        ds = _from_disk(source)
        return (ds, whole) if ds is not None else (None, None)
    if source.kind == "hub":
        try:
            return load_dataset(source.name, source.config, split=source.split), whole
        except ValueError as exc:
            if "split" in str(exc).lower() and source.split == data_args.validation_split:
                return None, None  # no validation split: held out from train
            raise UsageError(f"--dataset_name: cannot load {source.name!r} ({_first_line(exc)}); check the name, config and split, or pass --train_file") from None
        except Exception as exc:  # noqa: BLE001  (offline, unknown name, ...)
            raise UsageError(f"--dataset_name: cannot load {source.name!r} ({_first_line(exc)}); pass --train_file") from None
    data_files = {f"part{i}": [f] for i, f in enumerate(source.files)}
    try:
        parts = load_dataset(source.builder, data_files=data_files, **_builder_kwargs(source, data_args))
    except Exception as exc:  # noqa: BLE001  (every reader error becomes one line naming the file)
        raise _reading_error(source, source.files, exc, data_args) from None
    ordered = [parts[f"part{i}"] for i in range(len(source.files))]
    columns = ordered[0].column_names
    for f, part in zip(source.files, ordered):
        if part.num_rows == 0:
            raise UsageError(f"{source.flag}: {f} holds no rows; remove it from the list or fill it")
        if part.column_names != columns:
            raise UsageError(f"{source.flag}: {f} has columns {', '.join(part.column_names)} but {source.files[0]} has "
                             f"{', '.join(columns)}; give every file the same columns")
    starts = [0]
    for part in ordered[:-1]:
        starts.append(starts[-1] + part.num_rows)
    return (ordered[0] if len(ordered) == 1 else concatenate_datasets(ordered)), RowLocator(source.files, tuple(starts))


def load_stream(source: DataSource, data_args, files: tuple[str, ...] | None = None):
    """The split as a ``datasets.IterableDataset`` read lazily (``streaming=True``); ``files`` overrides the
    source's file order (streaming epochs read the shards in a seeded order).

    Raises:
        UsageError: a save_to_disk folder (already memory-mapped: drop ``--streaming``) or a source
            that cannot be opened.
    """
    from datasets import load_dataset

    if source.kind == "disk":
        raise UsageError(f"{source.flag}: {source.path} is a save_to_disk folder, already memory-mapped; drop --streaming")
    try:
        if source.kind == "hub":
            return load_dataset(source.name, source.config, split=source.split, streaming=True)
        return load_dataset(source.builder, data_files=list(files or source.files), split="train", streaming=True,
                            **_builder_kwargs(source, data_args))
    except Exception as exc:  # noqa: BLE001
        raise _reading_error(source, tuple(files or source.files), exc, data_args) from None


def peek_columns(source: DataSource, data_args) -> tuple[list[str], dict] | None:
    """Column names and the first row of the source's first file (or of the saved / hub dataset), read
    without loading the data (a streamed first row: milliseconds), or None when a saved ``DatasetDict``
    has no such split. For plan-time checks.

    Raises:
        UsageError: as :func:`load_stream`, or a source whose first file holds no row.
    """
    if source.kind == "disk":
        ds = _from_disk(source)
        if ds is None:
            return None
        return ds.column_names, (ds[0] if len(ds) else {})
    first = (source.files[0],) if source.kind == "files" else None
    stream = load_stream(source, data_args, first)
    try:
        row = next(iter(stream), None)
    except Exception as exc:  # noqa: BLE001
        raise _reading_error(source, first or (), exc, data_args) from None
    if row is None:
        raise UsageError(f"{source.flag}: {source.described} holds no rows; fill it or remove it")
    return list(row), row


def describe_columns(columns: list[str], row: dict) -> str:
    """``name (type), ...`` of a row, for messages."""
    return ", ".join(f"{c} ({type(row.get(c)).__name__})" for c in columns)

