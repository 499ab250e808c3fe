"""Evaluate a trained run: the numbers users look at after training.

    python evaluate.py --run-dir runs/exp1 [--split test|val|train] [--data PATH]
    horovodrun -np 2 python evaluate.py --run-dir runs/exp1

The same as `python main.py evaluate ...`, which also runs it after training.

- Causal LM: cross-entropy, perplexity, next-token accuracy and top-5
  accuracy, next-token precision/recall/F1 (macro and weighted over the token
  classes that occur), vocabulary coverage (share of the vocabulary predicted
  correctly at least once), and BLEU and ROUGE-L of greedy continuations of
  held-out prompts against the true continuations.
- Masked LM: loss, perplexity and accuracy on the masked positions.
- Classification: accuracy, per-class precision/recall/F1, macro and
  weighted averages, the confusion matrix (also as a PNG), and beside them a
  TF-IDF + logistic-regression baseline (scikit-learn) on the same split.

Exact under Horovod: the split is sharded across ranks, each rank sums counts
(losses, tokens, per-class true positives, supports and predictions, the
confusion matrix), the counts are allreduced, and only the totals are
divided. Rank 0 prints the table and merges it into metrics.json.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import numpy as np

from utils.errors import UserError


def make_eval_fn(task, model, xla: bool):
    """A compiled (inputs, targets, weights) -> sums function (no Horovod op, so XLA is allowed)."""
    import tensorflow as tf

    return tf.function(
        lambda x, y, w: task.stats(model, x, y, w, training=False),
        jit_compile=xla,
        reduce_retracing=True,
    )


def evaluate_totals(task, eval_fn, shards, max_batches: int = 0) -> dict[str, Any]:
    """The task's sums (losses, counts, confusion...) over a split, over batches and ranks."""
    from utils import distributed
    from utils.metrics import Sums

    sums = Sums()
    for x, y, w in task.transform(shards.eval_dataset(max_batches), training=False):
        sums.add({k: v.numpy() for k, v in eval_fn(x, y, w).items()})
    return distributed.allreduce_sums(sums.values)


def evaluate_shards(task, eval_fn, shards, max_batches: int = 0) -> dict[str, float]:
    """Exact metrics over a split: sums over batches and ranks, then divided."""
    return task.metrics(evaluate_totals(task, eval_fn, shards, max_batches))


PROMPT_TOKENS = 32  # held-out prompt length for BLEU/ROUGE-L
CONTINUATION_TOKENS = 16  # generated and reference continuation length
NUM_PROMPTS = 64


def language_model_metrics(task, model, shards, xla: bool = True) -> dict[str, float]:
    """Every count-based metric of a causal LM on this rank's shards, exact across ranks."""
    import tensorflow as tf

    from models.losses import token_class_stats, token_stats
    from tasks import model_inputs
    from utils import distributed
    from utils.metrics import Sums, classification_metrics, lm_metrics

    vocab = task.prepared.vocab_size

    @tf.function(jit_compile=xla, reduce_retracing=True)
    def stats(x, y, w):
        logits = model(model_inputs(x), training=False)
        return {**token_stats(y, logits, w), **token_class_stats(y, logits, w, vocab)}

    sums = Sums()
    for x, y, w in shards.eval_dataset():
        sums.add({k: v.numpy() for k, v in stats(x, y, w).items()})
    totals = distributed.allreduce_sums(sums.values)
    out = lm_metrics(totals)
    if not out:
        return out
    cls = classification_metrics(totals["tp"], totals["support"], totals["predicted"])
    for key in (
        "macro_precision",
        "macro_recall",
        "macro_f1",
        "weighted_precision",
        "weighted_recall",
        "weighted_f1",
    ):
        out[key] = cls[key]
    out["vocabulary_coverage"] = float((totals["tp"] > 0).sum() / vocab)
    out["token_classes_present"] = cls["classes_present"]
    return out


