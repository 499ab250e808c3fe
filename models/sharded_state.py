"""The training state of a tensor-parallel shard and the full model it mirrors.

Checkpoints, best.keras and model.keras hold the full, ordinary T=1 model
with its optimizer state, so a run resumes or evaluates at any T:
`ShardedState.gather` fills the full model from the shards of a tensor
group, `scatter` slices it into this shard. Optimizer slots are split like
the weights they belong to (models/tensor_parallel.py `weight_pairs`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np

from models.tensor_parallel import TensorParallelCausalLM, weight_pairs
from models.transformer import CausalTransformer
from utils.distributed.tensor_parallel import gather_full_weights, shard_full_weights


def optimizer_slot_lists(optimizer: keras.optimizers.Optimizer) -> dict[str, list]:
    """The optimizer's lists of one slot variable per trainable variable, by attribute name.

    AdamW's `_momentums` and `_velocities`, SGD's `momentums`, the
    DistributedOptimizer's `_hvd_accumulators`...: every list attribute as
    long as the trainable variables whose entries have their shapes (or are
    None). Found this way so that any Keras optimizer works.
    """
    trainable = list(optimizer._trainable_variables)
    found = {}
    for name, value in vars(optimizer).items():
        if name == "_trainable_variables" or not isinstance(value, list):
            continue
        if not trainable or len(value) != len(trainable) or all(v is None for v in value):
            continue
        if all(
            v is None or (isinstance(v, keras.Variable) and tuple(v.shape) == tuple(t.shape))
            for v, t in zip(value, trainable, strict=True)
        ):
            found[name] = value
    return found


def state_pairs(shard: TensorParallelCausalLM, full: CausalTransformer) -> list[tuple]:
    """(shard variable, full variable, split axis or None) for the weights and optimizer state.

    Both models must be compiled with the same optimizer settings and their
    optimizers built. A slot variable is split like the weight it belongs to;
    the optimizer's other variables (iteration count, counters) are paired in
    order and are the same on every shard.
    """
    pairs = weight_pairs(shard, full)
    ours, theirs = shard.optimizer, full.optimizer
    by_shard = {id(s): (f, axis) for s, f, axis in pairs}
    full_index = {id(v): i for i, v in enumerate(theirs._trainable_variables)}
    full_slots = optimizer_slot_lists(theirs)
    slots = []
    for name, shard_list in optimizer_slot_lists(ours).items():
        for variable, slot in zip(ours._trainable_variables, shard_list, strict=True):
            if slot is None:
                continue
            full_variable, axis = by_shard[id(variable)]
            slots.append((slot, full_slots[name][full_index[id(full_variable)]], axis))
    claimed_shard = {id(s) for s, _, _ in slots}
    claimed_full = {id(f) for _, f, _ in slots}
    rest_shard = [v for v in ours.variables if id(v) not in claimed_shard]
    rest_full = [v for v in theirs.variables if id(v) not in claimed_full]
    if len(rest_shard) != len(rest_full) or any(
        tuple(s.shape) != tuple(f.shape) for s, f in zip(rest_shard, rest_full, strict=True)
    ):
        raise ValueError("the shard's and the full model's optimizers differ: compile both alike")
    return pairs + slots + [(s, f, None) for s, f in zip(rest_shard, rest_full, strict=True)]


@dataclasses.dataclass
class GatheredValue:
    """One variable of the full model, gathered: what utils/checkpoint.py `save` writes."""

    path: str
    value: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape

    def numpy(self) -> np.ndarray:
        return self.value


class ShardedState:
    """A shard under training, and how to gather the full model (and optimizer) it is part of.

    Checkpoints, model.keras and best.keras hold the full model (the ordinary
    T=1 model, so a run resumes or evaluates at any T). No rank keeps that
    full model while it trains: after `scatter` has cut this rank's slices
    from it, only the layout is kept (which shard variable, split on which
    axis, fills each full variable, in checkpoint order). `gather_values`
    then returns the full state as arrays, for rank 0 to write a checkpoint,
    and `gather` builds a full model from them (`make_full`) when one is
    needed: best.keras, and evaluation and model.keras after training.

    Args:
        shard: this rank's compiled shard, its optimizer built.
        full: the full model, compiled alike (its optimizer built), holding
            the state to start from (the same on every rank of the tensor group).
        make_full: a new compiled full model, its optimizer built (train.py).
    """

    def __init__(
        self,
        shard: TensorParallelCausalLM,
        full: CausalTransformer,
        make_full: Callable[[], CausalTransformer],
    ):
        self.shard, self.make_full = shard, make_full
        pairs = state_pairs(shard, full)
        self.variables = [s for s, _, _ in pairs]
        self.axes = [axis for _, _, axis in pairs]
        source = {id(f): i for i, (_, f, _) in enumerate(pairs)}
        full_state = full.variables + list(full.optimizer.variables)
        # Checkpoint order: each full variable's path and the pair that fills it; the full
        # model's own dropout RNG states have no shard counterpart and keep their values.
        self.layout = [(v.path, source.get(id(v))) for v in full_state]
        self.constants = {i: v.numpy() for i, v in enumerate(full_state) if id(v) not in source}
        self.weight_index, self.weight_axes = _weight_axes(shard, full)
        self.split = [s for s, _, axis in weight_pairs(shard, full) if axis is not None]
        self._scatter([f.numpy() for _, f, _ in pairs])

    def split_variables(self) -> list:
        """The shard's trainable variables that are slices of a full one."""
        return self.split

    def _scatter(self, full_values: list) -> None:
        values = shard_full_weights(full_values, self.axes, self.shard.tp)
        for variable, value in zip(self.variables, values, strict=True):
            variable.assign(value)

    def gather_values(self) -> list[GatheredValue]:
        """The full model's variables and optimizer state, in checkpoint order, as arrays.

        A collective: every rank calls it (each tensor group gathers its own).
        """
        gathered = gather_full_weights(
            [v.numpy() for v in self.variables], self.axes, self.shard.tp
        )
        return [
            GatheredValue(path, gathered[j] if j is not None else self.constants[i])
            for i, (path, j) in enumerate(self.layout)
        ]

    def gather(self) -> CausalTransformer:
        """A new full model holding the gathered weights and optimizer state (a collective)."""
        values = self.gather_values()
        full = self.make_full()
        for variable, value in zip(
            full.variables + list(full.optimizer.variables), values, strict=True
        ):
            variable.assign(value.value)
        return full

    def full_weights(self, arrays: list) -> list[np.ndarray]:
        """Shard weight arrays (e.g. the best epoch's) as the full model's get_weights() list.

        A collective, like `gather`.
        """
        gathered = gather_full_weights(arrays, self.weight_axes, self.shard.tp)
        out: list = [None] * len(gathered)
        for i, value in zip(self.weight_index, gathered, strict=True):
            out[i] = value
        return out

    def shard_weights(self, arrays: list) -> list[np.ndarray]:
        """The full model's get_weights() arrays cut into this shard's get_weights() list."""
        return shard_full_weights(
            [arrays[i] for i in self.weight_index], self.weight_axes, self.shard.tp
        )


def _weight_axes(
    shard: TensorParallelCausalLM, full: CausalTransformer
) -> tuple[list[int], list[int | None]]:
    """For each of the shard's weights (get_weights order): the full weight's index, axis."""
    full_index = {id(v): i for i, v in enumerate(full.weights)}
    by_shard = {id(s): (full_index[id(f)], a) for s, f, a in weight_pairs(shard, full)}
    if len(by_shard) != len(shard.weights) or len(by_shard) != len(full.weights):
        raise ValueError("the shard's weights and the full model's do not pair one to one")
    found = [by_shard[id(w)] for w in shard.weights]
    return [i for i, _ in found], [a for _, a in found]
