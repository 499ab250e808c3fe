"""Keras models built from keras-hub layers, their losses and metrics.

Importing this package makes the gradient of a matmul with a broadcast
weight (keras-hub's attention projections) one product instead of
TensorFlow's batched products and sum (models/matmul_grad.py): the same
result with less work on the CPU under XLA (docs/performance.md).
`--model.dropout_masks=hash` also switches Keras's dropout to masks from a
counter hash that XLA fuses (models/dropout.py).
"""

import utils  # noqa: F401  (TensorFlow's CPU defaults, before TensorFlow is imported)
from models import matmul_grad as _matmul_grad

_matmul_grad.install()
