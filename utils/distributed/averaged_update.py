"""The averaging mixin of `DistributedOptimizer` and the three steps of a distributed update.

`utils/distributed/optimizer.py` says what the optimizer does; this module
holds how: the `_Distributed` mixin (accumulators, skip_nonfinite, the
global-norm clip) and `accumulate`, `average`, `apply_averaged`, which the
train function (train_function.py) also calls one by one around XLA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import tensorflow as tf

from utils.distributed import core
from utils.distributed.core import Compression

_CLASSES: dict[type, type] = {}


class _Distributed:
    """Mixed into a subclass of the wrapped optimizer's class (see `distributed_class`)."""

    # Class-level defaults: an optimizer loaded from a file (`load_model`) has these.
    _hvd_compression: Any = Compression.none
    _hvd_passes = 1  # backward_passes_per_step
    _hvd_average_passes = True  # average_aggregated_gradients
    _hvd_skip_nonfinite = False
    _hvd_group = None  # ProcessGroup to average over (tensor parallelism); None: every rank
    _hvd_averaged = False  # True while a step that already averaged calls apply()
    # Tensor parallelism (set_tensor_parallel): the tensor group, the keys of the
    # variables split across it, and (while a step is traced) the global norm.
    _hvd_tensor_group = None
    _hvd_split_keys: frozenset = frozenset()
    _hvd_global_norm = None

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        if self._hvd_passes > 1:
            self._hvd_accumulators = [
                self.add_variable_from_reference(v, name="hvd_accumulated_gradient")
                for v in variables
            ]
            self._hvd_pass = self.add_variable((), dtype="int64", name="hvd_backward_pass")
        if self._hvd_skip_nonfinite:
            self._hvd_nonfinite = self.add_variable((), dtype="int64", name="hvd_nonfinite_steps")

    def apply(self, grads, trainable_variables=None):
        if self._hvd_averaged:  # the caller already accumulated and averaged
            return super().apply(grads, trainable_variables)
        trainable_variables = _variables(self, trainable_variables)
        grads, update = accumulate(self, grads)
        grads = if_update(update, lambda: average(self, grads), grads)
        apply_averaged(self, self, grads, trainable_variables, update)

    def _clip_gradients(self, grads):
        if self.global_clipnorm and self.global_clipnorm > 0 and not self.clipnorm:
            return clip_by_global_norm(grads, self.global_clipnorm, self._hvd_global_norm)
        return super()._clip_gradients(grads)

    @property
    def nonfinite_steps(self) -> int:
        """Steps skipped because the averaged gradients were not finite (skip_nonfinite)."""
        counter = getattr(self, "_hvd_nonfinite", None)
        return 0 if counter is None else int(counter.numpy())


def distributed_class(cls: type) -> type:
    """`cls` with Horovod averaging mixed in; same name and module, so it serializes as `cls`."""
    if issubclass(cls, _Distributed):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (_Distributed, cls), {"__module__": cls.__module__})
    return _CLASSES[cls]


def find_distributed(optimizer: Any) -> _Distributed | None:
    """The DistributedOptimizer in `optimizer` or in the LossScaleOptimizer around it."""
    while optimizer is not None:
        if isinstance(optimizer, _Distributed):
            return optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return None


# --- the three steps of a distributed update -----------------------------------


def accumulate(dist: _Distributed, grads: Sequence) -> tuple[list, Any]:
    """Step 1, local (XLA may compile it): backward passes added up.

    Returns the gradients to average and whether this pass ends an update
    (the Python value True when every pass does).
    """
    grads = [None if g is None else tf.convert_to_tensor(g) for g in grads]
    if dist._hvd_passes == 1:
        return grads, True
    k = dist._hvd_passes
    count = dist._hvd_pass.value + 1
    update = tf.equal(count % k, 0)
    dist._hvd_pass.assign(count)
    totals = [
        None if g is None else a.value + tf.cast(g, a.dtype)
        for a, g in zip(dist._hvd_accumulators, grads, strict=True)
    ]
    for a, t in zip(dist._hvd_accumulators, totals, strict=True):
        if t is not None:  # zero after an update, else the running sum
            a.assign(tf.where(update, tf.zeros_like(t), t))
    if dist._hvd_average_passes:
        totals = [None if t is None else t / k for t in totals]
    return totals, update


