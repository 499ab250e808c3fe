"""The train function Keras's `fit` runs when the model's optimizer is a DistributedOptimizer.

Keras 3 compiles its whole train step (forward, backward and the optimizer
update) into one `tf.function`, with XLA when `jit_compile=True`. Horovod's
allreduce has no XLA kernel, so with several ranks the step is cut in three:

    grads, logs = forward_backward(batch)    # XLA when jit_compile=True
    grads = allreduce(grads)                 # Horovod, between the two
    apply(grads)                             # XLA when jit_compile=True

The outer function stays a graph (`tf.function`): nothing runs eagerly.
With one rank there is nothing to average and the step stays one function,
as in Keras.

The forward/backward half repeats Keras's own `train_step`
(keras/src/backend/tensorflow/trainer.py) line for line. A model that
overrides `train_step` keeps its own; the DistributedOptimizer then
averages inside `apply`, which XLA cannot compile, so such a model with
`jit_compile=True` is refused with one line.

`install()` puts this in place of `keras.Model.make_train_function` (once,
when a DistributedOptimizer is first made); models without one are untouched.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import keras
import tensorflow as tf
from keras.src import tree
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
from keras.src.losses import loss as loss_module
from keras.src.trainers.data_adapters import data_adapter_utils

from utils.distributed import core
from utils.distributed.averaged_update import (
    accumulate,
    apply_averaged,
    average,
    averaging_apply,
    find_distributed,
    if_update,
)

_keras_make_train_function = TensorFlowTrainer.make_train_function


def install() -> None:
    """Route `make_train_function` of every Keras model through `make_train_function` below."""
    if TensorFlowTrainer.make_train_function is not make_train_function:
        TensorFlowTrainer.make_train_function = make_train_function


def make_train_function(model: keras.Model, force: bool = False):
    """Keras's `make_train_function`, with Horovod averaging for a DistributedOptimizer."""
    if model.train_function is not None and not force:
        return model.train_function
    dist = find_distributed(model.optimizer)
    if dist is None:
        return _keras_make_train_function(model, force)
    if (
        isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        and model.optimizer is not dist
    ):
        # compile() put a LossScaleOptimizer around the DistributedOptimizer.
        model.optimizer.apply = averaging_apply(model.optimizer, dist)
    if type(model).train_step is not TensorFlowTrainer.train_step:
        if model.jit_compile:
            raise ValueError(
                f"{type(model).__name__} overrides train_step, and its DistributedOptimizer "
                "averages inside apply(), which XLA cannot compile (Horovod ops have no XLA "
                "kernels): compile it with jit_compile=False"
            )
        return _keras_make_train_function(model, force)
    if not core.averaging():  # one rank: Keras's one function, averaging nothing
        model.train_function = model._make_function(functools.partial(_fused_step, model, dist))
        model.train_function.parts = {}
        return model.train_function
    model.train_function = make_averaged_function(model, dist, model.jit_compile)
    return model.train_function


def make_averaged_function(
    model: keras.Model,
    dist,
    forward_xla: bool,
    reduce: Callable[[Any, list], list] = average,
):
    """The train function of several ranks: forward/backward, `reduce`, update.

    `forward_xla` compiles the forward/backward part as one XLA computation
    (the update follows `model.jit_compile`); `reduce(dist, grads)` averages
    the gradients between the two (one grouped allreduce by default).
    `python -m bench.overlap` builds it with the forward/backward outside XLA
    and one allreduce per gradient, to measure overlapping the allreduce with
    the backward pass.
    """
    forward_backward = tf.function(
        functools.partial(_forward_backward, model, dist),
        jit_compile=forward_xla,
        reduce_retracing=True,
    )
    update = tf.function(
        functools.partial(_update, model, dist),
        jit_compile=model.jit_compile,
        reduce_retracing=True,
    )

    def step(data):
        grads, update_now, logs, snapshot = forward_backward(data)
        if dist._hvd_passes == 1:
            update_now = True  # every pass updates: no branch around the allreduce
        grads = if_update(update_now, lambda: reduce(dist, grads), grads)
        update(grads, update_now, snapshot)
        return logs

    with _outer_without_xla(model):
        function = model._make_function(step)
    # For inspection (the tests check what XLA compiles and where the allreduce is).
    function.parts = {"forward_backward": forward_backward, "update": update, "step": step}
    return function


def _forward_backward(model: keras.Model, dist, data):
    """Keras's train_step up to the gradients; plus the metrics, updated as Keras does."""
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    snapshot = [v.value for v in model.metrics_variables] if dist._hvd_skip_nonfinite else []
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True) if model._call_has_training_arg else model(x)
        loss = model._compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        model._loss_tracker.update_state(
            loss_module.unscale_loss_for_distribution(loss),
            sample_weight=tf.shape(next(i for i in tree.flatten(x) if i is not None))[0],
        )
        loss = model.optimizer.scale_loss(loss)
    grads = tape.gradient(loss, model.trainable_weights)
    logs = model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
    grads, update_now = accumulate(dist, grads)
    return grads, update_now, logs, snapshot


def _update(model: keras.Model, dist, grads, update_now, snapshot) -> None:
    apply_averaged(
        model.optimizer,
        dist,
        grads,
        model.trainable_weights,
        update_now,
        # Metrics made while this step was first traced have no snapshot (they start at zero).
        (model.metrics_variables[: len(snapshot)], snapshot) if dist._hvd_skip_nonfinite else None,
    )


def _fused_step(model: keras.Model, dist, data):
    """The whole step as one function (nothing to average)."""
    grads, update_now, logs, snapshot = _forward_backward(model, dist, data)
    _update(model, dist, grads, update_now, snapshot)
    return logs


@contextlib.contextmanager
def _outer_without_xla(model: keras.Model) -> Iterator[None]:
    """Keras wraps the step in tf.function(jit_compile=model.jit_compile): make that False."""
    saved = model._jit_compile
    model._jit_compile = False
    try:
        yield
    finally:
        model._jit_compile = saved
