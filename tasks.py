"""What is learned: causal LM, masked LM (BERT-style pretraining), text classification.

A task ties the data, the model and the loss together for the training loop
(train.py), which knows nothing task-specific:

- `prepare()`: the prepared data (a token stream, or labelled documents);
- `shards(split)`: this rank's samples of a split (data/load.py);
- `transform(dataset)`: per-batch preprocessing inside tf.data (MLM masking);
- `build_model()`: a Keras model, and `compile_args()`: its loss and metrics
  for `model.compile`; `fit_dataset(dataset)`: batches as `model.fit` takes them;
- `stats(model, inputs, targets, weights)`: summed loss and counts of a batch,
  so that averages stay exact over batches and ranks (evaluate.py);
- `metrics(totals)`: the figures those sums give (loss, accuracy, ...).

Every batch of data/load.py is (inputs, targets, weights): weights are 0 for
rows that only pad a batch, and mark which targets count.

Training losses are Keras's own, with its default reduction (the sum over
the batch divided by its number of targets, padding included): the gradient
of k batches of B rows then averages exactly to the gradient of one batch of
k x B, so accumulation and data parallelism are exact.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from data.load import Documents, Shards, Windows
from data.prepare import BOS_ID, PAD_ID, Prepared
from models.losses import token_stats
from models.metrics import SparseF1Score
from utils import distributed
from utils.config import Config
from utils.errors import UserError
from utils.metrics import classification_metrics, lm_metrics

MASK_ID = BOS_ID  # <s> never occurs in the encoded text: it serves as [MASK]


def model_inputs(token_ids) -> dict:
    """The model's input dict for a batch of token ids (padding is id 0)."""
    return {
        "token_ids": token_ids,
        "padding_mask": ops.cast(ops.not_equal(token_ids, PAD_ID), "int32"),
    }


