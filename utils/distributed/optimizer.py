"""`DistributedOptimizer`: Horovod's gradient averaging for any Keras 3 optimizer.

Horovod 0.28.1's `horovod.tensorflow.keras.DistributedOptimizer` hooks
methods that Keras 3 never calls, so under Keras 3 its gradients are silently
not averaged. This one hooks `apply()`, which every Keras 3 training step
calls, and, like Horovod's, returns an optimizer of the wrapped class (a
subclass made on the fly, with the same name and config), so it saves and
loads as the plain optimizer.

What `apply(grads, variables)` does, in order:

1. with `backward_passes_per_step=k`, add the gradients into local
   accumulators; only every k-th call goes on, with the sum (or the mean,
   `average_aggregated_gradients`) of the k passes;
2. average across ranks with one grouped allreduce (Horovod);
3. apply the update of the wrapped optimizer (its clipping, weight decay and
   schedule run on the averaged gradients, so every rank applies the same).

With `skip_nonfinite=True` (the project's training uses it), a step whose
averaged gradients hold a NaN or inf changes nothing, on every rank alike
(the average is NaN on all ranks when it is on one), and
`optimizer.nonfinite_steps` counts such steps.

Horovod ops have no XLA kernels, so a training step compiled with
`jit_compile=True` cannot contain step 2: `utils/distributed/train_function.py`
cuts Keras's train step around it. The three steps are therefore also offered
as separate functions (`accumulate`, `average`, `apply_averaged`).
"""

from __future__ import annotations

from typing import Any

import keras

from utils.distributed import core, train_function
from utils.distributed.averaged_update import (  # noqa: F401  (this module's public names)
    _Distributed,
    accumulate,
    apply_averaged,
    average,
    averaging_apply,
    clip_by_global_norm,
    distributed_class,
    find_distributed,
    if_update,
    set_tensor_parallel,
    tensor_parallel_norm,
)
from utils.distributed.core import Compression


def DistributedOptimizer(
    optimizer: keras.optimizers.Optimizer,
    name: str | None = None,
    compression: Any = Compression.none,
    backward_passes_per_step: int = 1,
    average_aggregated_gradients: bool = True,
    skip_nonfinite: bool = False,
    group: core.ProcessGroup | None = None,
) -> keras.optimizers.Optimizer:
    """A copy of `optimizer` that averages gradients across ranks before every update.

    Horovod's signature (the device and sparse arguments aside: gradients are
    always sent dense). The result is an instance of `optimizer`'s class,
    rebuilt from its config like Horovod's; its weight-decay exclusions are
    kept. Wrap before training: an optimizer that already holds state is
    refused rather than silently reset.

    Args:
        optimizer: any Keras 3 optimizer, a `LossScaleOptimizer` included.
        name: name of the new optimizer (default: the wrapped one's).
        device_dense, device_sparse, sparse_as_dense: Horovod's; no effect.
        compression: `Compression.none` or `Compression.fp16` (or Horovod's
            own `hvd.Compression.*`): how gradients travel between ranks.
        backward_passes_per_step: local passes whose gradients are added up
            before one allreduce and one update.
        average_aggregated_gradients: divide those passes' sum by their number.
        skip_nonfinite: skip (on every rank) any update whose averaged
            gradients are not finite, and count it in `nonfinite_steps`.
        group: average over these ranks only: with tensor parallelism, the
            data-parallel group (the shards of one tensor group hold
            different weights and must not be averaged together). None:
            every rank.
    """
    train_function.install()
    if optimizer.built:
        raise ValueError(
            "DistributedOptimizer: the optimizer is already built (it holds state that would be "
            "lost); wrap it before compile/fit"
        )
    if backward_passes_per_step < 1:
        raise ValueError(f"backward_passes_per_step must be >= 1; got {backward_passes_per_step}")
    config = optimizer.get_config()
    if name:
        config["name"] = name
    wrapped = distributed_class(type(optimizer)).from_config(config)
    for key, value in vars(optimizer).items():  # not in get_config()
        if key.startswith("_exclude_from_weight_decay"):
            setattr(wrapped, key, value)
    wrapped._hvd_compression = compression
    wrapped._hvd_passes = backward_passes_per_step
    wrapped._hvd_average_passes = average_aggregated_gradients
    wrapped._hvd_skip_nonfinite = skip_nonfinite
    wrapped._hvd_group = group
    return wrapped


def make_distributed(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """Turn `optimizer` itself, state and all, into a DistributedOptimizer (default settings).

    For an optimizer that already holds state, such as one `load_model` read.
    """
    train_function.install()
    optimizer.__class__ = distributed_class(type(optimizer))
    return optimizer
