"""Keras models built from keras-hub layers, their losses and metrics.

Importing this package makes the gradient of a matmul with a broadcast
weight (keras-hub's attention projections) one product instead of
TensorFlow's batched products and sum (models/matmul_grad.py): the same
result with less work on the CPU under XLA (docs/performance.md).
`--model.dropout_masks=hash` also switches Keras's dropout to masks from a
counter hash that XLA fuses (models/dropout.py).
"""

from utils.tf_env import import_tensorflow  # TensorFlow's CPU defaults come with `utils`

import_tensorflow()  # quietly, before any model module imports it

from models import matmul_grad as _matmul_grad  # noqa: E402

_matmul_grad.install()
