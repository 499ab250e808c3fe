"""Exactness checks of tensor parallelism against the T=1 model, shared by np=2 and np=4 runs.

Every rank builds the same full CausalTransformer (T=1) and its own shard of
it, runs both, and compares what it gathers from its tensor group with what
the full model computes locally; each check raises AssertionError on a
mismatch. test_tensor_parallel.py calls them inside the `horovodrun -np 2`
group (T=2 is the whole world) and runs this file as a script under
`horovodrun -np 4` (T=2 x 2 data-parallel replicas):

    python tests/tensor_parallel_checks.py --tensor 2
"""

from __future__ import annotations

import argparse
import sys

import keras
import numpy as np
import tensorflow as tf

from models.tensor_parallel import (
    build_shard,
    full_from_shards,
    replicated_weights,
    weight_pairs,
)
from models.transformer import CausalTransformer
from utils import distributed
from utils.distributed.tensor_parallel import (
    TensorParallel,
    gather_full_weights,
    gather_replicated,
)

VOCAB, LAYERS, HEADS, WIDTH, FFN, SEQ = 24, 2, 4, 16, 32, 8
ROWS = 4  # rows per data-parallel replica
LR = 0.5
STEPS = 3
TOL = 1e-5


def full_model() -> CausalTransformer:
    """The same full model on every rank: seeded weights, biases and norms made non-trivial."""
    keras.utils.set_random_seed(0)
    full = CausalTransformer(VOCAB, LAYERS, HEADS, WIDTH, FFN, SEQ, name="causal_transformer")
    rng = np.random.default_rng(1)
    for v in full.weights:
        v.assign(v.numpy() + rng.normal(0.0, 0.05, v.shape).astype("float32"))
    return full


def batch(rows: int, seed: int = 2) -> tuple[dict, np.ndarray]:
    """`rows` rows of token ids and next-token targets (the same on every rank for a seed)."""
    ids = np.random.default_rng(seed).integers(1, VOCAB, (rows, SEQ)).astype("int32")
    return {"token_ids": ids, "padding_mask": np.ones_like(ids)}, np.roll(ids, -1, axis=1)


def _loss(logits, targets) -> tf.Tensor:
    return tf.reduce_mean(
        keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
    )


def _max_diff(a, b) -> float:
    return float(
        max(np.abs(np.asarray(x) - np.asarray(y)).max() for x, y in zip(a, b, strict=True))
    )


def check_forward(tp: TensorParallel) -> float:
    """The shards' logits equal the full model's; without the row-parallel allreduce they do not."""
    full = full_model()
    x, _ = batch(ROWS)
    expected = full(x).numpy()
    diff = float(np.abs(build_shard(full, tp)(x).numpy() - expected).max())
    assert diff <= TOL, f"T={tp.tensor_size} logits differ from T=1 by {diff}"
    unreduced = float(np.abs(build_shard(full, tp, reduce=False)(x).numpy() - expected).max())
    assert unreduced > 1e-3, f"logits without the allreduce match T=1 ({unreduced}): test is blind"
    return diff


def check_gradients(tp: TensorParallel) -> float:
    """Gradients gathered from the shards equal the full model's; replicated ones agree exactly."""
    full = full_model()
    shard = build_shard(full, tp)
    x, y = batch(ROWS)
    pairs = weight_pairs(shard, full)
    with tf.GradientTape() as tape:
        loss = _loss(full(x), y)
    expected = tape.gradient(loss, [f for _, f, _ in pairs])
    with tf.GradientTape() as tape:
        loss = _loss(shard(x), y)
    grads = tape.gradient(loss, [s for s, _, _ in pairs])
    gathered = gather_full_weights([g.numpy() for g in grads], [axis for _, _, axis in pairs], tp)
    diff = _max_diff(gathered, [g.numpy() for g in expected])
    assert diff <= TOL, f"gathered gradients differ from T=1 by {diff}"
    replicated = [g.numpy() for g, (_, _, axis) in zip(grads, pairs, strict=True) if axis is None]
    for copies in gather_replicated(replicated, tp):
        assert (copies == copies[0]).all(), "a replicated gradient differs between shards"
    return diff


