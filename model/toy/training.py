"""Toy pretraining through the trainer core (model/trainer.py): in memory, nothing written."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..trainer import LoopConfig, Objective, fit


class Batches(torch.utils.data.Dataset):
    """Batch m of a toy pretraining: `steps` index batches, epochs of seeded permutations that
    batches never cross (no repeats), drawn up front; `make(indices)` builds the batch."""

    def __init__(self, n: int, batch_size: int, steps: int, seed: int, make):
        generator = torch.Generator().manual_seed(seed)
        batch_size = min(batch_size, n)
        self.per_epoch, self.make, self.batches = n // batch_size, make, []
        order, pos = torch.randperm(n, generator=generator), 0
        for _ in range(steps):
            if pos + batch_size > n:
                order, pos = torch.randperm(n, generator=generator), 0
            self.batches.append(order[pos:pos + batch_size])
            pos += batch_size

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, m: int) -> dict:
        return self.make(self.batches[m])

    def position(self, m: int) -> dict:
        return {"epoch": m // self.per_epoch, "batch_in_epoch": m % self.per_epoch}


class _Pretraining(Objective):
    """A toy piece's pretraining as an objective of the trainer core; it keeps each step's loss."""

    name = "toy"

    def __init__(self, model, data: Batches, groups: list[dict], loss=None, after_step=None):
        self.module, self.data, self.groups = model, data, groups
        self.loss_of, self.after = loss or (lambda output: output.loss), after_step
        self.losses: list[float] = []

    def param_groups(self, weight_decay: float) -> list[dict]:
        return self.groups

    def inputs(self, batch: dict, step: int) -> dict:
        return batch

    def loss(self, output):
        loss = self.loss_of(output)
        self.losses.append(loss.item())
        return loss, {}

    def after_step(self) -> None:
        if self.after is not None:
            self.after()


def train_in_memory(model, data: Batches, groups: list[dict], lr: float, warmup: int, seed: int, grad_clip: float = 0.0,
              loss=None, after_step=None) -> list[float]:
    """Train in memory (nothing written) with AdamW (betas 0.9, 0.98) and linear warmup then
    cosine to zero (the schedule open_clip's training uses); returns each step's loss."""
    objective = _Pretraining(model, data, groups, loss, after_step)
    config = LoopConfig(steps=len(data), lr=lr, warmup_steps=warmup, betas=(0.9, 0.98), grad_clip=grad_clip,
                        seed=seed, log_every=len(data))
    fit(objective, config, torch.device("cpu"))
    return objective.losses


@contextmanager
def threads(n: int):
    """Run with `n` torch intra-op threads, then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
