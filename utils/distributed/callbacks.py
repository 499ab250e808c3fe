"""Horovod's Keras callbacks, for Keras 3: broadcast, metric average, learning-rate warmup.

    model.fit(..., callbacks=[
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),
        hvd.callbacks.MetricAverageCallback(),
        hvd.callbacks.LearningRateWarmupCallback(initial_lr=scaled_lr, warmup_epochs=3),
        ...  # then the usual Keras callbacks (CSVLogger, EarlyStopping, ...)
    ])

Put MetricAverageCallback before the callbacks that read the epoch's logs:
it rewrites them in place with the figures over every rank.
"""

from __future__ import annotations

import keras
import numpy as np

from utils.distributed import core


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Start every rank from `root_rank`'s weights and optimizer state.

    In `on_train_begin` it builds the optimizer (its slots exist only then)
    and broadcasts the model's weights and the optimizer's variables, so the
    first step already runs on the root's weights. A model that creates its
    weights on its first call (a subclassed model never called before fit)
    has nothing to broadcast then: it is broadcast after the first step, as
    Horovod does. Random-seed state (dropout) is not broadcast: ranks draw
    different masks. It broadcasts once, in the first `fit`.
    """

    def __init__(self, root_rank: int = 0):
        super().__init__()
        self.root_rank = root_rank
        self.broadcast_done = False

    def on_train_begin(self, logs=None):
        if not self.broadcast_done and self.model.built:
            broadcast_model(self.model, self.root_rank)
            self.broadcast_done = True

    def on_train_batch_end(self, batch, logs=None):
        if not self.broadcast_done:
            broadcast_model(self.model, self.root_rank)
            self.broadcast_done = True


def broadcast_model(model: keras.Model, root_rank: int = 0) -> None:
    """`root_rank`'s weights and optimizer variables on every rank (builds the optimizer first)."""
    optimizer = getattr(model, "optimizer", None)
    variables = list(model.weights)
    if optimizer is not None:
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        variables += list(optimizer.variables)
    core.broadcast_variables(variables, root_rank)


class MetricAverageCallback(keras.callbacks.Callback):
    """Epoch metrics over every rank's data, exactly, written into the epoch's logs.

    Each rank's metrics cover its own shard. This sums the metrics' state
    variables (totals and counts) across ranks and recomputes the results,
    which is exact whatever the shard sizes; averaging per-rank means is not.
    It updates the epoch's `logs` in place, so the callbacks after it in the
    list (History, CSVLogger, EarlyStopping, ModelCheckpoint) see the exact
    values.

    With `validation_data`, Keras builds the epoch's training logs and then
    runs `evaluate`, which resets the same metric objects. So the training
    figures are taken when validation begins (`on_test_begin`) and the
    validation figures when it ends (`on_test_end`); both go into the
    epoch's logs. Every rank must validate on the same epochs.

    A standalone `model.evaluate` returns its own per-rank dict, which no
    callback can change: call `hvd.exact_metrics(model)` after it.
    """

    def __init__(self):
        super().__init__()
        self._fitting = False
        self._train: dict[str, float] | None = None
        self._val: dict[str, float] = {}

    def on_train_begin(self, logs=None):
        self._fitting = True

    def on_train_end(self, logs=None):
        self._fitting = False

    def on_epoch_begin(self, epoch, logs=None):
        self._train, self._val = None, {}

    def on_test_begin(self, logs=None):
        if self._fitting:  # fit's validation: the metrics still hold the training epoch's state
            self._train = exact_metrics(self.model)

    def on_test_end(self, logs=None):
        self._val = exact_metrics(self.model)
        if logs is not None:  # for the on_test_end of the callbacks after this one
            logs.update(self._val)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs.update(self._train if self._train is not None else exact_metrics(self.model))
        logs.update({f"val_{k}": v for k, v in self._val.items()})


