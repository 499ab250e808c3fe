"""Exactness checks of tensor parallelism against the T=1 model, shared by np=2 and np=4 runs.

Every rank builds the same full CausalTransformer (T=1) and its own shard of
it, runs both, and compares what it gathers from its tensor group with what
the full model computes locally; each check raises AssertionError on a
mismatch. test_tensor_parallel.py calls them inside the `horovodrun -np 2`
group (T=2 is the whole world) and runs this file as a script under
`horovodrun -np 4` (T=2 x 2 data-parallel replicas):

    python tests/tensor_parallel_checks.py --tensor 2

The forward, gradient and training checks also run with the shards' XLA
segments (`build_shard(..., xla=True)`); the training checks also with
gradient accumulation (two backward passes per update, clipped by the whole
model's norm) and under the mixed_bfloat16 policy.
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
# Global-norm clipping of the accumulated steps: at np=2 the first update's norm (0.80) is
# clipped, the next two (0.64, 0.61) are not, so a wrong scale (passes summed, not averaged)
# cannot hide behind the clip. At np=4 (other rows) no update is clipped.
CLIP = 0.7
BF16_LOSS_RTOL = 2e-2  # mixed_bfloat16 loss, T=2 against T=1 (measured about 1e-3)


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


def check_forward(tp: TensorParallel, xla: bool = False) -> float:
    """The shards' logits equal the full model's; without the row-parallel allreduce they do not.

    (The negative control runs without the XLA segments: it checks the test, not them.)
    """
    full = full_model()
    x, _ = batch(ROWS)
    expected = full(x).numpy()
    diff = float(np.abs(build_shard(full, tp, xla=xla)(x).numpy() - expected).max())
    assert diff <= TOL, f"T={tp.tensor_size} logits (xla={xla}) differ from T=1 by {diff}"
    unreduced = build_shard(full, tp, reduce=False)(x).numpy()
    unreduced_diff = float(np.abs(unreduced - expected).max())
    assert unreduced_diff > 1e-3, (
        f"logits without the allreduce match T=1 ({unreduced_diff}): test is blind"
    )
    return diff


def check_gradients(tp: TensorParallel, xla: bool = False) -> float:
    """Gradients gathered from the shards equal the full model's; replicated ones agree exactly."""
    full = full_model()
    shard = build_shard(full, tp, xla=xla)
    x, y = batch(ROWS)
    pairs = weight_pairs(shard, full)
    with tf.GradientTape() as tape:
        loss = _loss(full(x), y)
    expected = tape.gradient(loss, [f for _, f, _ in pairs])

    @tf.function  # as in training: the segments' gradients in a graph
    def shard_gradients():
        with tf.GradientTape() as tape:
            loss = _loss(shard(x, training=True), y)
        return tape.gradient(loss, [s for s, _, _ in pairs])

    grads = shard_gradients()
    gathered = gather_full_weights([g.numpy() for g in grads], [axis for _, _, axis in pairs], tp)
    diff = _max_diff(gathered, [g.numpy() for g in expected])
    assert diff <= TOL, f"gathered gradients (xla={xla}) differ from T=1 by {diff}"
    replicated = [g.numpy() for g, (_, _, axis) in zip(grads, pairs, strict=True) if axis is None]
    for copies in gather_replicated(replicated, tp):
        assert (copies == copies[0]).all(), "a replicated gradient differs between shards"
    return diff


def check_training(tp: TensorParallel, xla: bool = False) -> float:
    """STEPS SGD steps of the shards (each replica on its rows) equal T=1 on the global batch.

    Runs through the train function model.fit uses, with the
    DistributedOptimizer averaging over the data-parallel group only.
    Afterwards the shards of a tensor group hold bit-identical replicated
    weights, and the full model gathered from them equals the reference.
    """
    return _train_against_full(tp, xla=xla)


def check_accumulation(tp: TensorParallel, xla: bool = False) -> float:
    """train.accumulate_steps=2: STEPS updates of two backward passes each equal T=1's.

    The DistributedOptimizer adds up two passes (backward_passes_per_step=2)
    and clips by the whole model's norm (set_tensor_parallel, as train.py
    does) at CLIP; the reference takes one step on both passes' global
    batches at once. A pass that ends no update changes no weight.
    """
    return _train_against_full(tp, xla=xla, passes=2, clipnorm=CLIP)


