"""Tensor parallelism on Horovod process sets: the groups and the two conjugate collectives.

`--parallel.tensor=T` cuts a world of N ranks into N/T data-parallel
replicas of T tensor-parallel shards each. Ranks of one tensor group are
consecutive (on one host when T divides the ranks per host, where the
allreduce of every layer is cheapest):

    N = 4, T = 2        tensor group 0: ranks 0 1     tensor group 1: ranks 2 3
                        data group 0:   ranks 0 2     data group 1:   ranks 1 3

A shard's tensor rank is its position in its tensor group (rank % T), its
data rank the index of its replica (rank // T). The shards of a tensor group
hold different slices of each block's weights and see the same batch; the
replicas of a data group hold the same slice and see different batches, and
only they average gradients (`DistributedOptimizer(group=tp.data_group)`).

Horovod needs every process set made at `hvd.init(process_sets=[...])`, the
same list on every rank (or `process_sets="dynamic"` and `add_process_set`,
which this module does not use); it refuses duplicates, so a group that is
the whole world uses `hvd.global_process_set`, and a one-rank group has no
process set at all (its collectives are the identity). `init()` below makes
the sets from the launcher's world size before Horovod starts.

The conjugate pair (Megatron-LM, Shoeybi et al. 2019) that a tensor-parallel
block puts around its column-parallel and row-parallel layers:

    copy_to_tensor_group      forward: identity   backward: allreduce-sum
    reduce_from_tensor_group  forward: allreduce-sum   backward: identity

Horovod ops have no XLA kernels: a model that calls these cannot be
compiled with `jit_compile=True` (the compute between them can:
models/tensor_parallel.py, `xla=True`). bfloat16 tensors (mixed_bfloat16)
travel as float32: Horovod's TensorFlow allreduce does not take bfloat16.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from utils.distributed import core
from utils.distributed.core import ProcessGroup
from utils.errors import UserError


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """Where this rank sits in the tensor x data grid, and the two groups it belongs to."""

    tensor_size: int
    tensor_rank: int
    data_size: int
    data_rank: int
    tensor_group: ProcessGroup
    data_group: ProcessGroup


def check_divides(world_size: int, tensor: int) -> None:
    """UserError (one line) unless `tensor` is a positive divisor of `world_size`."""
    if tensor < 1 or world_size % tensor:
        raise UserError(
            f"parallel.tensor={tensor} must divide the number of ranks ({world_size}): "
            f"use one of {[t for t in range(1, world_size + 1) if world_size % t == 0]}"
        )


def layout(world_size: int, tensor: int, rank: int) -> TensorParallel:
    """The groups of `rank` in a world of `world_size` ranks cut into tensor groups of `tensor`."""
    check_divides(world_size, tensor)
    first = rank - rank % tensor
    return TensorParallel(
        tensor_size=tensor,
        tensor_rank=rank % tensor,
        data_size=world_size // tensor,
        data_rank=rank // tensor,
        tensor_group=ProcessGroup(tuple(range(first, first + tensor))),
        data_group=ProcessGroup(tuple(range(rank % tensor, world_size, tensor))),
    )


def process_set_ranks(world_size: int, tensor: int) -> list[tuple[int, ...]]:
    """Every group that needs a Horovod process set (not the whole world, not one rank)."""
    groups = {layout(world_size, tensor, r).tensor_group.ranks for r in range(world_size)}
    groups |= {layout(world_size, tensor, r).data_group.ranks for r in range(world_size)}
    return sorted(g for g in groups if 1 < len(g) < world_size)


def init(tensor: int, threads: int = 0, use_horovod: bool | None = None) -> TensorParallel:
    """Start Horovod with the process sets of `tensor`-way tensor parallelism; this rank's groups.

    Call instead of `utils.distributed.init()`, once, on every rank. The
    world size is read from the launcher (HOROVOD_SIZE) since the sets must
    exist before Horovod starts; a T that does not divide it stops every
    rank with the same one-line UserError, before any collective.
    """
    world_size = int(os.environ.get("HOROVOD_SIZE", "1"))
    check_divides(world_size, tensor)
    core.init(threads, use_horovod, process_sets=process_set_ranks(world_size, tensor))
    tp = current(tensor)
    core.set_tensor_size(tensor)
    return tp


def current(tensor: int) -> TensorParallel:
    """This rank's groups in the world Horovod already runs (its process sets must exist)."""
    world = core.world()
    if world.elastic:
        raise UserError("tensor parallelism needs a fixed world size: drop --elastic")
    return layout(world.size, tensor, world.rank)


