"""Horovod for Keras 3, with Horovod's own names. All Horovod code lives in this package.

    import utils.distributed as hvd

    hvd.init()
    model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.AdamW(1e-3 * hvd.size())),
                  loss=..., metrics=[...])
    model.fit(dataset, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                                  hvd.callbacks.MetricAverageCallback(), ...],
              verbose=1 if hvd.rank() == 0 else 0)

Horovod 0.28.1's `horovod.tensorflow.keras` does not work with Keras 3: its
`DistributedOptimizer` hooks methods Keras 3 never calls (gradients are
silently NOT averaged) and its callbacks fail on Keras 3 variables. This
package supplies the same API on Horovod's core ops (`horovod.tensorflow`),
which do work:

- core: `init`, `rank`, `size`, `local_rank`, `local_size`, `allreduce`,
  `broadcast_variables`, `Compression`, and the project's own collectives
  (`allreduce_sums`, `broadcast_object`, `chief_runs`, ...);
- `DistributedOptimizer` (optimizer.py) and the train function that keeps
  XLA with the allreduce outside it (train_function.py);
- `callbacks.BroadcastGlobalVariablesCallback`, `.MetricAverageCallback`,
  `.LearningRateWarmupCallback` (callbacks.py);
- `load_model`: rank 0 reads the file, every rank gets the model;
- elastic training (elastic.py);
- tensor parallelism's groups and collectives (tensor_parallel.py).

Without Horovod installed, or outside `horovodrun`, the world has one rank
and every collective is the identity, so the same script runs as one
process. TensorFlow is imported on first use of the Keras parts (quietly,
see utils/tf_env.py), not by `import utils.distributed`.
"""

from __future__ import annotations

import importlib
from typing import Any

from utils.distributed.core import (
    Compression,
    ProcessGroup,
    World,
    allgather_object,
    allreduce,
    allreduce_each,
    allreduce_gradients,
    allreduce_sums,
    any_rank,
    averaging,
    barrier,
    broadcast_object,
    broadcast_variables,
    chief_runs,
    data_rank,
    data_size,
    describe,
    horovod_available,
    init,
    is_chief,
    local_chief_runs,
    local_rank,
    local_size,
    print0,
    process_set,
    rank,
    refresh_world,
    scaled_learning_rate,
    set_tensor_size,
    shutdown,
    size,
    tensor_rank,
    tensor_size,
    world,
)

# Imported on first use: they need TensorFlow and Keras.
_LAZY = {
    "DistributedOptimizer": "utils.distributed.optimizer",
    "find_distributed": "utils.distributed.optimizer",
    "load_model": "utils.distributed.saving",
    "broadcast_model": "utils.distributed.callbacks",
    "exact_metrics": "utils.distributed.callbacks",
    "elastic_state": "utils.distributed.elastic",
    "run_elastic": "utils.distributed.elastic",
}
_SUBMODULES = (
    "callbacks",
    "optimizer",
    "train_function",
    "elastic",
    "saving",
    "tensor_parallel",
)

__all__ = [
    "Compression",
    "ProcessGroup",
    "World",
    "allgather_object",
    "allreduce",
    "allreduce_each",
    "allreduce_gradients",
    "allreduce_sums",
    "any_rank",
    "averaging",
    "barrier",
    "broadcast_object",
    "broadcast_variables",
    "chief_runs",
    "data_rank",
    "data_size",
    "describe",
    "horovod_available",
    "init",
    "is_chief",
    "local_chief_runs",
    "local_rank",
    "local_size",
    "print0",
    "process_set",
    "rank",
    "refresh_world",
    "scaled_learning_rate",
    "set_tensor_size",
    "shutdown",
    "size",
    "tensor_rank",
    "tensor_size",
    "world",
    *_LAZY,
    *_SUBMODULES,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY or name in _SUBMODULES:
        from utils.tf_env import import_tensorflow

        import_tensorflow()
        module = importlib.import_module(_LAZY.get(name, f"utils.distributed.{name}"))
        return module if name in _SUBMODULES else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
