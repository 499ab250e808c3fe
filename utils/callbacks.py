"""The project's own Keras callbacks: only what Keras lacks for this project's training.

- `TrainingProgress`: where training is (epoch, step, samples consumed);
  saving it (step checkpoints, elastic commits) so that a run resumes at the
  exact sample, mid-epoch and at another world size, with the interrupted
  epoch's metrics and the early-stopping state; and the epoch's extra
  figures (learning rate, tokens/s, times, world size).
- `NonFiniteGuard`: when a step's averaged gradients were NaN/inf (the
  DistributedOptimizer then skipped it on every rank), stop every rank at
  that step, or warn and go on.
- `AtomicModelCheckpoint`: Keras's ModelCheckpoint, written under a
  temporary name and renamed, so a crash never leaves half a file.
- `ProgbarLogger`: Keras's progress bar, except that an epoch stopped
  early (`max_steps`, a resumed epoch) ends at the steps that ran.

history.csv, TensorBoard, early stopping and the best model
are Keras's own callbacks (train.py puts them together).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

from utils import distributed
from utils.errors import NonFiniteLoss


@dataclasses.dataclass
class Progress:
    """Where training is: saved in every checkpoint and elastic commit."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # updates completed in the current epoch
    samples_in_epoch: int = 0  # samples consumed in the current epoch, all ranks
    global_step: int = 0  # updates completed in all
    train_seconds: float = 0.0  # wall seconds of training, across resumes
    # The current epoch's metric state (model.metrics_variables) summed over
    # ranks, when saved mid-epoch: a resumed epoch's figures cover all its steps.
    metric_state: list = dataclasses.field(default_factory=list)
    # EarlyStopping's (and the best-model checkpoint's) state after the last
    # complete epoch, and its best weights (saved beside the variables).
    early_stopping: dict = dataclasses.field(default_factory=dict)
    best_weights: list | None = None
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the best weights go into the checkpoint's arrays)."""
        out = dataclasses.asdict(self)
        del out["best_weights"]
        out["metric_state"] = [np.asarray(v).tolist() for v in self.metric_state]
        return out

    @classmethod
    def from_dict(cls, saved: dict[str, Any], best_weights: list | None = None) -> Progress:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in fields}, best_weights=best_weights)


