"""Rank-0 callbacks of the training loop: progress bar, history.csv, TensorBoard.

Each is a no-op on the other ranks, so the loop calls them everywhere.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING, Any

import keras

from utils import distributed
from utils.metrics import Sums
from utils.run_dir import RunDir

if TYPE_CHECKING:
    from train import Trainer, TrainState


class Callback:
    """Hooks into the training loop; the Trainer calls them on every rank."""

    def on_train_begin(self, trainer: Trainer, state: TrainState, steps_per_epoch: int) -> None: ...

    def on_step_end(self, trainer: Trainer, state: TrainState, running: Sums) -> None: ...

    def on_epoch_end(self, trainer: Trainer, state: TrainState, row: dict[str, Any]) -> None: ...


class ProgressBar(Callback):
    """Per-epoch progress on rank 0: a Keras progress bar in a terminal, plain lines otherwise.

    The figures are rank 0's running loss and accuracy on its own shard since
    the epoch began (or the last checkpoint); the epoch line after it gives
    the exact values over all ranks.
    """

    def __init__(self, epochs: int, log_every: int, line_seconds: float = 20.0):
        self.epochs, self.log_every, self.line_seconds = epochs, log_every, line_seconds
        self.tty = sys.stdout.isatty()
        self.bar: keras.utils.Progbar | None = None
        self.steps = 0
        self.last_line = 0.0

    def on_train_begin(self, trainer: Trainer, state: TrainState, steps_per_epoch: int) -> None:
        self.steps = steps_per_epoch

    def on_step_end(self, trainer: Trainer, state: TrainState, running: Sums) -> None:
        if not distributed.is_chief():
            return
        step = state.step_in_epoch
        if step % self.log_every and step != self.steps:
            return
        v = running.values
        count = max(v["count"], 1.0)
        values = [
            ("loss", v["loss_sum"] / count),
            ("accuracy", v["correct"] / count),
            ("lr", trainer.current_lr()),
        ]
        if self.tty:
            if self.bar is None:
                print(f"Epoch {state.epoch + 1}/{self.epochs}")
                self.bar = keras.utils.Progbar(self.steps, stateful_metrics=[k for k, _ in values])
            self.bar.update(step, values)
        elif time.monotonic() - self.last_line >= self.line_seconds:
            self.last_line = time.monotonic()
            shown = "  ".join(f"{k} {x:.4g}" for k, x in values)
            distributed.print0(
                f"epoch {state.epoch + 1}/{self.epochs} step {step}/{self.steps}  {shown}"
            )

    def on_epoch_end(self, trainer: Trainer, state: TrainState, row: dict[str, Any]) -> None:
        self.bar = None
        skip = {
            "epoch",
            "step",
            "lr",
            "epoch_seconds",
            "wall_seconds",
            "world_size",
            "samples_per_sec",
            "tokens",
            "val_tokens",
            "examples",
            "val_examples",
            "perplexity",
        }
        shown = "  ".join(
            f"{k} {v:,.0f}" if k == "tokens_per_sec" else f"{k} {v:.4f}"
            for k, v in row.items()
            if k not in skip
        )
        distributed.print0(
            f"epoch {row['epoch']}/{self.epochs}: {shown}"
            + ("  (early stop)" if state.stopped_early else "")
        )


class HistoryCSV(Callback):
    """Rewrites history.csv after every epoch (rank 0)."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir

    def on_epoch_end(self, trainer: Trainer, state: TrainState, row: dict[str, Any]) -> None:
        if distributed.is_chief():
            self.run_dir.write_history(state.history)


class TensorBoard(Callback):
    """Per-epoch scalars, and the running training loss every `log_every` steps (rank 0)."""

    def __init__(self, run_dir: RunDir, log_every: int):
        import tensorflow as tf

        self.log_every = log_every
        self.writer = (
            tf.summary.create_file_writer(str(run_dir.tensorboard))
            if distributed.is_chief()
            else None
        )

    def on_step_end(self, trainer: Trainer, state: TrainState, running: Sums) -> None:
        if self.writer is None or state.global_step % self.log_every:
            return
        import tensorflow as tf

        v = running.values
        with self.writer.as_default(step=state.global_step):
            tf.summary.scalar("train/running_loss", v["loss_sum"] / max(v["count"], 1.0))
            tf.summary.scalar("train/lr", trainer.current_lr())

    def on_epoch_end(self, trainer: Trainer, state: TrainState, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        import tensorflow as tf

        with self.writer.as_default(step=state.global_step):
            for key, value in row.items():
                if key not in ("epoch", "step") and value is not None and math.isfinite(value):
                    tf.summary.scalar(f"epoch/{key}", value)
        self.writer.flush()
