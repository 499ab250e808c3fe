"""The training-step options keep their promises (single process, through model.fit's train function).

- gradient accumulation: k batches of B give the update of one batch of k x B;
- the XLA-compiled step gives the update of the plain one, and so do blocks cut into
  XLA segments (bench/overlap.py);
- mixed bfloat16 trains with float32 variables and a float32 loss.

fp16 gradient compression needs two ranks: see test_distributed.py.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.tasks import CausalLM, MaskedLM, Task
from models.transformer import build_causal_lm
from tests.conftest import InMemoryData
from train import compile_model
from utils import distributed
from utils.config import Config, ModelConfig, TrainConfig

MODEL = ModelConfig(n_layers=2, n_heads=2, d_model=32, d_ff=64, seq_len=16, dropout=0.0)
VOCAB = 50
TOLERANCE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def world():
    return distributed.init()


def _model(task_cls=CausalLM, lr: float = 10.0, **overrides) -> tuple[Task, keras.Model]:
    cfg = TrainConfig(
        optimizer="sgd", momentum=0.0, clip_norm=0.0, weight_decay=0.0, warmup_steps=0, **overrides
    )
    task = task_cls(Config(model=MODEL, train=cfg))
    task.prepared = InMemoryData(VOCAB)
    keras.utils.set_random_seed(0)
    model = task.build_model() if task_cls is not CausalLM else build_causal_lm(MODEL, VOCAB)
    # A large rate: updates (new - old weights) must stand well above float32 rounding of the weights.
    compile_model(task, model, cfg, lr, 100)
    return task, model


def _batch(rows: int, seed: int = 0):
    """(token ids, targets, row weights) as data/load.py yields them; the last row only pads."""
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.integers(3, VOCAB, (rows, MODEL.seq_len)), tf.int32)
    y = tf.constant(rng.integers(3, VOCAB, (rows, MODEL.seq_len)), tf.int32)
    w = np.ones(rows, np.float32)
    w[-1] = 0.0
    return x, y, tf.constant(w)


def _keras_batches(task: Task, batch, parts: int) -> list:
    """The task's fit batch (as model.fit gets it), cut into `parts` batches of equal rows."""
    ds = tf.data.Dataset.from_tensors(batch)
    whole = next(iter(task.fit_dataset(ds, training=True)))
    rows = int(tf.nest.flatten(whole)[0].shape[0]) // parts
    return [
        tf.nest.map_structure(lambda t, i=i: t[i * rows : (i + 1) * rows], whole)
        for i in range(parts)
    ]


def _update(model: keras.Model, batches: list) -> list[np.ndarray]:
    """Weights after minus before running the train function on `batches`, one call each."""
    before = [w.numpy() for w in model.trainable_weights]
    model.make_train_function()
    for batch in batches:
        model.train_function(iter(tf.data.Dataset.from_tensors(batch)))
    return [w.numpy() - b for w, b in zip(model.trainable_weights, before, strict=True)]


def _max_relative_gap(a_list, b_list) -> float:
    """Largest absolute difference over all tensors, relative to b's largest magnitude.

    (Per tensor would divide by ~0 for updates that are zero in exact arithmetic,
    such as attention key biases, which the softmax ignores: their float noise is ~1e-12.)
    """
    a_list = [np.asarray(a, np.float64) for a in a_list]
    b_list = [np.asarray(b, np.float64) for b in b_list]
    gap = max(np.max(np.abs(a - b)) for a, b in zip(a_list, b_list, strict=True))
    return gap / max(np.max(np.abs(b)) for b in b_list)


@pytest.mark.parametrize("xla", [False, True])
def test_accumulated_batches_give_the_update_of_one_big_batch(xla):
    batch = _batch(12)
    task, whole = _model(xla=xla)
    _, micro = _model(xla=xla, accumulate_steps=3)
    micro.set_weights(whole.get_weights())
    update_whole = _update(whole, _keras_batches(task, batch, 1))
    update_micro = _update(micro, _keras_batches(task, batch, 3))
    assert max(np.max(np.abs(u)) for u in update_whole) > 0
    assert _max_relative_gap(update_micro, update_whole) < TOLERANCE
    assert int(micro.optimizer.iterations.numpy()) == int(whole.optimizer.iterations.numpy()) == 1


def test_accumulation_splits_dict_inputs_of_the_masked_lm():
    """MLM inputs are a dict (token ids, mask positions) with per-position weights."""
    task, whole = _model(MaskedLM, xla=False)
    _, micro = _model(MaskedLM, xla=False, accumulate_steps=2)
    micro.set_weights(whole.get_weights())
    x, _, w = _batch(8)
    [masked] = _keras_batches(task, (x, x, w), 1)
    halves = [tf.nest.map_structure(lambda t, i=i: t[i * 4 : (i + 1) * 4], masked) for i in (0, 1)]
    update_whole = _update(whole, [masked])
    update_micro = _update(micro, halves)
    assert _max_relative_gap(update_micro, update_whole) < TOLERANCE


def test_the_xla_step_gives_the_update_of_the_plain_step():
    task, plain = _model(xla=False)
    _, compiled = _model(xla=True)
    compiled.set_weights(plain.get_weights())
    batches = _keras_batches(task, _batch(8, seed=1), 1)
    assert _max_relative_gap(_update(compiled, batches), _update(plain, batches)) < TOLERANCE


def test_blocks_as_xla_segments_give_the_update_of_the_plain_step():
    """bench/overlap.py's cut: each block's forward and backward its own XLA computation."""
    from bench.overlap import segment_blocks

    task, plain = _model(xla=False)
    _, segmented = _model(xla=False)
    segmented.set_weights(plain.get_weights())
    assert segment_blocks(segmented, [True]) == MODEL.n_layers
    batches = _keras_batches(task, _batch(8, seed=2), 1)
    assert _max_relative_gap(_update(segmented, batches), _update(plain, batches)) < TOLERANCE
    blocks = [layer for layer in segmented._flatten_layers() if "call" in vars(layer)]
    compiled = [block.call.__kwdefaults__["_compiled"] for block in blocks]
    assert len(compiled) == MODEL.n_layers
    assert all(f.experimental_get_tracing_count() > 0 for f in compiled)  # the segments ran


def test_mixed_bfloat16_trains_with_float32_variables():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        task, model = _model(lr=0.1, xla=True, precision="mixed_bfloat16")
        batches = _keras_batches(task, _batch(8), 1) * 6
        model.make_train_function()
        losses = [
            float(model.train_function(iter(tf.data.Dataset.from_tensors(b)))["loss"])
            for b in batches
        ]
        model.reset_metrics()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    assert np.isfinite(losses[-1]) and losses[-1] < losses[0]  # it learns the repeated batch