def continuation_scores(
    model, tokenizer, tokens: np.ndarray, seq_len: int, num_prompts: int = NUM_PROMPTS
) -> dict[str, float]:
    """BLEU and ROUGE-L of greedy continuations of held-out prompts (rank 0 computes).

    Prompts are `PROMPT_TOKENS` tokens taken at evenly spaced places of the
    split; each is continued greedily by `CONTINUATION_TOKENS` tokens and
    compared, as text, with the true next tokens.
    """
    import keras_hub

    from inference import generate_ids, make_sampler

    span = PROMPT_TOKENS + CONTINUATION_TOKENS
    if len(tokens) < span:
        return {}
    starts = np.linspace(0, len(tokens) - span, min(num_prompts, len(tokens) // span)).astype(
        np.int64
    )
    rows = np.stack([np.asarray(tokens[s : s + span], dtype=np.int32) for s in starts])
    prompt_len = min(PROMPT_TOKENS, seq_len - 1)
    generated = generate_ids(
        model,
        rows[:, PROMPT_TOKENS - prompt_len : PROMPT_TOKENS],
        CONTINUATION_TOKENS,
        make_sampler("greedy"),
        seq_len,
    )
    references = [tokenizer.detokenize(r[PROMPT_TOKENS:]) for r in rows]
    hypotheses = [tokenizer.detokenize(g) for g in generated]
    bleu = keras_hub.metrics.Bleu()
    if any(h.strip() for h in hypotheses):  # keras-hub divides by the hypotheses' length
        bleu.update_state([[r] for r in references], hypotheses)
    rouge = keras_hub.metrics.RougeL()
    rouge.update_state(references, hypotheses)
    return {
        "bleu": float(bleu.result()),
        "rouge_l_f1": float(rouge.result()["f1_score"]),
        "continuation_prompts": len(rows),
    }


def classification_report(task, model, shards, xla: bool = True) -> dict[str, Any]:
    """Accuracy, per-class and averaged precision/recall/F1 and the confusion matrix, exact across ranks."""
    totals = evaluate_totals(task, make_eval_fn(task, model, xla), shards)
    return {**task.metrics(totals), **from_confusion(np.asarray(totals["confusion"]), task.labels)}


def from_confusion(confusion: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """The classification core's figures, per class by name, from a confusion matrix."""
    from utils.metrics import classification_metrics

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


def evaluate_split(task, model, tokenizer, split: str) -> dict[str, Any]:
    """Every metric for `split`, keys prefixed with the split (rank 0 also computes the extras)."""
    from utils import distributed

    shards = task.shards(split)
    if shards.num_samples == 0:
        what = (
            "documents"
            if task.name == "classify"
            else f"window of {task.config.model.seq_len + 1} tokens"
        )
        raise UserError(f"the {split} split has no {what}: nothing to evaluate")
    xla = task.config.train.xla
    if task.name == "causal_lm":
        results = language_model_metrics(task, model, shards, xla)
        if distributed.is_chief():
            results.update(
                continuation_scores(
                    model, tokenizer, task.prepared.tokens(split), task.config.model.seq_len
                )
            )
        results["unigram_perplexity"] = task.prepared.meta["unigram_perplexity"].get(split)
    elif task.name == "classify":
        results = classification_report(task, model, shards, xla)
        if distributed.is_chief():
            baseline = tfidf_baseline(
                task.prepared, task.labels, split, task.config.train.class_weights
            )
            results["baseline_tfidf"] = baseline
    else:
        results = evaluate_shards(task, make_eval_fn(task, model, xla), shards)
    return {f"{split}_{k}": v for k, v in results.items() if v is not None}


def format_table(results: dict[str, Any]) -> str:
    """A two-column table of the scalar metrics, one per line."""
    scalars = {k: v for k, v in results.items() if isinstance(v, int | float)}
    width = max(map(len, scalars))
    lines = []
    for key, value in scalars.items():
        whole = isinstance(value, int) or key.endswith(("tokens", "examples", "prompts", "present"))
        lines.append(
            f"{key:<{width}}  {value:>12,.0f}" if whole else f"{key:<{width}}  {value:>12,.4f}"
        )
    return "\n".join(lines)


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


def plot_confusion(
    confusion: list[list[int]], labels: list[str], path: pathlib.Path, title: str
) -> None:
    """The confusion matrix as a PNG (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(confusion)
    size = 1.5 + 0.55 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size), constrained_layout=True)
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            str(value),
            ha="center",
            va="center",
            color="white" if value > matrix.max() / 2 else "black",
            fontsize=8,
        )
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def record(results: dict[str, Any], run_dir, task) -> None:
    """Rank 0: print the results, merge them into metrics.json, draw the confusion matrix."""
    split = next(iter(results)).split("_", 1)[0]
    print(format_table(results), flush=True)
    if task.name == "classify":
        print(format_classification(results, split), flush=True)
        png = run_dir.path / f"confusion_{split}.png"
        plot_confusion(
            results[f"{split}_confusion_matrix"], task.labels, png, f"{task.name}: {split} split"
        )
        print(f"confusion matrix: {png}")
    run_dir.merge_metrics(results)


def run_data(task, saved: dict[str, Any], rd, data: str | None):
    """The prepared data to evaluate on: the run's own, or `data` encoded with the run's tokenizer.

    The run's own data is found where training left it or, when that
    directory is gone, prepared again from the saved settings (the same input
    gives the same key; a changed input is an error).
    """
    from data.prepare import load_prepared
    from utils import distributed

    config = task.config
    if not data and pathlib.Path(saved["data"]["dir"]).is_dir():
        return load_prepared(saved["data"]["dir"])
    if data:
        config.data.path, config.data.format = data, "auto"
    tokenizer = rd.tokenizer if data or config.train.init_from else None
    log = distributed.print0 if distributed.is_chief() else (lambda *a, **k: None)
    dirs = distributed.local_chief_runs(
        lambda: str(
            task.prepare(progress=distributed.is_chief(), log=log, tokenizer=tokenizer).dir
        ),
        "prepare_eval",
    )
    prepared = load_prepared(dirs[0])
    if not data and prepared.meta["key"] != saved["data"]["key"]:
        raise UserError(
            f"{rd.path}: the run's data ({config.data.path or 'the built-in corpus'}) has changed "
            "since training; pass --data PATH to evaluate on it anyway"
        )
    if data and task.name == "classify" and prepared.meta["labels"] != saved["data"]["labels"]:
        raise UserError(
            f"{data}: its training-split labels {prepared.meta['labels']} differ from the model's "
            f"{saved['data']['labels']}"
        )
    return prepared


def load_for_evaluation(run_dir: pathlib.Path, data: str | None = None):
    """(the loaded run, its task with data, its RunDir), on every rank: what `run` evaluates."""
    from utils.config import Config, apply_nested
    from utils.run_dir import RunDir

    rd = RunDir(run_dir)
    saved = rd.read_config()
    from utils import distributed

    distributed.init(threads=saved["config"]["train"]["threads"])
    from inference import load_run
    from tasks import make_task

    loaded = load_run(run_dir)
    config = Config()
    apply_nested(config, saved["config"], str(rd.config))
    task = make_task(config)
    task.prepared = run_data(task, saved, rd, data)
    if task.prepared.tokenizer_path.read_bytes() != rd.tokenizer.read_bytes():
        raise UserError(
            f"{run_dir}: tokenizer.model differs from the one of the data in {task.prepared.dir}"
        )
    return loaded, task, rd


def run(run_dir: pathlib.Path, split: str = "test", data: str | None = None) -> dict[str, Any]:
    """`main.py evaluate`: evaluate the run in `run_dir` on a split of its data (or of --data)."""
    from utils import distributed

    loaded, task, rd = load_for_evaluation(run_dir, data)
    results = evaluate_split(task, loaded.model, loaded.tokenizer, split)
    if distributed.is_chief():
        record(results, rd, task)
    return results


def quality(task, model, split: str) -> dict[str, float]:
    """The figures a quantized model is judged by: perplexity and accuracy, or accuracy and macro-F1."""
    shards = task.shards(split)
    xla = task.config.train.xla
    if task.name == "causal_lm":
        m = language_model_metrics(task, model, shards, xla)
        return {"perplexity": m["perplexity"], "accuracy": m["accuracy"]}
    m = classification_report(task, model, shards, xla)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}


def compare_quantized(
    run_dir: pathlib.Path, mode: str, split: str = "test", data: str | None = None
) -> dict[str, Any]:
    """`main.py evaluate --quantize MODE`: float32 and MODE side by side.

    Quality on `split` (every rank, exact under Horovod), the weights' bytes
    in a .weights.h5 file, and the latency of one model call at batch 1 and
    32 (serving/measure.py). Rank 0 prints the table and merges it into the
    run's quantization.json under "<split>_<mode>".
    """
    from serving.measure import (
        copy_model,
        describe_machine,
        format_comparison,
        latency,
        weight_bytes,
    )
    from serving.quantize import quantize_model
    from utils import distributed
    from utils.io import atomic_write_json

    loaded, task, rd = load_for_evaluation(run_dir, data)
    if task.name == "mlm":
        raise UserError(f"{rd.path}: --quantize compares causal_lm and classify runs, not mlm")
    models = {"float32": loaded.model, mode: copy_model(loaded.model)}
    result: dict[str, Any] = {"split": split}
    result["quantized_layers"] = quantize_model(models[mode], mode)
    speed = latency(models, task.config.model.seq_len)
    for name, model in models.items():
        result[name] = {
            **quality(task, model, split),
            "weight_bytes": weight_bytes(model),
            **speed[name],
        }
    result.update(describe_machine())
    if distributed.is_chief():
        print(format_comparison(result, mode), flush=True)
        path = rd.path / "quantization.json"
        saved = json.loads(path.read_text()) if path.is_file() else {}
        atomic_write_json(path, {**saved, f"{split}_{mode}": result})
        print(f"written: {path}", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    from main import main as cli

    cli(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
