"""Keras metrics the project needs that Keras does not ship in the needed form."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_horovod_lm")
class SparseF1Score(keras.metrics.F1Score):
    """`keras.metrics.F1Score` for integer labels and logits (one-hot labels, argmax predictions).

    Its state (true/false positives and negatives per class) is made of
    counts, so summing it across ranks gives the exact score.

    Args:
        num_classes: int. Number of classes.
        average: "macro", "weighted", "micro" or None, as in F1Score.
    """

    def __init__(self, num_classes: int, average: str | None = "macro", name: str = "f1", **kwargs):
        kwargs.pop("threshold", None)
        super().__init__(average=average, threshold=None, name=name, **kwargs)
        self.num_classes = num_classes

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        return super().update_state(ops.one_hot(labels, self.num_classes), y_pred, sample_weight)

    def get_config(self) -> dict:
        return {**super().get_config(), "num_classes": self.num_classes}
