"""utils/metrics.py and the per-class token counts: against hand-computed values and scikit-learn."""

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from models.losses import token_class_stats
from utils.metrics import (
    Sums,
    class_counts_from_confusion,
    classification_metrics,
    confusion_counts,
    lm_metrics,
)


def _metrics(y_true, y_pred, num_classes):
    counts = class_counts_from_confusion(confusion_counts(y_true, y_pred, num_classes))
    return classification_metrics(**counts)


def test_by_hand():
    # classes 0,1,2; class 2 is predicted once but never true
    y_true = [0, 0, 1, 1, 1]
    y_pred = [0, 1, 1, 1, 2]
    m = _metrics(y_true, y_pred, 4)  # class 3 never occurs: not averaged over
    # precision: c0 1/1, c1 2/3, c2 0/1 ; recall: c0 1/2, c1 2/3, c2 0 (no support)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["macro_precision"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert m["macro_recall"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    f1 = [2 * 1 * 0.5 / 1.5, 2 / 3, 0.0]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert m["weighted_f1"] == pytest.approx((f1[0] * 2 + f1[1] * 3) / 5)
    assert m["classes_present"] == 3


@pytest.mark.parametrize("seed", range(5))
def test_matches_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    num_classes = 12
    y_true = rng.integers(0, 8, 400)  # classes 8..11 only ever predicted, or absent
    y_pred = np.where(rng.random(400) < 0.5, y_true, rng.integers(0, 10, 400))
    ours = _metrics(y_true, y_pred, num_classes)
    assert ours["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, average=average, zero_division=0
        )
        assert ours[f"{average}_precision"] == pytest.approx(p)
        assert ours[f"{average}_recall"] == pytest.approx(r)
        assert ours[f"{average}_f1"] == pytest.approx(f)
    np.testing.assert_array_equal(
        confusion_counts(y_true, y_pred, num_classes)[:10, :10],
        confusion_matrix(y_true, y_pred, labels=range(10)),
    )


def test_counts_add_up_over_shards():
    """Summing per-shard counts, then computing, equals computing over the union."""
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    sums = Sums()
    for part in np.array_split(np.arange(300), [17, 150, 151]):  # unequal shards
        sums.add(class_counts_from_confusion(confusion_counts(y_true[part], y_pred[part], 5)))
    assert classification_metrics(**sums.values)["macro_f1"] == pytest.approx(
        _metrics(y_true, y_pred, 5)["macro_f1"]
    )


def test_lm_metrics():
    m = lm_metrics({"loss_sum": 6.0, "correct": 1.0, "count": 4.0, "top5": 3.0}, prefix="val_")
    assert m == {
        "val_loss": 1.5,
        "val_perplexity": pytest.approx(math.exp(1.5)),
        "val_accuracy": 0.25,
        "val_tokens": 4.0,
        "val_top5_accuracy": 0.75,
    }
    assert lm_metrics({"loss_sum": 0.0, "correct": 0.0, "count": 0.0}) == {}


def test_token_class_stats_match_numpy():
    rng = np.random.default_rng(1)
    vocab = 9
    logits = rng.normal(size=(3, 5, vocab)).astype("float32")
    targets = rng.integers(1, vocab, (3, 5))
    targets[0, 4] = 0  # padding target: never counts
    weights = np.array([1.0, 1.0, 0.0], "float32")  # third row is batch padding
    stats = {
        k: np.asarray(v) for k, v in token_class_stats(targets, logits, weights, vocab).items()
    }
    keep = (targets != 0) & (weights[:, None] > 0)
    y, p = targets[keep], logits.argmax(-1)[keep]
    counts = class_counts_from_confusion(confusion_counts(y, p, vocab))
    for key in ("tp", "support", "predicted"):
        np.testing.assert_array_equal(stats[key], counts[key])
    ranks = (logits > np.take_along_axis(logits, targets[..., None], -1)).sum(-1)
    assert stats["top5"] == ((ranks < 5) & keep).sum()
