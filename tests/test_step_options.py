"""The training-step options keep their promises (single process).

- gradient accumulation: k micro-batches of B give the update of one batch of k x B;
- the XLA-compiled gradient function gives the gradients of the plain one;
- mixed bfloat16 trains with float32 variables and a float32 loss.

fp16 gradient compression needs two ranks: see test_distributed.py.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.transformer import build_causal_lm
from tasks import MaskedLM, Task
from train import Trainer, build_optimizer
from utils import distributed
from utils.config import Config, ModelConfig, TrainConfig

MODEL = ModelConfig(n_layers=2, n_heads=2, d_model=32, d_ff=64, seq_len=16, dropout=0.0)
VOCAB = 50
TOLERANCE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def world():
    return distributed.init()


def _trainer(task_cls=Task, **overrides) -> Trainer:
    cfg = TrainConfig(
        optimizer="sgd", momentum=0.0, clip_norm=0.0, weight_decay=0.0, warmup_steps=0, **overrides
    )
    task = task_cls(Config(model=MODEL, train=cfg))
    task.prepared = type("Prepared", (), {"vocab_size": VOCAB})()
    keras.utils.set_random_seed(0)
    model = task.build_model() if task_cls is not Task else build_causal_lm(MODEL, VOCAB)
    return Trainer(task, model, build_optimizer(cfg, 0.1, 100), cfg)


def _batch(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.integers(3, VOCAB, (rows, MODEL.seq_len)), tf.int32)
    y = tf.constant(rng.integers(3, VOCAB, (rows, MODEL.seq_len)), tf.int32)
    y = tf.where(tf.constant(rng.random((rows, MODEL.seq_len)) < 0.2), 0, y)  # some padding
    w = np.ones(rows, np.float32)
    w[-1] = 0.0  # a row that only pads the batch: micro-batches hold unequal target counts
    return x, y, tf.constant(w)


def _max_relative_gap(a_list, b_list) -> float:
    """Largest absolute difference over all tensors, relative to b's largest magnitude.

    (Per tensor would divide by ~0 for gradients that are zero in exact arithmetic,
    such as attention key biases, which the softmax ignores: their float noise is ~1e-12.)
    """
    a_list = [np.asarray(a, np.float64) for a in a_list]
    b_list = [np.asarray(b, np.float64) for b in b_list]
    gap = max(np.max(np.abs(a - b)) for a, b in zip(a_list, b_list, strict=True))
    return gap / max(np.max(np.abs(b)) for b in b_list)


@pytest.mark.parametrize("xla", [False, True])
def test_accumulated_micro_batches_give_the_update_of_one_big_batch(xla):
    batch = _batch(12)
    whole, micro = _trainer(xla=xla), _trainer(xla=xla, accumulate_steps=3)
    micro.model.set_weights(whole.model.get_weights())

    grads_whole, stats_whole, _ = whole._accumulated_gradients(*batch)
    grads_micro, stats_micro, _ = micro._accumulated_gradients(*batch)
    assert _max_relative_gap(grads_micro, grads_whole) < TOLERANCE
    assert float(stats_micro["count"]) == float(stats_whole["count"])

    before = whole.model.get_weights()
    whole.train_step(*batch)
    micro.train_step(*batch)
    update_whole = [a - b for a, b in zip(whole.model.get_weights(), before, strict=True)]
    update_micro = [a - b for a, b in zip(micro.model.get_weights(), before, strict=True)]
    assert _max_relative_gap(update_micro, update_whole) < TOLERANCE


def test_accumulation_splits_dict_inputs_of_the_masked_lm():
    """MLM inputs are a dict (token ids, mask positions): they are split the same way."""
    whole, micro = _trainer(MaskedLM, xla=False), _trainer(MaskedLM, xla=False, accumulate_steps=2)
    micro.model.set_weights(whole.model.get_weights())
    x, _, w = _batch(8)
    masked = whole.task.transform(tf.data.Dataset.from_tensors((x, x, w)), training=True)
    batch = next(iter(masked))
    grads_whole, _, _ = whole._accumulated_gradients(*batch)
    grads_micro, _, _ = micro._accumulated_gradients(*batch)
    assert _max_relative_gap(grads_micro, grads_whole) < TOLERANCE


def test_xla_gradients_equal_the_plain_gradients():
    plain, compiled = _trainer(xla=False), _trainer(xla=True)
    compiled.model.set_weights(plain.model.get_weights())
    batch = _batch(8, seed=1)
    grads_plain, stats_plain = plain._grad_fn(*batch)
    grads_xla, stats_xla = compiled._grad_fn(*batch)
    assert _max_relative_gap(grads_xla, grads_plain) < TOLERANCE
    assert abs(float(stats_xla["loss_sum"]) - float(stats_plain["loss_sum"])) < TOLERANCE * float(
        stats_plain["loss_sum"]
    )


def test_mixed_bfloat16_trains_with_float32_variables():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        trainer = _trainer(xla=True, precision="mixed_bfloat16")
        batch = _batch(8)
        first = float(trainer.train_step(*batch)["loss_sum"])
        for _ in range(5):
            last = float(trainer.train_step(*batch)["loss_sum"])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert all(v.dtype == "float32" for v in trainer.model.trainable_variables)
    assert np.isfinite(last) and last < first  # it learns the repeated batch
