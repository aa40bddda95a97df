"""Streaming (``--streaming``): raw files read lazily, tokenised and packed on the fly, each rank its own
share, resumed exactly where it stopped.

Per epoch ``e`` the files are read in a seeded order (``seed + e``; the given order in epoch 0 when
there is one file), split between ranks with ``datasets.distributed.split_dataset_by_node`` (whole
files per rank when their count divides by the world size, else every rank reads all and keeps its
1/world of the rows), tokenised (:class:`~fcd_ds.data.documents.DocumentEncoder`) and packed
(:func:`~fcd_ds.data.blocks.pack_table`) in the same groups of documents as the map-style path, so one
rank's stream of one file gives the same blocks as ``--streaming false``. Rows are not shuffled within
files (a shuffle buffer's content is lost on resume, so resuming would not be exact): shuffle the
corpus once when preparing its shards, or use a prepared folder.

Batches come from torchdata's ``StatefulDataLoader`` (``--dataloader_num_workers`` processes prefetch
and tokenise ahead; files are split between the workers), whose ``state_dict`` (the position of every
worker's ``datasets`` iterator) is saved with each checkpoint, per rank, as JSON.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import UsageError
from .documents import DocumentSpec
from .sources import DataSource, RowLocator, load_stream

__all__ = ["StreamEpochs", "StreamingMicroBatches"]


@dataclass(frozen=True)
class StreamEpochs:
    """One rank's streamed epochs: ``epochs(e)`` is epoch ``e``'s blocks as a ``datasets.IterableDataset``
    of rows (``input_ids``, ``document_starts``, ``loss_mask`` with assistant-only loss)."""

    source: DataSource
    data_args: object
    tokenizer: object
    spec: DocumentSpec
    frame: tuple
    rank: int
    world: int
    seed: int

    def __call__(self, epoch: int):
        from datasets.distributed import split_dataset_by_node

        from .text import documents_to_blocks, tokenize_documents

        files = list(self.source.files)
        if len(files) > 1 and epoch > 0:
            random.Random(self.seed + epoch).shuffle(files)
        stream = load_stream(self.source, self.data_args, tuple(files) if files else None)
        raw = split_dataset_by_node(stream, rank=self.rank, world_size=self.world)
        locate = RowLocator((f"the stream of {self.source.described} on rank {self.rank} (epoch {epoch})",))
        docs = tokenize_documents(raw, self.tokenizer, self.spec, self.source.flag, locate)
        return documents_to_blocks(docs, self.data_args.max_seq_length, self.frame, self.data_args.packing)

    def first_blocks(self, n: int):
        """The first ``n`` blocks of epoch 0 (0: all) as a map-style ``datasets.Dataset`` (held-out data).

        Raises:
            UsageError: the stream holds no block.
        """
        from itertools import islice

        from datasets import Dataset

        rows = list(islice(self(0), n or None))
        if not rows:
            raise UsageError(f"{self.source.flag}: {self.source.described} holds no full block of "
                             f"{self.data_args.max_seq_length} tokens; use more text or a smaller --max_seq_length")
        return Dataset.from_list(rows)


def _clean_usage_error(exc: UsageError) -> UsageError:
    """A DataLoader worker's UsageError comes back with the worker's traceback in its message: keep its last line."""
    text = str(exc)
    if "Original Traceback" not in text:
        return exc
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return UsageError(last.split("UsageError: ", 1)[-1])


class _Collate:
    """A DataLoader batch (a list of row dicts) -> the task's batch, in the worker that read the rows."""

    def __init__(self, collate: Callable[[dict], dict]):
        self.collate = collate

    def __call__(self, rows: list[dict]) -> dict:
        return self.collate({k: [r[k] for r in rows] for k in rows[0]})  # columns, as dataset[indices] gives them


@dataclass
class StreamingMicroBatches:
    """Endless stream of this rank's micro-batches over streamed epochs; a drop-in for
    :class:`~fcd_ds.data.loader.MicroBatches` (``next()``, ``position``, ``state_dict``/``load_state_dict``,
    ``close``).

    ``make_epoch(e)`` returns the epoch's ``IterableDataset``; ``collate`` turns a dict of column lists
    into the task's batch (in the worker processes, with ``num_workers``). The state is ``{"epoch",
    "position", "in_epoch", "loader"}``: JSON, one per rank.

    Raises (from ``next``):
        UsageError: a bad row met in the stream (names it), or an epoch that gives this rank no micro-batch.
    """

    make_epoch: Callable[[int], object]
    batch_size: int
    collate: Callable[[dict], dict]
    num_workers: int = 0
    prefetch_factor: int | None = None
    position: int = 0
    epoch: int = 0
    _loader: object = field(default=None, repr=False)
    _iter: object = field(default=None, repr=False)
    _pending: dict | None = field(default=None, repr=False)
    _in_epoch: int = 0

    def _open(self) -> None:
        from torchdata.stateful_dataloader import StatefulDataLoader

        kwargs = {"prefetch_factor": self.prefetch_factor} if self.num_workers and self.prefetch_factor else {}
        # Its own generator: no draw from torch's global RNG (the dropout masks stay those of an uninterrupted run).
        self._loader = StatefulDataLoader(self.make_epoch(self.epoch), batch_size=self.batch_size, drop_last=True,
                                          collate_fn=_Collate(self.collate), num_workers=self.num_workers,
                                          generator=torch.Generator().manual_seed(self.epoch), **kwargs)
        if self._pending is not None:
            self._loader.load_state_dict(self._pending)
            self._pending = None
        self._iter = iter(self._loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            self._open()
        try:
            batch = next(self._iter)
        except StopIteration:
            if self._in_epoch == 0:
                raise UsageError(f"--streaming: epoch {self.epoch} gave this rank no micro-batch of {self.batch_size}; "
                                 "use more data, fewer ranks or a smaller --per_device_train_batch_size") from None
            self.close()
            self.epoch, self._in_epoch = self.epoch + 1, 0
            return next(self)  # the next epoch's first micro-batch
        except UsageError as exc:
            raise _clean_usage_error(exc) from None
        self.position += 1
        self._in_epoch += 1
        return batch

    def state_dict(self) -> dict:
        """Where the stream stands: JSON-serialisable (``json.dumps`` works)."""
        loader = self._loader.state_dict() if self._loader is not None else self._pending
        return {"epoch": self.epoch, "position": self.position, "in_epoch": self._in_epoch, "loader": loader}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s output (before the first ``next``)."""
        self.close()
        self.epoch, self.position, self._in_epoch = state["epoch"], state["position"], state.get("in_epoch", 0)
        self._pending = state["loader"]

    def close(self) -> None:
        """Stop the DataLoader's workers (if any)."""
        self._iter = self._loader = None

