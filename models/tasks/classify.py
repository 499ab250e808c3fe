"""Text classification with an encoder and a pooled softmax head.

Judged by accuracy, per-class precision/recall/F1, macro and weighted
averages and the confusion matrix (also drawn as a PNG), with a TF-IDF +
logistic-regression baseline (scikit-learn) fitted on the same training
split beside them. Every count is summed across ranks before dividing.
"""

from __future__ import annotations

import pathlib
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from data.load import Documents, Shards, document_row
from data.prepare import Prepared, special_ids
from models.metrics import SparseF1Score
from models.tasks.base import Task, evaluate_totals, format_table, make_eval_fn, model_inputs
from utils import distributed
from utils.errors import UserError
from utils.metrics import classification_metrics


def framing(config, special: dict[str, int | None]) -> dict[str, int | None]:
    """How a document becomes a row: a preset's rows open and close as in its pretraining."""
    if not config.train.init_from_preset:
        return {"pad_id": special["pad"]}
    if special["pad"] is None:
        raise UserError(
            f"--init-from-preset {config.train.init_from_preset}: its tokenizer has no padding "
            "token, which classification needs"
        )
    return {"pad_id": special["pad"], "start_id": special["bos"], "end_id": special["eos"]}


class Classify(Task):
    """Label documents; the model is an encoder with a pooled softmax head."""

    name = "classify"
    monitor, monitor_mode = "val_macro_f1", "max"
    samples = "documents"

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
            **framing(self.config, self.special_ids),
        )

    def fit_dataset(self, dataset: tf.data.Dataset, training: bool) -> tf.data.Dataset:
        """Rows weighted by their class's weight (train.class_weights) in the loss."""
        class_weights = tf.constant(self.class_weights())

        def weighted(x, y, w):
            return model_inputs(x, self.pad_id), y, tf.gather(class_weights, y) * w

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

    def build_model(self) -> keras.Model:
        if self.config.train.init_from_preset:
            from models.presets import build

            return build(self.prepared.tokenizer_path, self.name, len(self.labels))
        from models.encoder import build_backbone, build_classifier

        backbone = build_backbone(self.config.model, self.prepared.vocab_size)
        return build_classifier(backbone, len(self.labels), self.config.model.dropout)

    def class_weights(self) -> np.ndarray:
        if not self.config.train.class_weights:
            return np.ones(len(self.labels), np.float32)
        return np.asarray(self.prepared.meta["class_weights"], np.float32)

    def stats(self, model, inputs, targets, weights, training: bool) -> dict:
        num_classes = len(self.labels)
        logits = ops.cast(model(model_inputs(inputs, self.pad_id), training=training), "float32")
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

    # --- after training --------------------------------------------------------

    def classification_report(self, model, split: str) -> dict[str, Any]:
        """Accuracy, per-class and averaged precision/recall/F1 and the confusion matrix."""
        eval_fn = make_eval_fn(self, model, self.config.train.xla)
        totals = evaluate_totals(self, eval_fn, self.split_shards(split))
        confusion = np.asarray(totals["confusion"])
        return {**self.metrics(totals), **from_confusion(confusion, self.labels)}

    def evaluate_split(self, model, tokenizer, split: str) -> dict[str, Any]:
        results = self.classification_report(model, split)
        if distributed.is_chief():
            balanced = self.config.train.class_weights
            results["baseline_tfidf"] = tfidf_baseline(self.prepared, self.labels, split, balanced)
        return results

    def report(self, results: dict[str, Any], run_dir) -> None:
        """The table, the per-class table beside the baseline, and confusion_<split>.png."""
        from utils.plots import plot_confusion

        split = next(iter(results)).split("_", 1)[0]
        print(format_table(results), flush=True)
        print(format_classification(results, split), flush=True)
        png = run_dir.path / f"confusion_{split}.png"
        confusion = results[f"{split}_confusion_matrix"]
        plot_confusion(confusion, self.labels, png, f"{self.name}: {split} split")
        print(f"confusion matrix: {png}")
        run_dir.merge_metrics(results)

    def quality(self, model, split: str) -> dict[str, float]:
        m = self.classification_report(model, split)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    # --- using a trained run -----------------------------------------------------

    def predict(
        self, run, texts: list[str], batch_size: int = 64
    ) -> list[tuple[str, float, dict[str, float]]]:
        """(label, its probability, every probability) per text.

        Texts are cleaned as in preparation and cut to the run's context length.
        """
        from data.clean import clean_text

        lowercase = run.config.data.lowercase
        frame = framing(run.config, special_ids(run.tokenizer))
        results = []
        for start in range(0, len(texts), batch_size):
            batch = [clean_text(t, lowercase) for t in texts[start : start + batch_size]]
            rows = np.stack(
                [document_row(ids, run.seq_len, **frame) for ids in run.tokenizer.tokenize(batch)]
            )
            inputs = model_inputs(ops.convert_to_tensor(rows), frame["pad_id"])
            logits = run.model(inputs, training=False)
            probabilities = ops.convert_to_numpy(ops.softmax(logits, axis=-1))
            for p in probabilities:
                best = int(np.argmax(p))
                every = dict(zip(run.labels, map(float, p), strict=True))
                results.append((run.labels[best], float(p[best]), every))
        return results

    def predict_file(
        self, run, path: str, out: str | None = None, text_column: str | None = None
    ) -> pathlib.Path:
        """Classify every record of a .jsonl/.csv file; write text, label, probability and p_<class>.

        The output format follows `out`'s extension (.csv or .jsonl; default
        <path>.predictions.jsonl), written atomically.
        """
        import csv
        import io
        import json

        from data.sources import RecordFile, open_source
        from utils.io import atomic_write_text

        column = text_column or run.config.data.text_column
        source = open_source(path, "auto", column)
        if not isinstance(source, RecordFile):
            raise UserError(f"{path}: predict --data takes a .jsonl or .csv file")
        texts = [doc.text for doc in source.documents()]
        if not texts:
            raise UserError(f"{path}: no records to classify")
        rows = []
        for text, (label, probability, every) in zip(texts, self.predict(run, texts), strict=True):
            rows.append(
                {
                    "text": text,
                    "label": label,
                    "probability": round(probability, 6),
                    **{f"p_{k}": round(v, 6) for k, v in every.items()},
                }
            )
        target = pathlib.Path(out) if out else pathlib.Path(path).with_suffix(".predictions.jsonl")
        if target.suffix.lower() == ".csv":
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            atomic_write_text(target, buf.getvalue())
        elif target.suffix.lower() in (".jsonl", ".ndjson"):
            atomic_write_text(target, "".join(json.dumps(r) + "\n" for r in rows))
        else:
            raise UserError(f"--out {out}: write predictions to a .csv or .jsonl file")
        return target