def average(dist: _Distributed, grads: Sequence) -> list:
    """Step 2 (Horovod ops: never inside XLA): the gradients' mean over ranks (or its group)."""
    return core.allreduce_gradients(grads, dist._hvd_compression, dist._hvd_group)


def apply_averaged(
    optimizer: keras.optimizers.Optimizer,
    dist: _Distributed,
    grads: Sequence,
    trainable_variables: Sequence,
    update: Any = True,
    metric_snapshot: tuple[Sequence, Sequence] | None = None,
) -> None:
    """Step 3, local (XLA may compile it): the update of `optimizer` with averaged gradients.

    Args:
        optimizer: the optimizer the model holds: `dist`, or a
            LossScaleOptimizer around it (which unscales, checks finiteness
            and skips non-finite steps itself). Its class's own `apply` runs.
        dist: the DistributedOptimizer in `optimizer`.
        grads: averaged gradients.
        trainable_variables: the variables they belong to.
        update: whether this pass ends an update (see `accumulate`).
        metric_snapshot: (metric variables, their values before this step);
            with skip_nonfinite, a skipped step puts them back, so that it
            adds to no metric.
    """
    update = tf.convert_to_tensor(update)
    finite = tf.constant(True)
    norm = None
    if dist._hvd_tensor_group is not None:
        # The whole model's norm, the same on every shard (a collective: outside the
        # branches, so every shard of the tensor group runs it): shards clip and skip alike.
        norm = tensor_parallel_norm(dist, grads, trainable_variables)
        if dist._hvd_skip_nonfinite:
            finite = tf.math.is_finite(norm)
    elif dist._hvd_skip_nonfinite:
        present = [tf.cast(g, "float32") for g in grads if g is not None]
        finite = tf.math.is_finite(tf.linalg.global_norm(present))

    def step() -> tf.Tensor:
        with _averaged(dist, norm):
            type(optimizer).apply(optimizer, list(grads), list(trainable_variables))
        return tf.constant(True)

    # A LossScaleOptimizer skips non-finite steps itself (and lowers its scale).
    self_skipping = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    go = update if self_skipping else tf.logical_and(update, finite)
    tf.cond(go, step, lambda: tf.constant(False))
    if dist._hvd_skip_nonfinite:

        def skipped() -> tf.Tensor:
            dist._hvd_nonfinite.assign_add(1)
            for variable, value in zip(*(metric_snapshot or ((), ())), strict=True):
                variable.assign(value)
            return tf.constant(True)

        tf.cond(tf.logical_and(update, tf.logical_not(finite)), skipped, lambda: tf.constant(False))


def averaging_apply(optimizer: keras.optimizers.LossScaleOptimizer, dist: _Distributed):
    """An `apply` for a LossScaleOptimizer around `dist` that averages before it checks.

    Keras's `compile` wraps the optimizer in a LossScaleOptimizer under a
    mixed_float16 policy. Left alone, it would check each rank's own
    gradients for NaN/inf and could skip on one rank but not on another;
    with this as its `apply`, every rank checks the same averaged gradients.
    """

    def apply(grads, trainable_variables=None):
        trainable_variables = _variables(optimizer, trainable_variables)
        grads, update = accumulate(dist, grads)
        grads = if_update(update, lambda: average(dist, grads), grads)
        apply_averaged(optimizer, dist, grads, trainable_variables, update)

    return apply


def _variables(optimizer: keras.optimizers.Optimizer, trainable_variables) -> list:
    """The variables to update; builds the optimizer first (its accumulators must exist)."""
    if trainable_variables is None:
        return list(optimizer._trainable_variables)
    trainable_variables = list(trainable_variables)
    if not optimizer.built:
        with keras.name_scope(optimizer.name, caller=optimizer):
            optimizer.build(trainable_variables)
    return trainable_variables


