"""Text corpus -> fixed-length token blocks -> resumable, rank-sharded micro-batches.

Loading and tokenisation follow transformers' ``run_clm.py``: ``datasets.load_dataset("text",
keep_linebreaks=True)``, tokenise, concatenate, cut into blocks of ``max_seq_length`` (the tail is
dropped), labels = inputs. Every block is full, so the attention mask is all ones; the losses still
take masks, for corpora with padding.
"""

from __future__ import annotations

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


def load_blocks(
    tokenizer,
    train_file: str,
    validation_file: str | None,
    max_seq_length: int,
    validation_split_percentage: int = 5,
):
    """Tokenised train and validation blocks.

    Args:
        tokenizer: the teacher's tokenizer (shared with the student).
        train_file, validation_file: plain-text files; without a validation file the last
            ``validation_split_percentage`` percent of train blocks are held out (deterministic).
        max_seq_length: tokens per block.

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

    def group(batch):
        ids = list(chain.from_iterable(batch["input_ids"]))
        n = len(ids) // max_seq_length * max_seq_length
        return {"input_ids": [ids[i : i + max_seq_length] for i in range(0, n, max_seq_length)]}

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

    Yields dicts ``{"input_ids": (B, N) long, "attention_mask": (B, N) long}``.
    """

    dataset: object
    batch_size: int
    rank: int
    world_size: int
    seed: int
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
        ids = self.dataset[idx]["input_ids"]  # (B, N)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def eval_batches(dataset, batch_size: int, rank: int, world_size: int, max_samples: int = 0) -> list[dict]:
    """This rank's share of the held-out blocks, in order, as micro-batches.

    The block count is rounded down to a multiple of ``batch_size * world_size`` so that every rank
    runs the same number of forwards (ZeRO-3 gathers parameters collectively).

    Raises:
        UsageError: fewer held-out blocks than one batch on every rank.
    """
    n = len(dataset) if not max_samples else min(max_samples, len(dataset))
    per_round = batch_size * world_size
    n = n // per_round * per_round
    if n == 0:
        raise UsageError(
            f"--per_device_eval_batch_size: {batch_size} x {world_size} ranks exceeds the {len(dataset)} held-out "
            "blocks (or --max_eval_samples); lower it or add validation text"
        )
    out = []
    for start in range(rank * batch_size, n, per_round):
        ids = dataset[start : start + batch_size]["input_ids"]  # (B, N)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out
