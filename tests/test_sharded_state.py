"""models/sharded_state.py: under tensor parallelism no rank keeps the full model while it trains.

Run inside test_multiprocess.py's `horovodrun -np 2` group (T=2 over the
whole world); skipped in a one-process session.
"""

from __future__ import annotations

import gc

import keras
import numpy as np
import pytest

from models.sharded_state import ShardedState
from models.tasks import CausalLM
from models.tensor_parallel import build_shard
from models.transformer import CausalTransformer
from tests.conftest import InMemoryData
from train import compile_model
from utils import distributed
from utils.config import Config, ModelConfig, TrainConfig

MODEL = ModelConfig(n_layers=2, n_heads=4, d_model=32, d_ff=96, seq_len=8, dropout=0.0)
VOCAB = 48


@pytest.fixture(scope="module")
def tp2():
    world = distributed.init()
    if world.size != 2:
        pytest.skip("needs 2 ranks: runs under horovodrun -np 2 in test_multiprocess.py")
    from utils.distributed import tensor_parallel

    return tensor_parallel.current(2)


def live_full_kernels() -> int:
    """How many live Keras variables have the full (unsplit) shape of a block's FFN1 kernel."""
    gc.collect()
    return sum(
        1
        for o in gc.get_objects()
        if isinstance(o, keras.Variable) and tuple(o.shape) == (MODEL.d_model, MODEL.d_ff)
    )


def _task() -> CausalLM:
    train = TrainConfig(optimizer="adamw", lr=1e-2, xla=False)
    return CausalLM(Config(model=MODEL, train=train), InMemoryData(VOCAB))


def _full(task: CausalLM) -> CausalTransformer:
    keras.utils.set_random_seed(0)
    model = task.build_model()
    compile_model(task, model, task.config.train, 1e-2, 10)
    return model


def _sharded(task: CausalLM, tp) -> tuple[ShardedState, list[np.ndarray]]:
    """The shard of a fresh full model, and the full state it started from; the full model
    goes out of scope here, as in train.shard_model."""
    full = _full(task)
    for i, v in enumerate(full.optimizer.variables):  # non-trivial slots and counters
        v.assign(np.full(v.shape, 0.01 * (i + 1), v.dtype))
    before = [v.numpy() for v in full.variables + list(full.optimizer.variables)]
    assert live_full_kernels() >= MODEL.n_layers  # the detector sees a full model
    shard = build_shard(full, tp)
    compile_model(task, shard, task.config.train, 1e-2, 10, group=tp.data_group, xla=False)
    return ShardedState(shard, full, lambda: _full(task)), before


@pytest.mark.multiprocess
def test_no_full_copy_is_kept_and_the_gathered_state_is_the_full_one(tp2):
    task = _task()
    sharded, before = _sharded(task, tp2)
    # Only the shard's slices (d_model x d_ff / 2) are alive: no full model, no full slots.
    assert live_full_kernels() == 0
    values = sharded.gather_values()
    assert [tuple(v.shape) for v in values] == [b.shape for b in before]
    for value, expected in zip(values, before, strict=True):
        np.testing.assert_array_equal(value.numpy(), expected)

    rebuilt = sharded.gather()  # a new full model, with the optimizer state
    state = rebuilt.variables + list(rebuilt.optimizer.variables)
    for variable, expected in zip(state, before, strict=True):
        np.testing.assert_array_equal(variable.numpy(), expected)
    weights = [w.numpy() for w in rebuilt.weights]
    shard_arrays = sharded.shard_weights(weights)
    for got, expected in zip(sharded.full_weights(shard_arrays), weights, strict=True):
        np.testing.assert_array_equal(got, expected)