class Task:
    """Base: causal language modelling (GPT-style next-token prediction)."""

    name = "causal_lm"
    monitor, monitor_mode = "val_loss", "min"  # early stopping and best-weights

    def __init__(self, config: Config, prepared: Prepared | None = None):
        self.config, self.prepared = config, prepared

    # --- data ----------------------------------------------------------------

    def prepare(self, progress: bool, log, tokenizer=None) -> Prepared:
        from data.prepare import prepare

        return prepare(self.config.data, progress=progress, log=log, tokenizer=tokenizer)

    def shards(self, split: str) -> Shards:
        return Windows(
            self.prepared.tokens(split),
            self.config.model.seq_len,
            self.rows_per_step(split),
            distributed.data_rank(),
            distributed.data_size(),
        )

    def rows_per_step(self, split: str) -> int:
        """Rows this rank reads per step: a training step takes `accumulate_steps`
        micro-batches of `batch_size` at once (train.py splits them); evaluation one."""
        t = self.config.train
        return t.batch_size * (t.accumulate_steps if split == "train" else 1)

    def transform(self, dataset: tf.data.Dataset, training: bool) -> tf.data.Dataset:
        return dataset

    def fit_dataset(self, dataset: tf.data.Dataset, training: bool) -> tf.data.Dataset:
        """(inputs, targets[, sample weights]) batches for `model.fit`/`evaluate`."""
        return self.transform(dataset, training).map(
            lambda x, y, w: (model_inputs(x), y), num_parallel_calls=tf.data.AUTOTUNE
        )

    def compile_args(self) -> dict[str, Any]:
        """Loss and metrics for `model.compile`: token cross-entropy and accuracy."""
        return {
            "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "metrics": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        }

    def epoch_figures(self, logs: dict[str, float]) -> dict[str, float]:
        """Figures derived from an epoch's logs: perplexity = exp(mean cross-entropy per token)."""
        return {
            f"{prefix}perplexity": math.exp(min(logs[f"{prefix}loss"], 700.0))
            for prefix in ("", "val_")
            if f"{prefix}loss" in logs
        }

    def check_sizes(self) -> None:
        """UserError when a split is too small for seq_len and the global batch."""
        seq_len = self.config.model.seq_len
        for split in ("train", "val", "test"):
            n_tokens = self.prepared.meta["tokens"][split]
            if n_tokens < seq_len + 1:
                raise UserError(
                    f"model.seq_len={seq_len} is longer than the {split} split ({n_tokens} tokens); "
                    "lower model.seq_len or add text"
                )
        self._check_train_batches(f"windows of {seq_len + 1} tokens")

    def _check_train_batches(self, what: str) -> None:
        train = self.shards("train")
        if train.steps_per_epoch == 0:
            raise UserError(
                f"the train split holds {train.num_samples} {what}, fewer than one global batch "
                f"(train.batch_size x train.accumulate_steps = {train.batch_size} x {train.world} ranks); "
                "lower train.batch_size"
                + (" or model.seq_len" if self.name != "classify" else "")
                + ", or add data"
            )

    # --- model and loss --------------------------------------------------------

    def build_model(self) -> keras.Model:
        from models.transformer import build_causal_lm

        return build_causal_lm(self.config.model, self.prepared.vocab_size)

    def stats(self, model, inputs, targets, weights, training: bool) -> dict:
        logits = model(model_inputs(inputs), training=training)  # (B, T, V)
        stats = token_stats(targets, logits, weights, PAD_ID)
        return {**stats, "loss_weight": stats["count"]}

    def metrics(self, totals: dict[str, Any]) -> dict[str, float]:
        return lm_metrics(totals)


class MaskedLM(Task):
    """BERT-style pretraining: predict the 15% of tokens that were selected for masking.

    keras-hub's MaskedLMMaskGenerator selects the positions (80% become
    [MASK], 10% a random token, 10% stay) inside the tf.data pipeline.
    """

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

    def epoch_figures(self, logs: dict[str, float]) -> dict[str, float]:
        return {}  # perplexity is a metric (the loss is over every mask slot, padding included)

    def build_model(self) -> keras.Model:
        from models.encoder import build_backbone, build_masked_lm

        return build_masked_lm(build_backbone(self.config.model, self.prepared.vocab_size))

    def stats(self, model, inputs, targets, weights, training: bool) -> dict:
        features = {**model_inputs(inputs["token_ids"]), "mask_positions": inputs["mask_positions"]}
        logits = model(features, training=training)  # (B, P, V)
        stats = token_stats(targets, logits, weights, pad_id=-1)  # every selected position counts
        return {**stats, "loss_weight": stats["count"]}


class Classify(Task):
    """Text classification with an encoder and a pooled softmax head."""

    name = "classify"
    monitor, monitor_mode = "val_macro_f1", "max"

    def prepare(self, progress: bool, log, tokenizer=None) -> Prepared:
        from data.labeled import prepare_labeled

        return prepare_labeled(self.config.data, progress=progress, log=log, tokenizer=tokenizer)

    @property
    def labels(self) -> list[str]:
        return list(self.prepared.meta["labels"])

    def shards(self, split: str) -> Shards:
        from data.labeled import documents

        ids, offsets, labels = documents(self.prepared, split)
        return Documents(
            ids,
            offsets,
            labels,
            self.config.model.seq_len,
            self.rows_per_step(split),
            distributed.data_rank(),
            distributed.data_size(),
        )

    def check_sizes(self) -> None:
        self._check_train_batches("documents")

    def fit_dataset(self, dataset: tf.data.Dataset, training: bool) -> tf.data.Dataset:
        """Rows weighted by their class's weight (train.class_weights) in the loss."""
        class_weights = tf.constant(self.class_weights())

        def weighted(x, y, w):
            return model_inputs(x), y, tf.gather(class_weights, y) * w

        return self.transform(dataset, training).map(weighted, num_parallel_calls=tf.data.AUTOTUNE)

    def compile_args(self) -> dict[str, Any]:
        """Class-weighted cross-entropy; accuracy and macro-F1 count every document once."""
        return {
            "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "metrics": [
                keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                SparseF1Score(len(self.labels), average="macro", name="macro_f1"),
            ],
        }

    def epoch_figures(self, logs: dict[str, float]) -> dict[str, float]:
        return {}

    def build_model(self) -> keras.Model:
        from models.encoder import build_backbone, build_classifier

        backbone = build_backbone(self.config.model, self.prepared.vocab_size)
        return build_classifier(backbone, len(self.labels), self.config.model.dropout)

    def class_weights(self) -> np.ndarray:
        if not self.config.train.class_weights:
            return np.ones(len(self.labels), np.float32)
        return np.asarray(self.prepared.meta["class_weights"], np.float32)

    def stats(self, model, inputs, targets, weights, training: bool) -> dict:
        num_classes = len(self.labels)
        logits = ops.cast(model(model_inputs(inputs), training=training), "float32")  # (B, C)
        targets = ops.cast(targets, "int32")
        xent = keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
        weighted = ops.take(ops.convert_to_tensor(self.class_weights()), targets) * weights
        predictions = ops.cast(ops.argmax(logits, axis=-1), "int32")
        confusion = ops.segment_sum(
            weights, targets * num_classes + predictions, num_segments=num_classes**2
        )
        return {
            "loss_sum": ops.sum(xent * weighted),
            "loss_weight": ops.sum(weighted),
            "correct": ops.sum(ops.cast(ops.equal(predictions, targets), "float32") * weights),
            "count": ops.sum(weights),
            "confusion": ops.reshape(confusion, (num_classes, num_classes)),
        }

    def metrics(self, totals: dict[str, Any]) -> dict[str, float]:
        if totals.get("count", 0) <= 0:
            return {}
        confusion = np.asarray(totals["confusion"])
        cls = classification_metrics(np.diag(confusion), confusion.sum(1), confusion.sum(0))
        return {
            "loss": totals["loss_sum"] / max(totals["loss_weight"], 1e-12),
            "accuracy": cls["accuracy"],
            "macro_f1": cls["macro_f1"],
            "weighted_f1": cls["weighted_f1"],
            "examples": totals["count"],
        }


TASK_CLASSES = {cls.name: cls for cls in (Task, MaskedLM, Classify)}


def make_task(config: Config, prepared: Prepared | None = None) -> Task:
    return TASK_CLASSES[config.task](config, prepared)
