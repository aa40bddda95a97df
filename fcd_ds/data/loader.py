"""Map-style datasets -> resumable, rank-sharded micro-batches, collated in DataLoader workers.

Order: ``torch.utils.data.DistributedSampler``'s (seeded by ``seed + epoch``, ``drop_last=True``), so
ranks see disjoint blocks; computed as a tensor per epoch, so memory stays at 8 bytes per block
whatever the corpus. Optimizer step s reads blocks ``perm[s * G : (s + 1) * G]`` of the epoch's
permutation, G = micro-batch x accumulation x ranks, split over ranks and micro-batches, and an epoch
is ``len // G`` whole steps: the samples of every step are the same for every split of G, so a run
resumed on another number of ranks (the same G) reads what the uninterrupted run would have. ``position`` counts the micro-batches handed to the training loop; a stream built
with the same arguments and ``position`` continues exactly where the saved one stopped, however many
batches the workers had prefetched (``--dataloader_num_workers``, ``--dataloader_prefetch_factor``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import UsageError

__all__ = ["MicroBatches", "make_micro_batches", "eval_batches", "epoch_order"]


def epoch_order(n: int, rank: int, world: int, seed: int, epoch: int) -> torch.Tensor:
    """This rank's block indices of epoch ``epoch``: ``DistributedSampler(shuffle=True, drop_last=True)``'s
    order (``randperm(n)`` under ``manual_seed(seed + epoch)``, cut to a multiple of ``world``, every
    ``world``-th from ``rank``), as a (n // world,) int64 tensor."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    per_rank = n // world
    return torch.randperm(n, generator=g)[: per_rank * world][rank::world]


class _BatchIndices(Sampler):
    """Endless ``(position, [indices])`` of micro-batches from ``start`` on."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, start: int, per_epoch: int):
        self.n, self.batch_size, self.rank, self.world, self.seed, self.start = n, batch_size, rank, world, seed, start
        self.per_epoch = per_epoch

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        position = self.start
        while True:
            epoch, k = divmod(position, self.per_epoch)
            order = epoch_order(self.n, self.rank, self.world, self.seed, epoch)
            for j in range(k, self.per_epoch):
                yield position, order[j * self.batch_size : (j + 1) * self.batch_size].tolist()
                position += 1


class _Rows(Dataset):
    """``dataset[indices]`` (a dict of column lists) for a sampler item ``(position, indices)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, item):
        return self.dataset[item[1]]

    def __len__(self):
        return len(self.dataset)


class MicroBatches:
    """Endless, resumable stream of this rank's micro-batches, reshuffled every epoch.

    Args:
        dataset: a map-style dataset whose ``dataset[list]`` gives a dict of columns (``datasets.Dataset``).
        batch_size, rank, world_size, seed: the micro-batch per rank, this rank, the ranks, the order's seed.
        collate: the task's ``rows -> batch`` (e.g. ``{"input_ids": (B, N) long, "attention_mask": (B, N) long}``),
            run in the worker processes when ``num_workers`` > 0 (it must not depend on the training
            process's RNG: the tasks seed any randomness from the batch itself).
        position: micro-batches already handed out (resume).
        num_workers, prefetch_factor: DataLoader workers and the batches each keeps ready.
        accumulation: micro-batches per optimizer step; an epoch is a whole number of steps of
            ``batch_size x accumulation x world_size`` blocks.

    Raises:
        UsageError: the global batch (micro-batch x accumulation x ranks) is more than the blocks.
    """

    def __init__(self, dataset, batch_size: int, rank: int, world_size: int, seed: int, collate: Callable[[dict], dict],
                 position: int = 0, num_workers: int = 0, prefetch_factor: int | None = None, accumulation: int = 1):
        self.dataset, self.batch_size, self.rank, self.world_size, self.seed = dataset, batch_size, rank, world_size, seed
        self.collate, self.num_workers, self.prefetch_factor = collate, num_workers, prefetch_factor
        self.per_epoch = len(dataset) // (batch_size * accumulation * world_size) * accumulation  # micro-batches of whole steps
        if self.per_epoch == 0:
            raise UsageError(
                f"--per_device_train_batch_size: {batch_size} x accumulation {accumulation} x {world_size} ranks is more than the "
                f"{len(dataset)} training blocks; use a smaller batch or more data"
            )
        self._position = position
        self._iter = None

    @property
    def position(self) -> int:
        """Micro-batches handed out so far (what a checkpoint records)."""
        return self._position

    @position.setter
    def position(self, value: int) -> None:
        self.close()  # the next batch is read from the new position
        self._position = value

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            sampler = _BatchIndices(len(self.dataset), self.batch_size, self.rank, self.world_size, self.seed, self._position, self.per_epoch)
            kwargs = {"prefetch_factor": self.prefetch_factor} if self.num_workers and self.prefetch_factor else {}
            # A generator of its own: the iterator's base seed would otherwise be drawn from torch's global RNG,
            # shifting the dropout masks of every later step (and a resumed run's differently from an uninterrupted one).
            loader = DataLoader(_Rows(self.dataset), sampler=sampler, batch_size=None, collate_fn=self.collate,
                                num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed), **kwargs)
            self._iter = iter(loader)
        batch = next(self._iter)
        self._position += 1
        return batch

    def state_dict(self) -> dict:
        """``{"position": micro-batches handed out}``."""
        return {"position": self._position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]

    def close(self) -> None:
        """Stop the DataLoader's workers (if any); the next ``next`` starts them again at :attr:`position`."""
        self._iter = None


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


def make_micro_batches(train, batch_size: int, rank: int, world_size: int, seed: int, collate: Callable[[dict], dict],
                       num_workers: int = 0, prefetch_factor: int | None = None, accumulation: int = 1):
    """:class:`MicroBatches` over a map-style dataset, or a
    :class:`~fcd_ds.data.streaming.StreamingMicroBatches` over a :class:`~fcd_ds.data.streaming.StreamEpochs`."""
    from .streaming import StreamEpochs, StreamingMicroBatches

    if isinstance(train, StreamEpochs):
        return StreamingMicroBatches(train, batch_size, collate, num_workers, prefetch_factor)
    return MicroBatches(train, batch_size, rank, world_size, seed, collate, num_workers=num_workers, prefetch_factor=prefetch_factor,
                        accumulation=accumulation)
