"""The trainer core (model/trainer.py) on a model small enough to retrace by hand: a linear
regression whose micro-batches are a pure function of their number."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from model.trainer import LoopConfig, Objective, fit, lr_lambda, param_groups


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x, y):
        error = self.linear(x).squeeze(-1) - y
        return error.pow(2).mean(), error.abs().mean()


class Batches(torch.utils.data.Dataset):
    per_epoch = 4

    def __len__(self):
        return 10**9

    def position(self, micro: int) -> dict:
        return {"epoch": micro // self.per_epoch, "batch_in_epoch": micro % self.per_epoch}

    def __getitem__(self, micro: int) -> dict:
        generator = torch.Generator().manual_seed(micro)
        x = torch.randn(5, 3, generator=generator)
        return {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(5, generator=generator)}


class RegressionObjective(Objective):
    name = "regression"

    def __init__(self):
        torch.manual_seed(0)
        self.module = Regression()
        self.data = Batches()

    def inputs(self, batch, step):
        return batch

    def loss(self, output):
        mse, mae = output
        return mse, {"mae": mae}


def config(**overrides) -> LoopConfig:
    return LoopConfig(**{"steps": 6, "lr": 0.05, "weight_decay": 0.01, "warmup_steps": 2, "log_every": 1,
                         "grad_clip": 1.0, **overrides})


def test_each_logged_step_is_the_mean_of_its_micro_batches_figures():
    objective = RegressionObjective()
    start = copy.deepcopy(objective.module)
    metrics = fit(objective, config(steps=1, grad_accumulation=2), torch.device("cpu"))["metrics"]
    with torch.no_grad():
        figures = [start(**objective.data[micro]) for micro in (0, 1)]
    assert metrics[0]["loss"] == pytest.approx(sum(float(f[0]) for f in figures) / 2, abs=1e-6)
    assert metrics[0]["mae"] == pytest.approx(sum(float(f[1]) for f in figures) / 2, abs=1e-6)


def test_the_loop_takes_adamw_steps_on_the_clipped_gradients_at_the_scheduled_rate():
    cfg = config(grad_accumulation=2)
    objective = RegressionObjective()
    reference = copy.deepcopy(objective.module)
    fit(objective, cfg, torch.device("cpu"))

    # The same run written out with the default (per-parameter) AdamW.
    optimizer = torch.optim.AdamW(param_groups(reference, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, objective.data))
    for step in range(cfg.steps):
        optimizer.zero_grad()
        for micro in range(cfg.grad_accumulation):
            (reference(**objective.data[step * cfg.grad_accumulation + micro])[0] / cfg.grad_accumulation).backward()
        torch.nn.utils.clip_grad_norm_(list(reference.parameters()), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
    # the trainer's fused AdamW does the same update in one kernel: equal up to float rounding
    for trained, expected in zip(objective.module.parameters(), reference.parameters()):
        torch.testing.assert_close(trained, expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(objective.module.linear.weight, RegressionObjective().module.linear.weight)  # it trained
