"""utils.distributed as a Keras user meets it: compile with DistributedOptimizer, fit with callbacks.

Marked `multiprocess`: test_multiprocess.py runs this file under
`horovodrun -np 2`; in the ordinary session it runs as one process, where
the checks that need two ranks skip. Every rank builds a different
initialisation and reads different data, so identical ranks prove the
averaging and the broadcast.
"""

import csv

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

import utils.distributed as hvd

pytestmark = pytest.mark.multiprocess

CLASSES, FEATURES = 3, 6


@pytest.fixture(scope="module")
def world():
    return hvd.init()


def _need_two(world):
    if world.size < 2:
        pytest.skip("needs 2 ranks: runs under horovodrun -np 2 in test_multiprocess.py")


def _gathered_equal(values, name: str) -> bool:
    every = hvd.allgather_object([np.asarray(v) for v in values], name=name)
    return all(
        np.array_equal(a, b) for other in every[1:] for a, b in zip(every[0], other, strict=True)
    )


def _data(rank: int, rows: int = 32):
    rng = np.random.default_rng(100 + rank)  # every rank its own data
    x = rng.normal(size=(rows, FEATURES)).astype("float32")
    return x, (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0.5).astype("int32")


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(16, activation="relu")
        self.out = keras.layers.Dense(CLASSES)

    def call(self, x):
        return self.out(self.hidden(x))


def _model(kind: str) -> keras.Model:
    if kind == "sequential":
        return keras.Sequential(
            [
                keras.Input((FEATURES,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(CLASSES),
            ]
        )
    if kind == "functional":
        inputs = keras.Input((FEATURES,))
        hidden = keras.layers.Dense(16, activation="relu")(inputs)
        return keras.Model(inputs, keras.layers.Dense(CLASSES)(hidden))
    return Subclassed()


def _callbacks():
    return [
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),
        hvd.callbacks.MetricAverageCallback(),
    ]


@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
def test_keras_models_train_identically_on_every_rank(world, kind):
    _need_two(world)
    keras.utils.set_random_seed(world.rank)  # different weights until the broadcast
    model = _model(kind)
    model.compile(
        optimizer=hvd.DistributedOptimizer(keras.optimizers.Adam(0.01)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x, y = _data(world.rank)
    history = model.fit(x, y, batch_size=8, epochs=3, callbacks=_callbacks(), verbose=0)
    assert _gathered_equal(model.weights + model.optimizer.variables, f"{kind}_final")
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert _gathered_equal([history.history["loss"]], f"{kind}_loss")  # exact on every rank


def test_a_keras_hub_task_with_its_own_compile_defaults(world):
    _need_two(world)
    keras.utils.set_random_seed(world.rank)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=40,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=8,
    )
    model = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)
    model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.Adam(1e-3)))
    rng = np.random.default_rng(world.rank)
    ids = rng.integers(1, 40, (16, 8)).astype("int32")
    x = {"token_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": np.ones_like(ids)}
    labels = (ids[:, 0] > 20).astype("int32")
    model.fit(x, labels, batch_size=4, epochs=1, callbacks=_callbacks(), verbose=0, shuffle=False)
    assert _gathered_equal(model.weights, "keras_hub_final")