def if_update(condition: Any, fn, otherwise: list) -> list:
    """fn() where `condition` holds, else `otherwise` (no branch when it is the constant True)."""
    if condition is True:
        return fn()
    present = [i for i, g in enumerate(otherwise) if g is not None]

    def chosen():
        out = fn()
        return [out[i] for i in present]

    picked = tf.cond(condition, chosen, lambda: [otherwise[i] for i in present])
    result = list(otherwise)
    for i, g in zip(present, picked, strict=True):
        result[i] = g
    return result


@contextlib.contextmanager
def _averaged(dist: _Distributed, norm: Any = None) -> Iterator[None]:
    """While tracing: `dist.apply` only applies (its gradients are already averaged),
    clipping by `norm` when given (tensor parallelism's whole-model norm)."""
    before = dist._hvd_averaged, dist._hvd_global_norm
    dist._hvd_averaged, dist._hvd_global_norm = True, norm
    try:
        yield
    finally:
        dist._hvd_averaged, dist._hvd_global_norm = before


def set_tensor_parallel(
    optimizer: keras.optimizers.Optimizer, split_variables: Sequence, tensor_group: Any
) -> None:
    """Make `optimizer` (a DistributedOptimizer) clip and skip on the whole model's norm.

    A tensor-parallel shard holds slices of the split variables and full
    copies of the others. Its own gradients' norm differs from shard to
    shard, so clipping by it would scale the shards' replicated weights
    differently and they would drift apart; the whole model's norm needs
    the split gradients' squares summed over the tensor group (once per
    step, see `tensor_parallel_norm`).

    Args:
        optimizer: the model's DistributedOptimizer.
        split_variables: the shard's variables that are slices of a full one.
        tensor_group: the ProcessGroup of this rank's tensor group.
    """
    dist = find_distributed(optimizer)
    if dist is None:
        raise ValueError("set_tensor_parallel needs a DistributedOptimizer")
    dist._hvd_tensor_group = tensor_group
    dist._hvd_split_keys = frozenset(dist._var_key(v) for v in split_variables)


def tensor_parallel_norm(dist: _Distributed, grads: Sequence, variables: Sequence) -> tf.Tensor:
    """The global norm of the full model's gradients from one shard's (collective).

    Squares of the split gradients are summed over the tensor group (each
    shard holds a different slice); the replicated ones count once.
    """
    split, replicated = [tf.constant(0.0)], [tf.constant(0.0)]
    for g, v in zip(grads, variables, strict=True):
        if g is None:
            continue
        square = tf.reduce_sum(tf.square(tf.cast(g, "float32")))
        (split if dist._var_key(v) in dist._hvd_split_keys else replicated).append(square)
    split_sum, replicated_sum = tf.add_n(split), tf.add_n(replicated)
    size = dist._hvd_tensor_group.size
    if core.world().horovod and size > 1:
        # The whole sum goes through the allreduce, whose result is the same on every shard
        # bit for bit; a replicated sum added after it could round differently from shard to
        # shard (Grappler may order the additions differently), and so would the clipping.
        return tf.sqrt(
            core.hvd.allreduce(
                split_sum + replicated_sum / size,
                op=core.hvd.Sum,
                process_set=core.process_set(dist._hvd_tensor_group),
            )
        )
    return tf.sqrt(split_sum + replicated_sum)


def clip_by_global_norm(grads: Sequence[Any], clip_norm: float, norm: Any = None) -> list[Any]:
    """Keras's `clip_by_global_norm`, with the norm from one reduction over every gradient.

    Keras reduces each gradient on its own; XLA on the CPU runs each of those
    as two small kernels, which cost 3.9 ms of the reference model's 42 ms
    step (68 variables, bench/results/avx2/report.md). Concatenated, it is one
    fused reduction. The scale is Keras's: NaN when the norm is not finite.
    `norm`: use this norm instead (tensor parallelism: the whole model's).
    """
    if norm is None:
        present = [g for g in grads if g is not None]
        flat = tf.concat([tf.reshape(tf.cast(g, tf.float32), [-1]) for g in present], axis=0)
        norm = tf.sqrt(tf.reduce_sum(tf.square(flat)))
    scale = clip_norm * tf.minimum(1.0 / norm, 1.0 / clip_norm) + (norm - norm)
    return [None if g is None else g * tf.cast(scale, g.dtype) for g in grads]
