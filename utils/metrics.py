"""Metrics from summed counts, so they are exact across steps and ranks.

Per batch the model returns sums (summed loss, correct predictions, counted
tokens, per-class true positives...); `Sums` adds them up;
`utils.distributed.allreduce_sums` / `allreduce_array` add them across ranks;
only then are they divided. An average of per-rank averages would be wrong
whenever ranks see different numbers of examples.

`classification_metrics` is the one classification core: the language
model's next-token metrics use it (every token id is a class) and so does
text classification.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


class Sums:
    """Running sums of named values: scalars or numpy arrays (e.g. per-class counts)."""

    def __init__(self, initial: Mapping[str, float] | None = None):
        self.values: dict[str, float] = dict(initial or {})

    def add(self, stats: Mapping[str, object]) -> None:
        for key, value in stats.items():
            value = np.asarray(value, dtype=np.float64)
            value = float(value) if value.ndim == 0 else value
            self.values[key] = self.values[key] + value if key in self.values else value


def lm_metrics(totals: Mapping[str, float], prefix: str = "") -> dict[str, float]:
    """Loss (mean cross-entropy per token), perplexity and next-token accuracy.

    Args:
        totals: {"loss_sum", "correct", "count"} summed over everything seen,
            and optionally "top5" (targets among the 5 highest logits).
        prefix: prepended to each key, e.g. "val_".
    """
    count = totals.get("count", 0.0)
    if count <= 0:
        return {}
    loss = totals["loss_sum"] / count
    out = {
        f"{prefix}loss": loss,
        f"{prefix}perplexity": math.exp(min(loss, 700.0)),
        f"{prefix}accuracy": totals["correct"] / count,
        f"{prefix}tokens": count,
    }
    if "top5" in totals:
        out[f"{prefix}top5_accuracy"] = totals["top5"] / count
    return out


def confusion_counts(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """[num_classes, num_classes] counts: row = true class, column = predicted class."""
    w = np.ones(len(y_true)) if weights is None else np.asarray(weights, dtype=np.float64)
    flat = np.asarray(y_true, np.int64) * num_classes + np.asarray(y_pred, np.int64)
    return np.bincount(flat, weights=w, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def class_counts_from_confusion(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class true positives, support (true count) and predicted count."""
    tp = np.diag(confusion)
    return {"tp": tp, "support": confusion.sum(axis=1), "predicted": confusion.sum(axis=0)}


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (scikit-learn's zero_division=0)."""
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def classification_metrics(tp: np.ndarray, support: np.ndarray, predicted: np.ndarray) -> dict:
    """Accuracy, per-class precision/recall/F1 and their macro and weighted averages.

    From per-class counts (summed over batches and ranks). The averages run
    over the classes that occur among the true or the predicted labels, as
    scikit-learn's `precision_recall_fscore_support` does by default, with
    0 for a 0/0 ratio (`zero_division=0`).

    Args:
        tp: true positives per class.
        support: number of true labels per class (tp + false negatives).
        predicted: number of predictions per class (tp + false positives).

    Returns:
        {"accuracy", "macro_precision", "macro_recall", "macro_f1",
         "weighted_precision", "weighted_recall", "weighted_f1",
         "per_class": {"precision", "recall", "f1", "support"} arrays,
         "classes_present": int}
    """
    tp, support, predicted = (np.asarray(a, dtype=np.float64) for a in (tp, support, predicted))
    precision = _safe_divide(tp, predicted)
    recall = _safe_divide(tp, support)
    f1 = _safe_divide(2 * tp, support + predicted)  # = 2PR/(P+R), and 0 where both are 0
    present = (support + predicted) > 0
    total = support.sum()
    out: dict = {"accuracy": float(tp.sum() / total) if total else 0.0}
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        out[f"macro_{name}"] = float(values[present].mean()) if present.any() else 0.0
        out[f"weighted_{name}"] = float((values * support).sum() / total) if total else 0.0
    out["per_class"] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    out["classes_present"] = int(present.sum())
    return out