def check_mixed_bfloat16(tp: TensorParallel, xla: bool = False) -> float:
    """train.precision=mixed_bfloat16: the shards train, their replicated weights stay identical.

    STEPS SGD steps (clipped, as in training) under the mixed_bfloat16
    policy: the shards' activations and the allreduced partial sums are
    bfloat16, the weights float32. The losses are finite and within
    the loss of both models on one batch after training is within
    BF16_LOSS_RTOL of T=1's (same policy, same steps). Returns the relative
    difference of those losses.
    """
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        return _train_against_full(tp, xla=xla, clipnorm=CLIP, bfloat16=True)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def _compile(model, optimizer) -> None:
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )


def _train_against_full(
    tp: TensorParallel,
    xla: bool = False,
    passes: int = 1,
    clipnorm: float | None = None,
    bfloat16: bool = False,
) -> float:
    """STEPS updates of the shards (`passes` backward passes each) against T=1's.

    Float32: returns the largest weight difference after training (at most
    TOL, and the gathered model's logits too). bfloat16: every loss finite;
    returns the relative difference of the two models' losses on one batch
    after training (at most BF16_LOSS_RTOL).
    Either way, the shards' replicated weights end bit-identical.
    """
    reference = full_model()
    _compile(reference, keras.optimizers.SGD(LR, global_clipnorm=clipnorm))
    full = full_model()
    shard = build_shard(full, tp, xla=xla)
    optimizer = distributed.DistributedOptimizer(
        keras.optimizers.SGD(LR, global_clipnorm=clipnorm),
        backward_passes_per_step=passes,
        group=tp.data_group,
    )
    _compile(shard, optimizer)
    shard.optimizer.build(shard.trainable_variables)
    split = [s for s, _, axis in weight_pairs(shard, full) if axis is not None]
    distributed.optimizer.set_tensor_parallel(shard.optimizer, split, tp.tensor_group)
    rows = slice(tp.data_rank * ROWS, (tp.data_rank + 1) * ROWS)
    losses, reference_losses = [], []
    for step in range(STEPS):
        # Each pass's global batch; the reference takes them all in one step.
        micro = [batch(ROWS * tp.data_size, seed=10 + passes * step + p) for p in range(passes)]
        x = {k: np.concatenate([m[0][k] for m in micro]) for k in micro[0][0]}
        y = np.concatenate([m[1] for m in micro])
        reference_losses.append(float(reference.train_on_batch(x, y)))
        for p, (x_p, y_p) in enumerate(micro):
            before = [v.numpy() for v in shard.trainable_variables]
            losses.append(shard.train_on_batch({k: v[rows] for k, v in x_p.items()}, y_p[rows]))
            if p < passes - 1:
                after = [v.numpy() for v in shard.trainable_variables]
                assert _max_diff(after, before) == 0.0, "a pass that ends no update changed weights"
    for copies in gather_replicated([v.numpy() for v in replicated_weights(shard)], tp):
        assert (copies == copies[0]).all(), "a replicated weight differs between shards"
    if bfloat16:
        assert np.isfinite(losses + reference_losses).all(), f"non-finite loss: {losses}"
        x, y = batch(ROWS)  # after training, both models on the same rows
        ours, theirs = float(_loss(shard(x), y)), float(_loss(reference(x), y))
        rel = abs(ours - theirs) / abs(theirs)
        assert np.isfinite(ours) and rel <= BF16_LOSS_RTOL, (
            f"mixed_bfloat16 loss {ours} against T=1's {theirs}"
        )
        return rel
    gathered = full_from_shards(shard)
    diff = _max_diff([v.numpy() for v in gathered.weights], [v.numpy() for v in reference.weights])
    assert diff <= TOL, (
        f"weights after {STEPS} steps (xla={xla}, {passes} passes) differ from T=1 by {diff}"
    )
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
        "accumulation": check_accumulation(tp),
        "bf16_loss_rel": check_mixed_bfloat16(tp),
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
