"""Evaluate a trained language model: the numbers users look at after training.

    python evaluate.py --run-dir runs/exp1 [--split test|val|train] [--data PATH]
    horovodrun -np 2 python evaluate.py --run-dir runs/exp1

The same as `python main.py evaluate ...`, which also runs it after training.
Reports cross-entropy, perplexity, next-token accuracy and top-5 accuracy,
next-token precision/recall/F1 (macro and weighted over the token classes
that occur), vocabulary coverage (share of the vocabulary predicted correctly
at least once), and BLEU and ROUGE-L of greedy continuations of held-out
prompts against the true continuations.

Exact under Horovod: the split is sharded across ranks, each rank sums counts
(losses, tokens, per-class true positives, supports and predictions), the
counts are allreduced, and only the totals are divided. The table is printed
by rank 0 and merged into the run's metrics.json.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import numpy as np

from utils.errors import UserError

PROMPT_TOKENS = 32  # held-out prompt length for BLEU/ROUGE-L
CONTINUATION_TOKENS = 16  # generated and reference continuation length
NUM_PROMPTS = 64


def make_eval_fn(model, vocabulary_size: int, xla: bool):
    """(x, y, w) -> summed loss/accuracy/top-5 and per-class counts; XLA allowed (no Horovod op)."""
    import tensorflow as tf

    from models.losses import token_class_stats, token_stats
    from train import model_inputs

    def stats(x, y, w):
        logits = model(model_inputs(x), training=False)
        return {**token_stats(y, logits, w), **token_class_stats(y, logits, w, vocabulary_size)}

    return tf.function(stats, jit_compile=xla, reduce_retracing=True)


def language_model_metrics(
    model, windows, vocabulary_size: int, xla: bool = True, max_batches: int = 0
) -> dict[str, float]:
    """All count-based metrics of `model` on this rank's windows, exact across ranks."""
    from utils import distributed
    from utils.metrics import Sums, classification_metrics, lm_metrics

    eval_fn = make_eval_fn(model, vocabulary_size, xla)
    sums = Sums()
    for x, y, w in windows.eval_dataset(max_batches):
        sums.add({k: v.numpy() for k, v in eval_fn(x, y, w).items()})
    scalars = distributed.allreduce_sums(
        {k: sums.values.get(k, 0.0) for k in ("loss_sum", "correct", "count", "top5")}
    )
    counts = distributed.allreduce_array(
        np.stack(
            [sums.values.get(k, np.zeros(vocabulary_size)) for k in ("tp", "support", "predicted")]
        ),
        name="class_counts",
    )
    out = lm_metrics(scalars)
    if not out:
        return out
    cls = classification_metrics(*counts)
    for key in (
        "macro_precision",
        "macro_recall",
        "macro_f1",
        "weighted_precision",
        "weighted_recall",
        "weighted_f1",
    ):
        out[key] = cls[key]
    out["vocabulary_coverage"] = float((counts[0] > 0).sum() / vocabulary_size)
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
    decode = lambda ids: tokenizer.detokenize(ids.astype(np.int32))  # noqa: E731
    references = [decode(r[PROMPT_TOKENS:]) for r in rows]
    hypotheses = [decode(g) for g in generated]
    bleu = keras_hub.metrics.Bleu()
    if any(h.strip() for h in hypotheses):  # keras-hub divides by the hypotheses' length
        bleu.update_state([[r] for r in references], hypotheses)
    rouge = keras_hub.metrics.RougeL()
    rouge.update_state(references, hypotheses)
    rouge_result = {k: float(v) for k, v in rouge.result().items()}
    return {
        "bleu": float(bleu.result()),
        "rouge_l_f1": rouge_result["f1_score"],
        "continuation_prompts": len(rows),
    }


def evaluate_split(
    model, tokenizer, prepared, config: dict[str, Any], split: str
) -> dict[str, float]:
    """Every metric of this module for `split` of `prepared`, keys prefixed with the split."""
    from train import make_windows
    from utils import distributed

    seq_len, batch = config["model"]["seq_len"], config["train"]["batch_size"]
    tokens = prepared.tokens(split)
    windows = make_windows(tokens, seq_len, batch)
    if windows.num_samples == 0:
        raise UserError(
            f"the {split} split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}: "
            "nothing to evaluate"
        )
    results = language_model_metrics(model, windows, prepared.vocab_size, config["train"]["xla"])
    if distributed.is_chief():
        results.update(continuation_scores(model, tokenizer, tokens, seq_len))
    return {f"{split}_{k}": v for k, v in results.items()}


def format_table(results: dict[str, float]) -> str:
    """A two-column table, one metric per line."""
    width = max(map(len, results))
    lines = []
    for key, value in results.items():
        shown = (
            f"{value:,.0f}"
            if isinstance(value, int) or (value >= 100 and float(value).is_integer())
            else f"{value:,.4f}"
        )
        lines.append(f"{key:<{width}}  {shown:>12}")
    return "\n".join(lines)


def run_data(saved: dict[str, Any], rd, data: str | None):
    """The prepared data to evaluate on: the run's own, or `data` encoded with the run's tokenizer.

    The run's own data is found where training left it or, when that
    directory is gone, prepared again from the saved settings (the same input
    gives the same key; a changed input is an error).
    """
    from data.prepare import load_prepared, prepare
    from utils import distributed
    from utils.config import DataConfig

    settings = saved["config"]["data"]
    if not data and pathlib.Path(saved["data"]["dir"]).is_dir():
        return load_prepared(saved["data"]["dir"])
    cfg = DataConfig(**({**settings, "path": data, "format": "auto"} if data else settings))
    tokenizer = rd.tokenizer if data else None
    log = distributed.print0 if distributed.is_chief() else (lambda *a, **k: None)
    dirs = distributed.local_chief_runs(
        lambda: str(
            prepare(cfg, progress=distributed.is_chief(), log=log, tokenizer=tokenizer).dir
        ),
        "prepare_eval",
    )
    prepared = load_prepared(dirs[0])
    if not data and prepared.meta["key"] != saved["data"]["key"]:
        raise UserError(
            f"{rd.path}: the run's data ({settings['path'] or 'the built-in corpus'}) has changed "
            "since training; pass --data PATH to evaluate on it anyway"
        )
    return prepared


def run(run_dir: pathlib.Path, split: str = "test", data: str | None = None) -> dict[str, float]:
    """`main.py evaluate`: evaluate the run in `run_dir` on a split of its data (or of --data)."""
    from utils.run_dir import RunDir

    rd = RunDir(run_dir)
    saved = rd.read_config()
    from utils import distributed

    distributed.init(threads=saved["config"]["train"]["threads"])
    from inference import load_run

    loaded = load_run(run_dir)
    prepared = run_data(saved, rd, data)
    if prepared.tokenizer_path.read_bytes() != rd.tokenizer.read_bytes():
        raise UserError(
            f"{run_dir}: tokenizer.model differs from the one of the data in {prepared.dir}"
        )
    results = evaluate_split(loaded.model, loaded.tokenizer, prepared, saved["config"], split)
    if distributed.is_chief():
        rd.merge_metrics(results)
        print(format_table(results), flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    from main import main as cli

    cli(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