def test_the_first_step_runs_on_rank_0s_weights(world):
    _need_two(world)
    keras.utils.set_random_seed(world.rank)
    model = _model("functional")
    model.compile(
        optimizer=hvd.DistributedOptimizer(keras.optimizers.Adam(0.01)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    initial = [w.numpy() for w in model.weights]
    seen = {}

    class FirstBatch(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0:
                seen["weights"] = [w.numpy() for w in self.model.weights]
                seen["optimizer_built"] = self.model.optimizer.built

    x, y = _data(world.rank, 8)
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[*_callbacks(), FirstBatch()], verbose=0)
    root = hvd.broadcast_object(initial, name="root_initial")
    assert seen["optimizer_built"]
    for a, b in zip(seen["weights"], root, strict=True):
        np.testing.assert_array_equal(a, b)


def test_metric_average_is_exact_over_unequal_shards_with_validation(world, tmp_path):
    """Rank r trains on batches of 4 + 2r rows and validates on 5 + 3r rows: the logs every
    callback reads (History, CSVLogger, EarlyStopping) are the metrics over the union."""
    keras.utils.set_random_seed(0)
    model = _model("sequential")
    model.compile(
        optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.0)),  # the weights stay put
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    train_rows, val_rows = 4 + 2 * world.rank, 5 + 3 * world.rank
    x, y = _data(world.rank, 3 * train_rows)
    vx, vy = _data(50 + world.rank, val_rows)
    csv_path = tmp_path / f"history-{world.rank}.csv"
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=5)
    history = model.fit(
        x,
        y,
        batch_size=train_rows,
        epochs=2,
        validation_data=(vx, vy),
        callbacks=[*_callbacks(), keras.callbacks.CSVLogger(str(csv_path)), stop],
        verbose=0,
    )
    hvd.broadcast_variables(model.weights)  # (already equal) evaluate the union on one model
    union = [
        np.concatenate(p) for p in zip(*hvd.allgather_object((x, y, vx, vy), "data"), strict=True)
    ]
    expected_loss = model.evaluate(union[0], union[1], batch_size=1000, verbose=0, return_dict=True)
    expected_val = model.evaluate(union[2], union[3], batch_size=1000, verbose=0, return_dict=True)
    for epoch in range(2):
        assert history.history["loss"][epoch] == pytest.approx(expected_loss["loss"], rel=1e-5)
        assert history.history["accuracy"][epoch] == pytest.approx(expected_loss["accuracy"])
        assert history.history["val_loss"][epoch] == pytest.approx(expected_val["loss"], rel=1e-5)
        assert history.history["val_accuracy"][epoch] == pytest.approx(expected_val["accuracy"])
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["val_loss"]) == pytest.approx(expected_val["loss"], rel=1e-5)
    assert stop.best == pytest.approx(expected_val["loss"], rel=1e-5)


