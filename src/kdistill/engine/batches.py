"""Which records go into which optimizer step, as a pure function of (seed, step).

Because the order is computed, not iterated, a resumed run needs only the step number to continue
exactly where it stopped, and any number of processes and accumulation steps see the same global
batches as a single process would.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from kdistill.errors import ConfigError


class BatchPlan:
    """`lengths` (optional) groups records of similar length into the same batch: batches are drawn
    from sorted windows of `group` batches and then shuffled, which cuts padding without making the
    order any less a function of (seed, step)."""

    def __init__(self, num_records: int, batch_size: int, grad_accum: int, world: int, rank: int, seed: int,
                 lengths: list[int] | None = None, group: int = 64):
        if batch_size % (grad_accum * world):
            raise ConfigError(
                f"train.batch_size {batch_size} must be divisible by train.grad_accum ({grad_accum}) × processes ({world})"
            )
        self.n, self.batch, self.accum, self.world, self.rank, self.seed = num_records, batch_size, grad_accum, world, rank, seed
        self.micro = batch_size // (grad_accum * world)
        self.lengths, self.group = lengths, group

    @lru_cache(maxsize=4)
    def _epoch(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        if self.lengths is None:
            return order
        window = self.batch * self.group
        batches = []
        for start in range(0, self.n, window):
            chunk = sorted(order[start: start + window], key=lambda i: self.lengths[i])
            batches += [chunk[i: i + self.batch] for i in range(0, len(chunk), self.batch)]
        shuffled = torch.randperm(len(batches), generator=gen).tolist()
        return [i for b in shuffled for i in batches[b]]

    def global_indices(self, step: int) -> list[int]:
        """Record indices of the whole global batch of `step`, drawn from a reshuffled stream of epochs."""
        start = step * self.batch
        out = []
        while len(out) < self.batch:
            epoch, offset = divmod(start + len(out), self.n)
            take = min(self.batch - len(out), self.n - offset)
            out += self._epoch(epoch)[offset: offset + take]
        return out

    def micro_epochs(self, step: int) -> list[list[int]]:
        """The epoch each record of `micro_batches(step)` is drawn in (seeds augmented views: one per epoch)."""
        start = step * self.batch
        per_micro = self.micro * self.world
        out = []
        for j in range(self.accum):
            first = start + j * per_micro + self.rank * self.micro
            out.append([(first + i) // self.n for i in range(self.micro)])
        return out

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's micro-batches for `step`: micro j of the global batch, then this rank's slice."""
        indices = self.global_indices(step)
        per_micro = self.micro * self.world
        out = []
        for j in range(self.accum):
            chunk = indices[j * per_micro: (j + 1) * per_micro]
            out.append(chunk[self.rank * self.micro: (self.rank + 1) * self.micro])
        return out
