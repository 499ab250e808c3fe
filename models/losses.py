"""Padding-aware token loss and accuracy, returned as sums so averages stay exact.

Returning (sum, count) rather than a mean lets a caller add them over steps
and over ranks and divide once: the mean over the union of everything seen,
not a mean of means (which is wrong when shards or batches are unequal).
"""

from __future__ import annotations

import keras
from keras import ops


def token_mask(targets, weights, pad_id: int = 0):
    """1.0 where a target counts: its weight is 1 and it is not padding.

    `weights` are per row (B,), 0 for rows that only pad a batch, or per
    target (B, T).
    """
    if len(weights.shape) < len(targets.shape):
        weights = ops.expand_dims(weights, -1)
    return ops.cast(ops.not_equal(targets, pad_id), "float32") * weights


def token_stats(targets, logits, row_weights, pad_id: int = 0) -> dict:
    """Summed cross-entropy, correct predictions and counted tokens.

    Args:
        targets: int (B, T) next-token ids.
        logits: float (B, T, V).
        row_weights: float (B,), 0 for padding rows added to fill a batch.
        pad_id: target id that never counts.

    Returns:
        {"loss_sum", "correct", "count"}: float32 scalars.
    """
    mask = token_mask(targets, row_weights, pad_id)
    xent = keras.losses.sparse_categorical_crossentropy(
        targets, ops.cast(logits, "float32"), from_logits=True
    )
    correct = ops.cast(
        ops.equal(ops.argmax(logits, axis=-1), ops.cast(targets, "int32")), "float32"
    )
    return {
        "loss_sum": ops.sum(xent * mask),
        "correct": ops.sum(correct * mask),
        "count": ops.sum(mask),
    }


def token_class_stats(targets, logits, row_weights, vocabulary_size: int, pad_id: int = 0) -> dict:
    """Per-class counts for next-token precision/recall/F1, and top-5 hits.

    Every token id is a class. Returned as sums over the batch, so they add
    up exactly over batches and ranks (utils/metrics.py divides at the end).

    Returns:
        {"tp", "support", "predicted"}: float32 (V,) counts of correct
        predictions, true targets and predictions per class; "top5": float32
        scalar, targets among the 5 highest logits.
    """
    mask = token_mask(targets, row_weights, pad_id)
    targets = ops.cast(targets, "int32")
    predictions = ops.cast(ops.argmax(logits, axis=-1), "int32")
    correct = ops.cast(ops.equal(predictions, targets), "float32") * mask

    def counts(values, ids):  # sum of `values` per class id, over every position
        return ops.segment_sum(
            ops.reshape(values, (-1,)), ops.reshape(ids, (-1,)), num_segments=vocabulary_size
        )

    target_logit = ops.take_along_axis(logits, ops.expand_dims(targets, -1), axis=-1)  # (B, T, 1)
    higher = ops.sum(ops.cast(ops.greater(logits, target_logit), "float32"), axis=-1)  # (B, T)
    return {
        "tp": counts(correct, targets),
        "support": counts(mask, targets),
        "predicted": counts(mask, predictions),
        "top5": ops.sum(ops.cast(ops.less(higher, 5.0), "float32") * mask),
    }