class TrainingProgress(keras.callbacks.Callback):
    """Tracks the position, cuts the epochs where the data says, saves and restores state.

    `model.fit` runs from `progress` over one data stream (data/load.py
    `train_stream`), whose first epoch may be partial (a resumed run): this
    ends that Keras epoch where the data's epoch ends, and stops at
    `max_steps`. Every `every` updates (and at each epoch boundary) it calls
    each `savers` entry with the progress: step checkpoints, elastic commits.

    Put it after MetricAverageCallback (its figures use the exact logs) and
    before EarlyStopping, CSVLogger and the best-model checkpoint.

    Args:
        progress: where this fit starts; updated in place.
        steps_per_epoch: updates per epoch.
        micro_batches: batches per update (gradient accumulation).
        samples_per_step: samples per update over all ranks.
        tokens_per_sample: for tokens/s.
        max_steps: stop after this many updates in all (0: no cap).
        savers: (every N updates, function of the progress); N = 0 saves at
            epoch boundaries only.
        figures: extra epoch figures from the epoch's logs (the task's).
        early_stopping, best_checkpoint: the run's EarlyStopping and
            ModelCheckpoint, whose state is saved and restored with the progress.
    """

    def __init__(
        self,
        progress: Progress,
        steps_per_epoch: int,
        micro_batches: int,
        samples_per_step: int,
        tokens_per_sample: int,
        max_steps: int = 0,
        savers: Sequence[tuple[int, Callable[[Progress], None]]] = (),
        figures: Callable[[dict], dict] = lambda logs: {},
        early_stopping: keras.callbacks.EarlyStopping | None = None,
        best_checkpoint: keras.callbacks.ModelCheckpoint | None = None,
    ):
        super().__init__()
        self.progress = progress
        self.steps_per_epoch, self.micro_batches = steps_per_epoch, micro_batches
        self.samples_per_step, self.tokens_per_sample = samples_per_step, tokens_per_sample
        self.max_steps, self.savers, self.figures = max_steps, list(savers), figures
        self.early_stopping, self.best_checkpoint = early_stopping, best_checkpoint
        self.last_logs: dict[str, Any] = {}

    # --- the position ------------------------------------------------------------

    def on_train_begin(self, logs=None):
        self._started, self._seconds_before = time.perf_counter(), self.progress.train_seconds
        self._first_epoch = True
        self._cut = self._at_max = False
        self._pending_metrics = False

    def on_epoch_begin(self, epoch, logs=None):
        if self._first_epoch:
            self._first_epoch = False
            self._restore()
        else:  # the previous epoch ended (and EarlyStopping has seen it)
            self._snapshot_callbacks()
            self._save(mid_epoch=False)
        self._batches = self.progress.step_in_epoch * self.micro_batches
        self._epoch_started, self._train_seconds = time.perf_counter(), None
        self._steps_at_start = self.progress.step_in_epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._pending_metrics:  # the metrics exist once the first step has run
            self._add_saved_metrics()
        self._batches += 1
        if self._batches % self.micro_batches:
            return  # inside an accumulated update
        p = self.progress
        p.step_in_epoch += 1
        p.global_step += 1
        p.samples_in_epoch = p.step_in_epoch * self.samples_per_step
        epoch_done = p.step_in_epoch >= self.steps_per_epoch
        if self.max_steps and p.global_step >= self.max_steps:
            self.model.stop_training = self._at_max = True
        elif epoch_done and batch + 1 < self.steps_per_epoch * self.micro_batches:
            # A resumed epoch: the data's epoch ends before Keras's does.
            self.model.stop_training = self._cut = True
        due = [save for every, save in self.savers if every and p.global_step % every == 0]
        if due and not epoch_done:
            self._capture_metrics()
            for save in due:
                save(p)

    def on_test_begin(self, logs=None):
        if self._train_seconds is None:
            self._train_seconds = time.perf_counter() - self._epoch_started

    def on_epoch_end(self, epoch, logs=None):
        p = self.progress
        if self._cut and not self._at_max:
            self.model.stop_training = False  # go on with the next epoch
        self._cut = False
        seconds = self._train_seconds or (time.perf_counter() - self._epoch_started)
        steps = p.step_in_epoch - self._steps_at_start
        p.train_seconds = self._clock()
        logs = logs if logs is not None else {}
        logs.update(
            {
                "step": p.global_step,
                "lr": _learning_rate(self.model.optimizer),
                "tokens_per_sec": steps * self.samples_per_step * self.tokens_per_sample / seconds,
                "samples_per_sec": steps * self.samples_per_step / seconds,
                "epoch_seconds": seconds,
                "wall_seconds": p.train_seconds,
                "world_size": distributed.size(),
            }
        )
        logs.update(self.figures(logs))
        if p.step_in_epoch >= self.steps_per_epoch:
            p.epoch += 1
            p.step_in_epoch = p.samples_in_epoch = 0
            p.metric_state = []
        self.last_logs = dict(logs)

    def on_train_end(self, logs=None):
        p = self.progress
        p.train_seconds = self._clock()
        if self.early_stopping is not None:
            p.stopped_early = self.early_stopping.stopped_epoch > 0
        if p.step_in_epoch == 0:
            self._snapshot_callbacks()  # after the last epoch
        self._save(mid_epoch=p.step_in_epoch > 0)

    # --- saving and restoring -------------------------------------------------------

    def _clock(self) -> float:
        return self._seconds_before + time.perf_counter() - self._started

    def _save(self, mid_epoch: bool) -> None:
        if mid_epoch:
            self._capture_metrics()
        for _, save in self.savers:
            save(self.progress)

    def _capture_metrics(self) -> None:
        """The epoch's metric state so far, summed over ranks (a collective: every rank calls it)."""
        values = [v.numpy() for v in self.model.metrics_variables]
        summed = distributed.allreduce_sums({f"{i:05d}": v for i, v in enumerate(values)})
        self.progress.metric_state = [summed[f"{i:05d}"] for i in range(len(values))]

    def _restore(self) -> None:
        """A resumed epoch: its metrics so far (see below) and the early-stopping state."""
        p = self.progress
        self._pending_metrics = bool(p.metric_state)
        state, es, mc = p.early_stopping, self.early_stopping, self.best_checkpoint
        if state and es is not None:
            es.wait, es.best, es.best_epoch = state["wait"], state["best"], state["best_epoch"]
            es.best_weights = p.best_weights
        if state.get("checkpoint_best") is not None and mc is not None:
            mc.best = state["checkpoint_best"]

    def _add_saved_metrics(self) -> None:
        """Add the interrupted epoch's metric state (summed over ranks) on rank 0.

        Metric state is totals and counts, so adding it once, on one rank, keeps
        the exact sums that MetricAverageCallback forms. Done after the first
        step, because Keras creates the metrics' variables when it first traces it.
        """
        self._pending_metrics = False
        if not distributed.is_chief():
            return
        for variable, value in zip(
            self.model.metrics_variables, self.progress.metric_state, strict=True
        ):
            variable.assign_add(np.asarray(value, dtype=variable.dtype))

    def _snapshot_callbacks(self) -> None:
        es, mc, p = self.early_stopping, self.best_checkpoint, self.progress
        state: dict[str, Any] = {}
        if es is not None:
            best = None if es.best is None else float(es.best)
            state.update(wait=es.wait, best=best, best_epoch=es.best_epoch)
            p.best_weights = es.best_weights
        if mc is not None and mc.best is not None and np.isfinite(mc.best):
            state["checkpoint_best"] = float(mc.best)
        p.early_stopping = state