def from_confusion(confusion: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """The classification core's figures, per class by name, from a confusion matrix."""
    cls = classification_metrics(np.diag(confusion), confusion.sum(1), confusion.sum(0))
    out = {k: v for k, v in cls.items() if k not in ("per_class", "classes_present")}
    out["per_class"] = {
        label: {
            name: float(cls["per_class"][name][i])
            for name in ("precision", "recall", "f1", "support")
        }
        for i, label in enumerate(labels)
    }
    out["confusion_matrix"] = confusion.astype(int).tolist()
    return out


def tfidf_baseline(
    prepared, labels: list[str], split: str, balanced: bool = True
) -> dict[str, Any]:
    """TF-IDF (word 1-2 grams) + logistic regression, fit on the training split, scored on `split`."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from data.labeled import texts
    from utils.metrics import confusion_counts

    train_x, train_y = texts(prepared, "train")
    x, y = texts(prepared, split)
    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
        LogisticRegression(max_iter=2000, C=10.0, class_weight="balanced" if balanced else None),
    )
    model.fit(train_x, train_y)
    index = {label: i for i, label in enumerate(labels)}
    confusion = confusion_counts(
        np.array([index[v] for v in y]), np.array([index[v] for v in model.predict(x)]), len(labels)
    )
    return from_confusion(confusion, labels)


def format_classification(results: dict[str, Any], split: str) -> str:
    """Per-class precision/recall/F1 and averages, the model beside the TF-IDF baseline."""
    model, baseline = results, results.get(f"{split}_baseline_tfidf", {})
    per_class, base_per_class = model[f"{split}_per_class"], baseline.get("per_class", {})
    lines = [
        f"{'class':<20}{'support':>8}   {'precision':>9} {'recall':>7} {'f1':>7}   "
        f"{'baseline p':>10} {'r':>6} {'f1':>6}"
    ]
    for label, m in per_class.items():
        b = base_per_class.get(label, {})
        lines.append(
            f"{label:<20}{m['support']:>8.0f}   {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>7.3f}   "
            f"{b.get('precision', float('nan')):>10.3f} {b.get('recall', float('nan')):>6.3f} "
            f"{b.get('f1', float('nan')):>6.3f}"
        )
    for avg in ("macro", "weighted"):
        lines.append(
            f"{avg + ' avg':<28}   {model[f'{split}_{avg}_precision']:>9.3f} "
            f"{model[f'{split}_{avg}_recall']:>7.3f} {model[f'{split}_{avg}_f1']:>7.3f}   "
            f"{baseline.get(f'{avg}_precision', float('nan')):>10.3f} "
            f"{baseline.get(f'{avg}_recall', float('nan')):>6.3f} {baseline.get(f'{avg}_f1', float('nan')):>6.3f}"
        )
    lines.append(
        f"{'accuracy':<28}   {model[f'{split}_accuracy']:>27.3f}   {baseline.get('accuracy', float('nan')):>24.3f}"
    )
    return "\n".join(lines)
