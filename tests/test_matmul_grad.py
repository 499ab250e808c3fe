"""The broadcast-matmul gradient (models/matmul_grad.py) equals TensorFlow's own, eager and XLA."""

from __future__ import annotations

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops

import models  # noqa: F401  (installs the gradient)
from models import matmul_grad


@contextlib.contextmanager
def tensorflow_gradient():
    """TensorFlow's registered batched-matmul gradient, for the block."""
    registry = tf_ops._gradient_registry._registry
    ours = {name: registry[name]["type"] for name in matmul_grad._OPS}
    for name in matmul_grad._OPS:
        registry[name]["type"] = matmul_grad._tensorflow_gradient
    try:
        yield
    finally:
        for name, fn in ours.items():
            registry[name]["type"] = fn


def gradients(fn, x, y, jit: bool):
    @tf.function(jit_compile=jit)
    def grads(x, y):
        with tf.GradientTape() as tape:
            tape.watch([x, y])
            out = fn(x, y)
            loss = tf.reduce_sum(out * tf.sin(out))  # a gradient that is not all ones
        return tape.gradient(loss, [x, y])

    return [g.numpy() for g in grads(x, y)]


CASES = {
    "EinsumDense abc,cde->abde": (
        lambda x, y: keras.ops.einsum("abc,cde->abde", x, y),
        [3, 5, 4],
        [4, 2, 3],
    ),
    "EinsumDense abcd,cde->abe": (
        lambda x, y: keras.ops.einsum("abcd,cde->abe", x, y),
        [3, 5, 2, 3],
        [2, 3, 4],
    ),
    "rank 4 @ rank 2": (tf.matmul, [2, 3, 5, 4], [4, 6]),
    "rank 3 @ rank 3 (TensorFlow's gradient)": (tf.matmul, [3, 5, 4], [3, 4, 2]),
    "adjoint (TensorFlow's gradient)": (
        lambda x, y: tf.matmul(x, y, adjoint_b=True),
        [3, 5, 4],
        [6, 4],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("jit", [False, True])
def test_equals_tensorflows_gradient(case, jit):
    fn, x_shape, y_shape = CASES[case]
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=x_shape), tf.float32)
    y = tf.constant(rng.normal(size=y_shape), tf.float32)
    ours = gradients(fn, x, y, jit)
    with tensorflow_gradient():
        theirs = gradients(fn, x, y, jit)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_installed():
    registry = tf_ops._gradient_registry._registry
    matmul_grad.install()  # idempotent
    for name in matmul_grad._OPS:
        assert registry[name]["type"] is matmul_grad.batch_matmul_gradient
    assert matmul_grad._tensorflow_gradient is not matmul_grad.batch_matmul_gradient
