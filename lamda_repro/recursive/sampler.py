"""Which fixed-length sequences a training step reads: a seeded permutation of the sequence
indices per epoch, a position that is one integer (sequences consumed so far, over all ranks),
and the slice of each global batch that one rank reads.

Everything here is a pure function of (number of sequences, seed, position, batch, rank, world
size), so a resumed run finds its next batch in constant time from its position and two runs
that ask for the same data and seed read the same sequences in the same order.
"""

from __future__ import annotations

import numpy as np


class SamplerError(ValueError):
    """A batch cannot be split as asked (ranks, sizes)."""


def epoch_order(num_sequences: int, seed: int, epoch: int) -> np.ndarray:
    """The order of sequence indices in ``epoch``: a permutation drawn from (seed, epoch) alone."""
    rng = np.random.default_rng([seed, epoch])
    dtype = np.int32 if num_sequences < 2**31 else np.int64
    return rng.permutation(num_sequences).astype(dtype, copy=False)


def rank_slice(batch_size: int, rank: int, world_size: int) -> slice:
    """The rows of a global batch of ``batch_size`` that ``rank`` reads: equal contiguous parts."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise SamplerError(f"rank {rank} is not one of {world_size} ranks")
    if batch_size % world_size:
        raise SamplerError(f"batch_size {batch_size} is not divisible by the {world_size} ranks")
    share = batch_size // world_size
    return slice(rank * share, (rank + 1) * share)


class SequenceOrder:
    """Global sequence indices at any position: epoch e is ``epoch_order(n, seed, e)`` (or the
    identity without shuffling); position p is index ``p mod n`` of epoch ``p // n``. Keeps the
    permutation of the epoch last asked for (one array of n indices), so reading on is cheap."""

    def __init__(self, num_sequences: int, seed: int, shuffle: bool = True):
        if num_sequences < 1:
            raise SamplerError("no sequence to sample from")
        self.num_sequences = num_sequences
        self.seed = seed
        self.shuffle = shuffle
        self._epoch: int | None = None
        self._order: np.ndarray | None = None

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            n = self.num_sequences
            self._order = epoch_order(n, self.seed, epoch) if self.shuffle else np.arange(n)
            self._epoch = epoch
        return self._order

    def indices(self, position: int, count: int) -> np.ndarray:
        """The ``count`` sequence indices read from ``position`` on (crossing epochs as needed)."""
        out = []
        while count > 0:
            epoch, offset = divmod(position, self.num_sequences)
            take = min(count, self.num_sequences - offset)
            out.append(self._order_of(epoch)[offset : offset + take])
            position += take
            count -= take
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