def exact_metrics(model: keras.Model) -> dict[str, float]:
    """The model's metric results computed from state summed over all ranks.

    A collective: every rank must call it. The local state is left as it was.
    """
    variables = list(model.metrics_variables)
    if not variables or not core.averaging():
        return _results(model)
    local = [v.numpy() for v in variables]
    summed = core.allreduce_sums({f"{i:05d}": value for i, value in enumerate(local)})
    try:
        for i, variable in enumerate(variables):
            variable.assign(np.asarray(summed[f"{i:05d}"], dtype=local[i].dtype))
        return _results(model)
    finally:
        for variable, value in zip(variables, local, strict=True):
            variable.assign(value)


def _results(model: keras.Model) -> dict[str, float]:
    results = model.get_metrics_result()
    return {k: float(v) for k, v in results.items() if np.ndim(v) == 0}


class LearningRateWarmupCallback(keras.callbacks.Callback):
    """Ramp the learning rate from `initial_lr / size()` to `initial_lr` over the first epochs.

    As Horovod 0.28.1 does: per batch, the rate is
    `initial_lr / size * (e * (size - 1) / warmup_epochs + 1)`, where `e` is the
    epoch counted in fractions of an epoch, from 1/steps_per_epoch. Large
    global batches (a rate scaled by `size()`) diverge without it.

    Args:
        initial_lr: the rate at the end of warmup (usually scaled by size()).
        warmup_epochs: epochs of warmup.
        momentum_correction: accepted for Horovod's signature; a no-op here,
            because a Keras 3 optimizer's momentum is a Python constant baked
            into the compiled step, not a variable a callback can change.
        steps_per_epoch: batches per epoch (default: what fit says).
        verbose: 1 to print when warmup ends (rank 0 only).

    The optimizer must have a constant learning rate (a float): a schedule
    is refused, since it would overwrite the warmup at every step.
    """

    def __init__(
        self,
        initial_lr: float,
        warmup_epochs: int = 5,
        momentum_correction: bool = True,
        steps_per_epoch: int | None = None,
        verbose: int = 0,
    ):
        super().__init__()
        self.initial_lr = float(initial_lr)
        self.warmup_epochs = warmup_epochs
        self.momentum_correction = momentum_correction
        self.steps_per_epoch = steps_per_epoch
        self.verbose = verbose
        self.current_epoch = 0

    def on_train_begin(self, logs=None):
        optimizer = self.model.optimizer
        while getattr(optimizer, "inner_optimizer", None) is not None:  # LossScaleOptimizer
            optimizer = optimizer.inner_optimizer
        schedule = optimizer._learning_rate
        if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            raise ValueError(
                "LearningRateWarmupCallback needs an optimizer with a constant learning rate; this "
                f"one has a schedule ({type(schedule).__name__}): put the warmup in the schedule "
                "instead"
            )
        if self.steps_per_epoch is None:
            self.steps_per_epoch = self.params.get("steps")
        if not self.steps_per_epoch:
            raise ValueError(
                "LearningRateWarmupCallback: steps_per_epoch is unknown (the data has no length); "
                "pass steps_per_epoch="
            )

    def on_epoch_begin(self, epoch, logs=None):
        self.current_epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self.current_epoch >= self.warmup_epochs:
            return
        epoch = self.current_epoch + float(batch) / self.steps_per_epoch
        self.model.optimizer.learning_rate = self.initial_lr * self.multiplier(epoch)

    def multiplier(self, epoch: float) -> float:
        """The share of `initial_lr` at `epoch` (fractional); shifted by one batch, as Horovod
        does, so that each epoch ends on a round value."""
        epoch += 1.0 / self.steps_per_epoch
        size = core.size()
        return 1.0 / size * (epoch * (size - 1) / self.warmup_epochs + 1)

    def on_epoch_end(self, epoch, logs=None):
        rate = float(np.asarray(self.model.optimizer.learning_rate))
        if logs is not None:
            logs["learning_rate"] = rate
        if epoch == self.warmup_epochs - 1 and self.verbose and core.is_chief():
            print(
                f"\nEpoch {epoch + 1}: finished gradual learning rate warmup to {rate:g}.",
                flush=True,
            )
