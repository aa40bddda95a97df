"""Datasets -> resumable, rank-sharded micro-batches; text corpus -> fixed-length token blocks.

Text blocks follow transformers' ``run_clm.py``: ``datasets.load_dataset("text", keep_linebreaks=True)``,
tokenise, concatenate, cut into blocks of ``max_seq_length`` (the tail is dropped). Every block is
full, so the attention mask is all ones; the losses still take masks, for data with padding. Turning
rows into model batches (masks, MLM masking, labels) is the task's ``collate``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler

from .errors import UsageError

__all__ = ["check_data_files", "load_blocks", "MicroBatches", "eval_batches"]


def check_data_files(train_file: str, validation_file: str | None) -> None:
    """Raises :class:`UsageError` naming the flag if a data file is missing or empty."""
    for flag, path in (("--train_file", train_file), ("--validation_file", validation_file)):
        if path is None:
            continue
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"{flag}: {path} does not exist; pass a plain-text file")
        if p.stat().st_size == 0:
            raise UsageError(f"{flag}: {path} is empty")


def _special_token_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence (``[CLS]``/``[SEP]`` for BERT,
    ``<s>``/``</s>`` for RoBERTa), read off its own output for a one-token text."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    start = next(i for i in range(len(framed)) if framed[i : i + len(bare)] == bare)
    return framed[:start], framed[start + len(bare) :]


def load_blocks(
    tokenizer,
    train_file: str,
    validation_file: str | None,
    max_seq_length: int,
    validation_split_percentage: int = 5,
    *,
    special_tokens: bool = False,
):
    """Tokenised train and validation blocks.

    Args:
        tokenizer: the teacher's tokenizer (shared with the student).
        train_file, validation_file: plain-text files; without a validation file the last
            ``validation_split_percentage`` percent of train blocks are held out (deterministic).
        max_seq_length: tokens per block.
        special_tokens: wrap every block in the tokenizer's special tokens (``[CLS] ... [SEP]`` for BERT,
            ``<s> ... </s>`` for RoBERTa), text filling the other ``max_seq_length - k`` positions.

    Returns:
        ``(train, validation)``: ``datasets.Dataset`` objects with an ``input_ids`` column of
        ``max_seq_length`` ints, torch-formatted.

    Raises:
        UsageError: a file yields no full block.
    """
    from datasets import load_dataset

    files = {"train": train_file, **({"validation": validation_file} if validation_file else {})}
    raw = load_dataset("text", data_files=files, keep_linebreaks=True)

    def tokenize(batch):
        return tokenizer(batch["text"], add_special_tokens=False)

    prefix, suffix = _special_token_frame(tokenizer) if special_tokens else ([], [])
    body = max_seq_length - len(prefix) - len(suffix)

    def group(batch):
        ids = list(chain.from_iterable(batch["input_ids"]))
        n = len(ids) // body * body
        blocks = [ids[i : i + body] for i in range(0, n, body)]
        if special_tokens:
            blocks = [prefix + b + suffix for b in blocks]
        return {"input_ids": blocks}

    tokenized = raw.map(tokenize, batched=True, remove_columns=["text"], desc="tokenize")
    tokenized = tokenized.remove_columns([c for c in tokenized["train"].column_names if c != "input_ids"])
    blocks = tokenized.map(group, batched=True, batch_size=1000, desc=f"group into blocks of {max_seq_length}")
    train = blocks["train"]
    if validation_file:
        valid = blocks["validation"]
    else:
        n_valid = max(1, len(train) * validation_split_percentage // 100)
        train, valid = train.select(range(len(train) - n_valid)), train.select(range(len(train) - n_valid, len(train)))
    for flag, ds in (("--train_file", train), ("--validation_file", valid)):
        if len(ds) == 0:
            raise UsageError(f"{flag}: no full block of {max_seq_length} tokens; use a longer text or a smaller --max_seq_length")
    return train.with_format("torch"), valid.with_format("torch")


@dataclass
class MicroBatches:
    """Endless, resumable stream of this rank's micro-batches, reshuffled every epoch.

    Order: ``torch.utils.data.DistributedSampler`` (seeded, ``set_epoch(e)``, ``drop_last=True``), so
    ranks see disjoint blocks. ``position`` counts micro-batches handed out; a new stream built with the
    same arguments and ``position`` continues exactly where the saved one stopped.

    Yields ``collate(dataset[indices])``: the task's batch dict, e.g. ``{"input_ids": (B, N) long,
    "attention_mask": (B, N) long, ...}``.
    """

    dataset: object
    batch_size: int
    rank: int
    world_size: int
    seed: int
    collate: Callable[[dict], dict]
    position: int = 0

    def __post_init__(self):
        self.sampler = DistributedSampler(
            self.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=self.seed, drop_last=True
        )
        self.per_epoch = len(self.sampler) // self.batch_size
        if self.per_epoch == 0:
            raise UsageError(
                f"--per_device_train_batch_size: {self.batch_size} x {self.world_size} ranks is more than the "
                f"{len(self.dataset)} training blocks; use a smaller batch or more data"
            )
        self._epoch, self._order = None, None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        epoch, k = divmod(self.position, self.per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._order = epoch, list(self.sampler)
        idx = self._order[k * self.batch_size : (k + 1) * self.batch_size]
        self.position += 1
        return self.collate(self.dataset[idx])


def eval_batches(
    dataset, batch_size: int, rank: int, world_size: int, max_samples: int = 0, *, collate: Callable[[dict], dict]
) -> list[dict]:
    """This rank's share of the held-out rows (the first ``max_samples``, 0 = all), in order, as batches.

    Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively): the rows are
    padded to a multiple of ``batch_size * world_size`` by repeating row 0, and every batch carries
    ``example_mask`` (B,) long, 0 on those padding rows, so that metrics count each real row once.

    Returns:
        ``[collate(dataset[indices]) | {"example_mask": (B,)}, ...]``.

    Raises:
        UsageError: no held-out row.
    """
    n = len(dataset) if not max_samples else min(max_samples, len(dataset))
    if n == 0:
        raise UsageError("--validation_file: no held-out rows; pass a validation file or a larger validation split")
    per_round = batch_size * world_size
    padded = -(-n // per_round) * per_round
    out = []
    for start in range(rank * batch_size, padded, per_round):
        idx = list(range(start, start + batch_size))
        real = torch.tensor([int(i < n) for i in idx])  # (B,)
        batch = collate(dataset[[i if i < n else 0 for i in idx]])
        out.append({**batch, "example_mask": real})
    return out
