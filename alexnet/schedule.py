"""Learning-rate schedules; each is a small object with state_dict/load_state_dict for exact resume.

paper:    lr0, divided by 10 whenever the validation error has not improved for
          ``patience`` epochs, at most ``max_drops`` times (Krizhevsky et al. 2012).
step:     lr0 * gamma ** (epoch // step_size).
cosine:   lr0 * (1 + cos(pi * t / T)) / 2 per step, over all training steps.
constant: lr0.
step and cosine start with ``warmup_epochs`` of linear warm-up.
"""
from __future__ import annotations

import math


class LRSchedule:
    def __init__(self, kind: str, base_lr: float, epochs: int, steps_per_epoch: int, patience: int = 1,
                 max_drops: int = 3, step_size: int = 30, gamma: float = 0.1, warmup_epochs: int = 0):
        self.kind, self.base_lr, self.epochs, self.steps_per_epoch = kind, base_lr, epochs, steps_per_epoch
        self.patience, self.max_drops, self.step_size, self.gamma = patience, max_drops, step_size, gamma
        self.warmup_steps = warmup_epochs * steps_per_epoch
        # paper schedule state
        self.best_err = math.inf
        self.bad_epochs = 0
        self.drops = 0

    def lr(self, step: int, epoch: int) -> float:
        if self.kind == "paper":
            return self.base_lr * 0.1 ** self.drops
        if self.kind != "constant" and step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "step":
            return self.base_lr * self.gamma ** (epoch // self.step_size)
        if self.kind == "cosine":
            total = max(1, self.epochs * self.steps_per_epoch - self.warmup_steps)
            t = min(step - self.warmup_steps, total)
            return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * t / total))
        return self.base_lr

    def end_epoch(self, val_err: float) -> None:
        """The paper's rule: drop the lr when the validation error stops improving."""
        if val_err < self.best_err:
            self.best_err, self.bad_epochs = val_err, 0
            return
        self.bad_epochs += 1
        if self.kind == "paper" and self.bad_epochs >= self.patience and self.drops < self.max_drops:
            self.drops += 1
            self.bad_epochs = 0

    def state_dict(self) -> dict:
        return {"best_err": self.best_err, "bad_epochs": self.bad_epochs, "drops": self.drops}

    def load_state_dict(self, state: dict) -> None:
        self.best_err, self.bad_epochs, self.drops = state["best_err"], state["bad_epochs"], state["drops"]