def test_learning_rate_warmup_ramps_per_batch_from_lr_over_size(world):
    model = _model("functional")
    model.compile(
        optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.2)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rates = []

    class Rates(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            rates.append(float(np.asarray(self.model.optimizer.learning_rate)))

    warmup = hvd.callbacks.LearningRateWarmupCallback(initial_lr=0.2, warmup_epochs=2)
    x, y = _data(world.rank, 16)
    history = model.fit(
        x, y, batch_size=4, epochs=3, callbacks=[*_callbacks(), warmup, Rates()], verbose=0
    )
    size = world.size
    expected = [
        0.2 / size * ((e + b / 4 + 1 / 4) * (size - 1) / 2 + 1) for e in (0, 1) for b in range(4)
    ]
    np.testing.assert_allclose(rates[:8], expected, rtol=1e-6)
    assert rates[8:] == pytest.approx([0.2] * 4)
    assert history.history["learning_rate"][-1] == pytest.approx(0.2)


def test_learning_rate_warmup_refuses_a_schedule_in_one_line(world):
    model = _model("functional")
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9)
    model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(schedule)), loss="mse")
    warmup = hvd.callbacks.LearningRateWarmupCallback(initial_lr=0.1)
    with pytest.raises(ValueError, match=r"constant learning rate.*ExponentialDecay") as error:
        model.fit(
            np.zeros((4, FEATURES)), np.zeros((4, CLASSES)), epochs=1, callbacks=[warmup], verbose=0
        )
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("order", ["compile_adds_loss_scaling", "distributed_outside"])
def test_mixed_float16_ranks_skip_together_and_stay_identical(world, order):
    """A gradient that overflows on one rank only: every rank skips that step (the average is
    inf everywhere) and lowers its loss scale; the ranks stay bit-identical. Without the
    averaging before the check, rank 1 alone would skip and the ranks would part."""
    _need_two(world)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(world.rank)
        model = _model("functional")
        if order == "compile_adds_loss_scaling":  # LossScaleOptimizer(DistributedOptimizer(SGD))
            optimizer = hvd.DistributedOptimizer(keras.optimizers.SGD(0.05))
        else:  # DistributedOptimizer(LossScaleOptimizer(SGD))
            optimizer = hvd.DistributedOptimizer(
                keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05))
            )
        model.compile(
            optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        x, y = _data(world.rank, 16)
        weights = np.ones(16, "float32")
        if world.rank == 1:
            weights[4:8] = np.inf  # the second batch overflows on rank 1 only
        model.fit(
            x, y, sample_weight=weights, batch_size=4, epochs=1, callbacks=_callbacks(), verbose=0
        )
        scale = float(model.optimizer.dynamic_scale.numpy())
    finally:
        keras.mixed_precision.set_global_policy("float32")
    # The poisoned step (and any that overflowed at the first, large scales) was skipped on
    # both ranks: the same scale everywhere, and identical weights.
    assert scale <= model.optimizer.initial_scale / 2
    assert _gathered_equal([scale], f"fp16_scale_{order}")
    assert _gathered_equal(model.weights + model.optimizer.variables, f"fp16_{order}")


class OwnStep(keras.Model):
    """A model with its own train_step (it calls apply_gradients itself)."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(CLASSES)

    def call(self, x):
        return self.dense(x)

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables, strict=True))
        return {"loss": loss}


def test_an_own_train_step_averages_and_xla_is_refused_in_one_line(world):
    keras.utils.set_random_seed(world.rank)
    model = OwnStep()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.1)), loss=loss)
    x, y = _data(world.rank, 16)
    model.fit(x, y, batch_size=4, epochs=1, callbacks=_callbacks(), verbose=0)
    assert _gathered_equal(model.weights, "own_step")
    model.compile(
        optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.1)), loss=loss, jit_compile=True
    )
    with pytest.raises(ValueError, match=r"overrides train_step.*jit_compile=False") as error:
        model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert "\n" not in str(error.value)


def test_xla_compiles_both_halves_with_the_allreduce_between(world):
    """jit_compile=True (which "auto" never picks on a CPU): gradients and update are XLA
    functions, the Horovod allreduce sits between them in the graph, and the ranks agree."""
    keras.utils.set_random_seed(world.rank)
    model = _model("functional")
    model.compile(
        optimizer=hvd.DistributedOptimizer(keras.optimizers.Adam(0.01)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    x, y = _data(world.rank, 16)
    model.fit(x, y, batch_size=4, epochs=1, callbacks=_callbacks(), verbose=0)
    assert _gathered_equal(model.weights, "xla_final")
    parts = model.train_function.parts
    if world.size > 1:
        assert parts["forward_backward"]._jit_compile and parts["update"]._jit_compile
        batch = (tf.constant(x[:4]), tf.constant(y[:4]))
        graph = tf.function(parts["step"]).get_concrete_function(batch).graph
        kinds = [op.type for op in graph.get_operations()]
        compiled = [op for op in graph.get_operations() if op.node_def.attr["_XlaMustCompile"].b]
        assert "HorovodGroupedAllreduce" in kinds and len(compiled) == 2, kinds
    else:  # one rank: Keras's one compiled function, nothing to average
        assert parts == {}


def test_load_model_reads_on_rank_0_and_gives_every_rank_a_distributed_optimizer(world, tmp_path):
    keras.utils.set_random_seed(world.rank)
    model = _model("functional")
    model.compile(
        optimizer=hvd.DistributedOptimizer(keras.optimizers.Adam(0.01)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = _data(world.rank, 8)
    model.fit(x, y, batch_size=4, epochs=1, callbacks=_callbacks(), verbose=0)
    path = tmp_path / "only-rank-0-has-it.keras"
    if world.is_chief:
        model.save(path)
    loaded = hvd.load_model(path if world.is_chief else None)
    assert hvd.find_distributed(loaded.optimizer) is not None
    assert int(loaded.optimizer.iterations.numpy()) == 2
    for a, b in zip(loaded.weights, model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    loaded.fit(x, y, batch_size=4, epochs=1, verbose=0)  # trains on, still averaging
    assert _gathered_equal(loaded.weights, "loaded_final")


def test_wrapping_a_built_optimizer_is_refused(world):
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build([keras.Variable(np.zeros(2, "float32"))])
    with pytest.raises(ValueError, match="already built"):
        hvd.DistributedOptimizer(optimizer)