def _learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    return float(np.asarray(optimizer.learning_rate))


class NonFiniteGuard(keras.callbacks.Callback):
    """Stop (or warn and go on) on every rank at a step whose averaged gradients were NaN/inf.

    The DistributedOptimizer (skip_nonfinite=True) already skipped that
    update, on every rank alike: the average is NaN everywhere when it is on
    one rank, so its count of skipped steps is the same on every rank and
    so is this callback's decision. Put it before TrainingProgress, so that
    a stopped run's last checkpoint is the last good step.

    Args:
        mode: "stop" (raise NonFiniteLoss) or "skip" (warn on rank 0).
        progress: the run's progress (for the step number in the message).
        last_checkpoint: where the newest checkpoint is (for the message).
    """

    def __init__(
        self, mode: str, progress: Progress, last_checkpoint: Callable[[], Any] = lambda: None
    ):
        super().__init__()
        self.mode, self.progress, self.last_checkpoint = mode, progress, last_checkpoint

    def on_train_begin(self, logs=None):
        self.optimizer = distributed.find_distributed(self.model.optimizer)
        self.seen = self.optimizer.nonfinite_steps

    def on_train_batch_end(self, batch, logs=None):
        skipped = self.optimizer.nonfinite_steps
        if skipped == self.seen:
            return
        self.seen = skipped
        p = self.progress
        step = p.global_step + 1
        if self.mode == "skip":
            distributed.print0(
                f"warning: non-finite loss or gradients at step {step} on some rank; step skipped"
            )
            return
        latest = self.last_checkpoint()
        where = f"; the last good checkpoint is {latest}" if latest else ""
        raise NonFiniteLoss(
            f"the loss or gradients became NaN/inf at step {step} (epoch {p.epoch + 1}, step "
            f"{p.step_in_epoch + 1} of the epoch) on at least one rank; training stopped on every "
            f"rank{where}. Lower train.lr, raise train.warmup_steps or clip harder "
            "(train.clip_norm), or pass --train.on_nonfinite=skip to skip such steps"
        )


class ProgbarLogger(keras.callbacks.ProgbarLogger):
    """Keras's progress bar, ending an epoch that stopped early at the step it reached.

    Keras's own finalizes every epoch at its planned step count: a run
    stopped by `max_steps` after 5 of 40 steps printed `40/40 - 13s -
    317ms/step`, the time divided over 35 steps that never ran. This one
    prints `5/40 - 13s - 3s/step`.
    """

    def on_epoch_end(self, epoch, logs=None):
        if self.progbar is not None and self.target and 0 < self.seen < self.target:
            self.progbar.update(self.seen, list((logs or {}).items()), finalize=True)
        else:
            super().on_epoch_end(epoch, logs)


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """Keras's ModelCheckpoint, written under a temporary name and renamed into place."""

    def __init__(self, filepath: str | pathlib.Path, **kwargs: Any):
        self.final = pathlib.Path(filepath)
        self.temporary = self.final.with_name(f".{self.final.stem}.tmp{self.final.suffix}")
        super().__init__(str(self.temporary), **kwargs)

    def on_epoch_end(self, epoch, logs=None):
        try:
            super().on_epoch_end(epoch, logs)
            if self.temporary.exists():
                self.temporary.replace(self.final)
        finally:
            self.temporary.unlink(missing_ok=True)


class GatheredModelCheckpoint(AtomicModelCheckpoint):
    """best.keras under tensor parallelism: the full model, gathered from the shards.

    Every rank runs it, since gathering is a collective; they all decide
    alike (the monitored figure is summed over ranks) and rank 0 alone writes.

    Args:
        filepath: where the model goes (written atomically, on rank 0).
        gather: returns the full model, gathered from the shards (collective).
        chief: whether this rank writes.
        **kwargs: ModelCheckpoint's (monitor, mode, save_best_only...).
    """

    def __init__(
        self, filepath: str | pathlib.Path, gather: Any, chief: bool, **kwargs: Any
    ) -> None:
        super().__init__(filepath, **kwargs)
        self.gather, self.chief = gather, chief

    def set_model(self, model):
        super().set_model(_GatheringSaver(model, self.gather, self.chief))

    def on_epoch_end(self, epoch, logs=None):
        if self.chief:
            super().on_epoch_end(epoch, logs)
        else:  # no file of its own to rename
            keras.callbacks.ModelCheckpoint.on_epoch_end(self, epoch, logs)


class _GatheringSaver:
    """The shard, except that save() gathers the full model and (on rank 0) saves it."""

    def __init__(self, shard: keras.Model, gather: Any, chief: bool):
        self._shard, self._gather, self._chief = shard, gather, chief

    def save(self, filepath, *args: Any, **kwargs: Any) -> None:
        full = self._gather()
        if self._chief:
            full.save(filepath, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._shard, name)
