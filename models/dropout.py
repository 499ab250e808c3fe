"""Dropout masks from a counter hash, for the TensorFlow backend under XLA on CPU.

Keras's dropout draws its mask with `tf.random.stateless_uniform`. Compiled
by XLA for the CPU, that random-bit generator (Philox) costs about 11 ms per
million elements on a 2-core AVX2 machine, 60x the hash below; with dropout
0.1 it made the default job's step a quarter slower (bench/results/).

Here the mask of element i is `hash(i, seed) >= rate * 2^32`, where the hash
is two keyed rounds of the lowbias32 integer mixer (Wellons'). It is
elementwise integer arithmetic, so XLA fuses it into the op that applies
the mask. Keras still draws a fresh `seed` per call from the layer's
SeedGenerator, so masks change every step, are reproducible from the seed,
and resume exactly from a checkpoint. The statistics a dropout mask needs
(keep rate, no correlation between elements or between seeds) are tested
in tests/test_dropout.py.

`use("hash")` routes `keras.layers.Dropout` (and so keras-hub's Transformer
layers, whose attention and feed-forward dropout are Keras Dropout layers)
through `dropout` below, on the TensorFlow backend only; `use("keras")`
restores Keras's own. The model builders call it with the run's
`model.dropout_masks`. It is not the default: in the default job (4 ranks,
4 epochs) the hash masks ended at test perplexity 179.9 where Keras's ended
at 170.1, and in 2-epoch runs at 287.6 and 288.1 against 281.2 and 268.7;
runs that differ only by float rounding also moved by several percent, so
the gap is not settled (docs/performance.md).
"""

from __future__ import annotations

import tensorflow as tf
from keras.src.backend.tensorflow import random as tf_random
from keras.src.random.seed_generator import draw_seed

_GOLDEN = 0x9E3779B9


def _mix(h: tf.Tensor) -> tf.Tensor:
    """lowbias32: a bijective 32-bit mixer with low bias (uint32 in, uint32 out)."""
    shift = tf.bitwise.right_shift
    h = tf.bitwise.bitwise_xor(h, shift(h, tf.constant(16, tf.uint32)))
    h = h * tf.constant(0x7FEB352D, tf.uint32)
    h = tf.bitwise.bitwise_xor(h, shift(h, tf.constant(15, tf.uint32)))
    h = h * tf.constant(0x846CA68B, tf.uint32)
    return tf.bitwise.bitwise_xor(h, shift(h, tf.constant(16, tf.uint32)))


def random_bits(shape, seed: tf.Tensor) -> tf.Tensor:
    """uint32 bits of `shape`, a function of each element's index and the int32[2] `seed`."""
    seed = tf.bitcast(tf.cast(seed, tf.int32), tf.uint32)
    key0 = _mix(seed[0] * tf.constant(_GOLDEN, tf.uint32) + tf.constant(1, tf.uint32))
    key1 = _mix(tf.bitwise.bitwise_xor(seed[1], key0))
    index = tf.bitcast(
        tf.reshape(tf.range(tf.reduce_prod(shape), dtype=tf.int32), shape), tf.uint32
    )
    return _mix(_mix(tf.bitwise.bitwise_xor(index, key0)) + key1)


def keep_mask(shape, seed: tf.Tensor, rate: float) -> tf.Tensor:
    """bool mask of `shape`, True with probability 1 - rate (to within 2^-32)."""
    threshold = tf.constant(min(round(rate * 2**32), 2**32 - 1), tf.uint32)
    return random_bits(shape, seed) >= threshold


def dropout(inputs, rate, noise_shape=None, seed=None):
    """Keras's backend `random.dropout`, with the mask from `keep_mask`."""
    if rate == 1.0:
        return tf.zeros_like(inputs)
    if rate == 0.0:
        return inputs
    seed = tf_random._cast_seed(draw_seed(seed))
    inputs = tf.convert_to_tensor(inputs)
    noise_shape = tf_random._get_concrete_noise_shape(inputs, noise_shape)
    keep = keep_mask(noise_shape, seed, float(rate))
    scaled = inputs * tf.cast(1.0 / (1.0 - rate), inputs.dtype)
    return tf.where(keep, scaled, tf.zeros((), inputs.dtype))


_KERAS_DROPOUT = tf_random.dropout
KINDS = ("keras", "hash")


def use(kind: str) -> None:
    """Draw Keras's dropout masks (TensorFlow backend) with `kind`: "keras" (Philox) or "hash"."""
    if kind not in KINDS:
        raise ValueError(f"dropout masks must be one of {KINDS}; got {kind!r}")
    tf_random.dropout = dropout if kind == "hash" else _KERAS_DROPOUT
