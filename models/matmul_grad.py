"""The gradient of a matmul whose second operand is broadcast, as one product.

Keras's TensorFlow backend computes the einsums of keras-hub's attention
projections (EinsumDense, `abc,cde->abde` and `abcd,cde->abe`) as
`tf.matmul(x, y)` with x of shape (B, T, k) and y of shape (k, n): a batched
matmul with y broadcast over B. TensorFlow's registered gradient then forms
y's gradient batched, B products of (k x T) @ (T x n), and sums them over B:
for the reference model under XLA on a 2-core CPU, 16 such batched kernels
and their sums cost 7.1 ms of a 42 ms step (docs/performance.md). The same
gradient is one product over the flattened batch,

    dy = reshape(x, (-1, k))^T @ reshape(dx_out, (-1, n))

`install()` replaces the registered gradient of BatchMatMulV2/V3 with
`batch_matmul_gradient`, which does that when x has rank 3 or more, y rank
2 and neither is adjointed, and keeps TensorFlow's gradient otherwise
(tests/test_matmul_grad.py checks both against TensorFlow's own).
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops

_OPS = ("BatchMatMulV2", "BatchMatMulV3")
_tensorflow_gradient = None


def batch_matmul_gradient(op, grad):
    """(dx, dy) of `matmul(x, y)`; y's as one 2-D product when only x has batch dimensions."""
    x, y = op.inputs[0], op.inputs[1]
    if (
        op.get_attr("adj_x")
        or op.get_attr("adj_y")
        or x.shape.rank is None
        or x.shape.rank < 3
        or y.shape.rank != 2
    ):
        return _tensorflow_gradient(op, grad)
    grad_x = tf.matmul(grad, y, adjoint_b=True)
    rows_x = tf.reshape(x, [-1, tf.shape(x)[-1]])
    rows_grad = tf.reshape(grad, [-1, tf.shape(grad)[-1]])
    grad_y = tf.matmul(rows_x, rows_grad, adjoint_a=True)
    return grad_x, grad_y


def install() -> None:
    """Register `batch_matmul_gradient` for TensorFlow's batched matmul ops; idempotent."""
    global _tensorflow_gradient
    registry = tf_ops._gradient_registry._registry  # private: no public way to override
    for name in _OPS:
        if registry[name]["type"] is not batch_matmul_gradient:
            _tensorflow_gradient = registry[name]["type"]
            registry[name]["type"] = batch_matmul_gradient
