"""BERT-style pretraining: predict the 15% of tokens that were selected for masking.

keras-hub's MaskedLMMaskGenerator selects the positions (80% become [MASK],
10% a random token, 10% stay) inside the tf.data pipeline. Evaluated by loss,
perplexity and accuracy on the masked positions.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf

from data.prepare import BOS_ID, PAD_ID, Prepared
from models.losses import token_stats
from models.tasks.base import model_inputs
from models.tasks.language_model import LanguageModel
from utils.config import Config
from utils.metrics import lm_metrics

MASK_ID = BOS_ID  # <s> never occurs in the encoded text: it serves as [MASK]


class MaskedLM(LanguageModel):
    """Masked-LM pretraining of a bidirectional encoder (models/encoder.py)."""

    name = "mlm"

    def __init__(self, config: Config, prepared: Prepared | None = None):
        super().__init__(config, prepared)
        self._masker = None

    def masker(self):
        import keras_hub

        if self._masker is None:
            seq_len, rate = self.config.model.seq_len, self.config.train.mask_rate
            self._masker = keras_hub.layers.MaskedLMMaskGenerator(
                vocabulary_size=self.prepared.vocab_size,
                mask_selection_rate=rate,
                mask_token_id=MASK_ID,
                mask_selection_length=max(1, math.ceil(seq_len * rate * 1.5)),
                unselectable_token_ids=[PAD_ID],
            )
        return self._masker

    def transform(self, dataset: tf.data.Dataset, training: bool) -> tf.data.Dataset:
        masker = self.masker()

        def mask(x, _y, w):
            out = masker(x)
            inputs = {"token_ids": out["token_ids"], "mask_positions": out["mask_positions"]}
            return inputs, out["mask_ids"], out["mask_weights"] * tf.expand_dims(w, -1)

        return dataset.map(mask, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def fit_dataset(self, dataset: tf.data.Dataset, training: bool) -> tf.data.Dataset:
        def features(inputs, targets, weights):
            x = {**model_inputs(inputs["token_ids"]), "mask_positions": inputs["mask_positions"]}
            return x, targets, weights

        return self.transform(dataset, training).map(features, num_parallel_calls=tf.data.AUTOTUNE)

    def compile_args(self) -> dict[str, Any]:
        """Cross-entropy on the masked positions; accuracy and perplexity over them only."""
        import keras_hub

        return {
            "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "weighted_metrics": [
                keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                keras_hub.metrics.Perplexity(from_logits=True, name="perplexity"),
            ],
        }

    def build_model(self) -> keras.Model:
        from models.encoder import build_backbone, build_masked_lm

        return build_masked_lm(build_backbone(self.config.model, self.prepared.vocab_size))

    def stats(self, model, inputs, targets, weights, training: bool) -> dict:
        features = {**model_inputs(inputs["token_ids"]), "mask_positions": inputs["mask_positions"]}
        logits = model(features, training=training)  # (B, P, V)
        stats = token_stats(targets, logits, weights, pad_id=-1)  # every selected position counts
        return {**stats, "loss_weight": stats["count"]}

    def metrics(self, totals: dict[str, Any]) -> dict[str, float]:
        """Loss (mean over the masked tokens), perplexity and accuracy."""
        return lm_metrics(totals)