def _active(group: ProcessGroup) -> bool:
    """Whether `group`'s collectives run: a group of several ranks in a world that has them.

    A layout made in one process (tests shard a model for T=2 there) runs its
    collectives as the identity, also when Horovod was started at size 1.
    """
    world = core.world()
    return group.size > 1 and world.horovod and world.size >= group.size


def _allreduce_sum(x: tf.Tensor, group: ProcessGroup) -> tf.Tensor:
    """Sum over `group`; bfloat16 (mixed_bfloat16 activations) travels and adds as float32.

    Horovod's TensorFlow allreduce has no bfloat16 kernel. The sum is rounded
    back to bfloat16 once, the same on every rank.
    """
    dtype = x.dtype
    if dtype == tf.bfloat16:
        x = tf.cast(x, tf.float32)
    out = core.hvd.allreduce(x, op=core.hvd.Sum, process_set=core.process_set(group))
    return tf.cast(out, dtype) if dtype == tf.bfloat16 else out


def copy_to_tensor_group(x: tf.Tensor, tp: TensorParallel) -> tf.Tensor:
    """Identity forward, allreduce-sum over the tensor group backward.

    Put before a column-parallel layer: every shard reads the same input,
    and the input's gradient is the sum of each shard's part of it.
    """
    if not _active(tp.tensor_group):
        return x

    @tf.custom_gradient
    def copy(x):
        def grad(dy):
            return _allreduce_sum(dy, tp.tensor_group)

        return tf.identity(x), grad

    return copy(x)


def reduce_from_tensor_group(x: tf.Tensor, tp: TensorParallel) -> tf.Tensor:
    """Allreduce-sum over the tensor group forward, identity backward.

    Put after a row-parallel layer: the shards' partial outputs add up to
    the full one, and each shard's partial output has the full gradient.
    """
    if not _active(tp.tensor_group):
        return x

    @tf.custom_gradient
    def reduce(x):
        def grad(dy):
            return tf.identity(dy)

        return _allreduce_sum(x, tp.tensor_group), grad

    return reduce(x)


def shard_full_weights(
    arrays: Sequence[np.ndarray], axes: Sequence[int | None], tp: TensorParallel
) -> list[np.ndarray]:
    """This shard's slice of each full array: its 1/T along `axis`, or all of it for None."""
    out = []
    for array, axis in zip(arrays, axes, strict=True):
        array = np.asarray(array)
        if axis is None:
            out.append(array)
            continue
        if array.shape[axis] % tp.tensor_size:
            raise UserError(
                f"parallel.tensor={tp.tensor_size} does not divide a weight's "
                f"dimension {array.shape[axis]} (shape {array.shape}, axis {axis})"
            )
        out.append(np.split(array, tp.tensor_size, axis=axis)[tp.tensor_rank])
    return out


def gather_full_weights(
    arrays: Sequence[Any], axes: Sequence[int | None], tp: TensorParallel
) -> list[np.ndarray]:
    """The full arrays from every shard's slice (allgather over the tensor group, in rank order).

    Every rank of the tensor group must call it with the same shapes; arrays
    with axis None are replicated and returned as they are.
    """
    out = []
    for i, (array, axis) in enumerate(zip(arrays, axes, strict=True)):
        array = np.asarray(array)
        if axis is None or not _active(tp.tensor_group):
            out.append(array)
            continue
        moved = np.ascontiguousarray(np.moveaxis(array, axis, 0))
        gathered = core.hvd.allgather(
            tf.constant(moved),
            name=f"tp_gather_full_weights_{i}",
            process_set=core.process_set(tp.tensor_group),
        ).numpy()
        out.append(np.moveaxis(gathered, 0, axis))
    return out


def gather_replicated(arrays: Sequence[Any], tp: TensorParallel) -> list[np.ndarray]:
    """Every shard's copy of each array, stacked on a new first axis (tensor rank order).

    For checks that replicated weights (norms, embeddings) agree bit for bit.
    """
    arrays = [np.asarray(a) for a in arrays]
    if not _active(tp.tensor_group):
        return [a[None] for a in arrays]
    return [
        core.hvd.allgather(
            tf.constant(a[None]),
            name=f"tp_gather_replicated_{i}",
            process_set=core.process_set(tp.tensor_group),
        ).numpy()
        for i, a in enumerate(arrays)
    ]
