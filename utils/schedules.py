"""Learning-rate schedule: linear warmup, then cosine, linear or no decay."""

from __future__ import annotations

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_horovod_lm")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to `peak`, then decay to `peak * min_ratio` at `total_steps`.

    Warmup matters most under Horovod: the peak is scaled by the number of
    ranks, and a large rate from step 0 on a random model diverges.

    Args:
        peak: learning rate at the end of warmup.
        warmup_steps: steps of linear warmup (0: start at the peak).
        total_steps: step at which decay ends.
        decay: "cosine", "linear" or "constant".
        min_ratio: final rate as a share of `peak`.
    """

    def __init__(
        self,
        peak: float,
        warmup_steps: int,
        total_steps: int,
        decay: str = "cosine",
        min_ratio: float = 0.1,
    ):
        if decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"`decay` must be cosine, linear or constant. Received: decay={decay}")
        self.peak = peak
        self.warmup_steps = warmup_steps
        self.total_steps = max(total_steps, warmup_steps + 1)
        self.decay = decay
        self.min_ratio = min_ratio

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = ops.minimum(1.0, (step + 1.0) / max(self.warmup_steps, 1))
        progress = ops.clip(
            (step - self.warmup_steps) / (self.total_steps - self.warmup_steps), 0.0, 1.0
        )
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + ops.cos(math.pi * progress))
        elif self.decay == "linear":
            shape = 1.0 - progress
        else:
            shape = ops.ones_like(progress)
        factor = self.min_ratio + (1.0 - self.min_ratio) * shape
        if self.warmup_steps:
            factor = ops.where(step < self.warmup_steps, warmup, factor)
        return self.peak * factor

    def get_config(self) -> dict:
        return {
            "peak": self.peak,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "decay": self.decay,
            "min_ratio": self.min_ratio,
        }