def check_training(tp: TensorParallel) -> float:
    """STEPS SGD steps of the shards (each replica on its rows) equal T=1 on the global batch.

    Runs through the train function model.fit uses, with the
    DistributedOptimizer averaging over the data-parallel group only.
    Afterwards the shards of a tensor group hold bit-identical replicated
    weights, and the full model gathered from them equals the reference.
    """
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    reference = full_model()
    reference.compile(optimizer=keras.optimizers.SGD(LR), loss=loss, jit_compile=False)
    shard = build_shard(full_model(), tp)
    optimizer = distributed.DistributedOptimizer(keras.optimizers.SGD(LR), group=tp.data_group)
    shard.compile(optimizer=optimizer, loss=loss, jit_compile=False)
    rows = slice(tp.data_rank * ROWS, (tp.data_rank + 1) * ROWS)
    for step in range(STEPS):
        x, y = batch(ROWS * tp.data_size, seed=10 + step)  # the global batch
        reference.train_on_batch(x, y)
        shard.train_on_batch({k: v[rows] for k, v in x.items()}, y[rows])
    for copies in gather_replicated([v.numpy() for v in replicated_weights(shard)], tp):
        assert (copies == copies[0]).all(), "a replicated weight differs between shards"
    gathered = full_from_shards(shard)
    diff = _max_diff([v.numpy() for v in gathered.weights], [v.numpy() for v in reference.weights])
    assert diff <= TOL, f"weights after {STEPS} steps differ from T=1 by {diff}"
    x, _ = batch(ROWS)
    logits_diff = float(np.abs(gathered(x).numpy() - reference(x).numpy()).max())
    assert logits_diff <= TOL, f"the gathered model's logits differ by {logits_diff}"
    return diff


def check_dropout(tp: TensorParallel) -> int:
    """With dropout, the shards of a tensor group draw the same residual masks.

    Two SGD steps with dropout 0.2: if the shards' masks on the replicated
    residual stream differed, their activations, hence their norms' and
    embeddings' gradients, would differ; the replicated weights must stay
    bit-identical. Returns the number of weights compared.
    """
    full = full_model()
    config = dict(
        vocabulary_size=VOCAB,
        num_layers=LAYERS,
        num_heads=HEADS,
        hidden_dim=WIDTH,
        intermediate_dim=FFN,
        max_sequence_length=SEQ,
        dropout=0.2,
    )
    dropped = CausalTransformer(**config, name="causal_transformer")
    dropped.set_weights(full.get_weights())
    shard = build_shard(dropped, tp)
    shard.compile(
        optimizer=distributed.DistributedOptimizer(keras.optimizers.SGD(LR), group=tp.data_group),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    before = [v.numpy() for v in replicated_weights(shard)]
    for step in range(2):
        x, y = batch(ROWS, seed=20 + step + 100 * tp.data_rank)
        shard.train_on_batch(x, y)
    after = replicated_weights(shard)
    assert any((a.numpy() != b).any() for a, b in zip(after, before, strict=True))
    for copies in gather_replicated([v.numpy() for v in after], tp):
        assert (copies == copies[0]).all(), "with dropout, a replicated weight differs"
    return len(after)


def main(argv: list[str] | None = None) -> int:
    """Run every check on this rank's groups (under horovodrun -np N)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensor", type=int, default=2)
    args = parser.parse_args(argv)
    from utils.distributed import tensor_parallel

    tp = tensor_parallel.init(args.tensor)
    diffs = {
        "forward": check_forward(tp),
        "gradients": check_gradients(tp),
        "training": check_training(tp),
    }
    identical = check_dropout(tp)
    figures = " ".join(f"{k}={v:.2e}" for k, v in diffs.items())
    print(
        f"rank {distributed.rank()}: tensor {tp.tensor_rank}/{tp.tensor_size} "
        f"data {tp.data_rank}/{tp.data_size} max|diff| {figures}; with dropout "
        f"{identical} replicated weights identical OK",
        flush=True,
    )
    # Tensor groups finish at different times; a rank that shut Horovod down
    # while another group still gathers would fail that gather.
    distributed.barrier()
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
