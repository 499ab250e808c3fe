"""Metrics from summed counts, so they are exact across steps and ranks.

Per step the model returns sums (summed loss, correct predictions, counted
tokens); `Sums` adds them up; `utils.distributed.allreduce_sums` adds them
across ranks; only then are they divided. An average of per-rank averages
would be wrong whenever ranks see different numbers of tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


class Sums:
    """Running sums of named values (e.g. loss_sum, correct, count)."""

    def __init__(self, initial: Mapping[str, float] | None = None):
        self.values: dict[str, float] = dict(initial or {})

    def add(self, stats: Mapping[str, object]) -> None:
        for key, value in stats.items():
            self.values[key] = self.values.get(key, 0.0) + float(value)


def lm_metrics(totals: Mapping[str, float], prefix: str = "") -> dict[str, float]:
    """Loss (mean cross-entropy per token), perplexity and next-token accuracy.

    Args:
        totals: {"loss_sum", "correct", "count"} summed over everything seen.
        prefix: prepended to each key, e.g. "val_".
    """
    count = totals.get("count", 0.0)
    if count <= 0:
        return {}
    loss = totals["loss_sum"] / count
    return {
        f"{prefix}loss": loss,
        f"{prefix}perplexity": math.exp(min(loss, 700.0)),
        f"{prefix}accuracy": totals["correct"] / count,
        f"{prefix}tokens": count,
    }
