"""The counter-hash dropout (models/dropout.py) and the one-reduction global-norm clip."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from models import dropout
from utils.distributed.optimizer import clip_by_global_norm


@pytest.fixture(autouse=True)
def hash_masks():
    dropout.use("hash")
    yield
    dropout.use("keras")


def _keep(shape, seed, rate):
    return dropout.keep_mask(tf.constant(shape), tf.constant(seed, tf.int32), rate).numpy()


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_keep_rate_and_independence(rate):
    keep = _keep([64, 128, 128], [3, 7], rate).astype(np.float64).ravel()
    n = keep.size
    assert abs(keep.mean() - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / n)
    # Neighbouring elements and neighbouring seeds are uncorrelated.
    assert abs(np.corrcoef(keep[:-1], keep[1:])[0, 1]) < 0.01
    other = _keep([64, 128, 128], [3, 8], rate).astype(np.float64).ravel()
    assert abs(np.corrcoef(keep, other)[0, 1]) < 0.01
    swapped = _keep([64, 128, 128], [7, 3], rate).astype(np.float64).ravel()
    assert abs(np.corrcoef(keep, swapped)[0, 1]) < 0.01


def test_same_seed_same_mask_with_and_without_xla():
    x = tf.ones([8, 64, 32])
    eager = dropout.dropout(x, 0.25, seed=11).numpy()
    compiled = tf.function(lambda x: dropout.dropout(x, 0.25, seed=11), jit_compile=True)(x)
    np.testing.assert_array_equal(eager, compiled.numpy())
    assert set(np.unique(eager)) == {0.0, np.float32(1 / 0.75)}


def test_keras_dropout_layer_uses_it_with_fresh_masks_and_its_gradient():
    assert keras.src.backend.random.dropout is dropout.dropout
    layer = keras.layers.Dropout(0.5, seed=1)
    x = tf.random.normal([16, 64])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        total = tf.reduce_sum(y)
    grad = tape.gradient(total, x).numpy()
    kept = y.numpy() != 0
    np.testing.assert_allclose(grad, np.where(kept, 2.0, 0.0))  # 1 / (1 - rate) where kept
    second = layer(x, training=True).numpy() != 0  # the seed generator moved on
    assert (kept != second).mean() > 0.3
    np.testing.assert_array_equal(layer(x, training=False).numpy(), x.numpy())


def test_noise_shape_broadcasts_one_mask():
    x = tf.ones([4, 10, 6])
    y = dropout.dropout(x, 0.5, noise_shape=[4, 1, 6], seed=3).numpy()
    assert (y == y[:, :1, :]).all()


def test_model_config_chooses_the_masks():
    from models.transformer import build_causal_lm
    from utils.config import ModelConfig

    build_causal_lm(ModelConfig(n_layers=1, d_model=8, n_heads=2, d_ff=8, seq_len=4), 10)
    assert keras.src.backend.random.dropout is not dropout.dropout  # the default: Keras's
    build_causal_lm(ModelConfig(n_layers=1, d_model=8, n_heads=2, d_ff=8, dropout_masks="hash"), 10)
    assert keras.src.backend.random.dropout is dropout.dropout
    with pytest.raises(ValueError, match="dropout masks"):
        dropout.use("philox")


def test_global_norm_clip_matches_keras():
    from keras.src.optimizers.base_optimizer import clip_by_global_norm as keras_clip

    grads = [tf.random.normal([33, 7]) * 3.0, None, tf.random.normal([5])]
    for clip in (0.5, 1e6):
        ours, theirs = clip_by_global_norm(grads, clip), keras_clip(grads, clip)
        assert ours[1] is None
        for a, b in zip([ours[0], ours[2]], [theirs[0], theirs[2]], strict=True):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
    nan = clip_by_global_norm([tf.constant([np.inf, 1.0])], 1.0)[0].numpy()
    assert np.isnan(nan).all()  # like Keras: a non-finite norm makes the step non-finite
