"""Evaluate a trained run: the numbers users look at after training.

    python evaluate.py --run-dir runs/exp1 [--split test|val|train] [--data PATH]
    horovodrun -np 2 python evaluate.py --run-dir runs/exp1
    python evaluate.py --run-dir runs/exp1 --quantize int8   # float32 beside int8

The same as `python main.py evaluate ...`; main.py also evaluates the test
split after training. What is measured is the run's task's (models/tasks):

- Causal LM: cross-entropy, perplexity, next-token accuracy and top-5
  accuracy, next-token precision/recall/F1 (macro and weighted over the token
  classes that occur), vocabulary coverage, and BLEU and ROUGE-L of greedy
  continuations of held-out prompts against the true continuations.
- Masked LM: loss, perplexity and accuracy on the masked positions.
- Classification: accuracy, per-class precision/recall/F1, macro and
  weighted averages, the confusion matrix (also as a PNG), and beside them a
  TF-IDF + logistic-regression baseline (scikit-learn) on the same split.
- Sequence to sequence: loss, perplexity and token accuracy, and BLEU,
  ROUGE-1/2/L and exact match of greedy summaries, beside a first-N-words
  baseline with N tuned on the validation split.

Exact under Horovod: the split is sharded across ranks, each rank sums counts
(losses, tokens, per-class true positives, supports and predictions, the
confusion matrix), the counts are allreduced, and only the totals are
divided. Rank 0 prints the table and merges it into metrics.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

from utils.errors import UserError


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
    t = config.train
    tokenizer = rd.tokenizer if data or t.init_from or t.init_from_preset else None
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
    if data and "labels" in saved["data"] and prepared.meta["labels"] != saved["data"]["labels"]:
        raise UserError(
            f"{data}: its training-split labels {prepared.meta['labels']} differ from the model's "
            f"{saved['data']['labels']}"
        )
    return prepared


def load_for_evaluation(run_dir: pathlib.Path, data: str | None = None):
    """(the loaded run, its task with data, its RunDir), on every rank: what `run` evaluates."""
    from utils import distributed
    from utils.run_dir import RunDir

    rd = RunDir(run_dir)
    config = rd.load_config()
    distributed.init(threads=config.train.threads)
    from models.inference import load_run
    from models.tasks import make_task

    loaded = load_run(run_dir)
    task = make_task(config)
    task.prepared = run_data(task, rd.read_config(), rd, data)
    if task.prepared.tokenizer_path.read_bytes() != rd.tokenizer.read_bytes():
        raise UserError(
            f"{run_dir}: tokenizer.model differs from the one of the data in {task.prepared.dir}"
        )
    return loaded, task, rd


def run(run_dir: pathlib.Path, split: str = "test", data: str | None = None) -> dict[str, Any]:
    """`main.py evaluate`: evaluate the run in `run_dir` on a split of its data (or of --data)."""
    from utils import distributed

    loaded, task, rd = load_for_evaluation(run_dir, data)
    results = task.evaluate(loaded.model, loaded.tokenizer, split)
    if distributed.is_chief():
        task.report(results, rd)
    return results


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
    quality = {"float32": task.quality(loaded.model, split)}  # a task without figures says so
    models = {"float32": loaded.model, mode: copy_model(loaded.model)}
    result: dict[str, Any] = {"split": split}
    result["quantized_layers"] = quantize_model(models[mode], mode)
    quality[mode] = task.quality(models[mode], split)
    speed = latency(models, task.config.model.seq_len)
    for name, model in models.items():
        result[name] = {
            **quality[name],
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


def command(args: argparse.Namespace) -> None:
    """`evaluate` as parsed by utils/cli.py: the run's metrics, or float32 beside --quantize."""
    run_dir = pathlib.Path(args.run_dir)
    if args.quantize:
        compare_quantized(run_dir, args.quantize, args.split, args.data)
    else:
        run(run_dir, args.split, args.data)


def main(argv: list[str] | None = None) -> None:
    from utils.cli import parse
    from utils.errors import run_main

    argv = sys.argv[1:] if argv is None else argv
    run_main(
        lambda: command(parse(["evaluate", *argv], __doc__.split("\n\n")[0])[1]), "evaluate.py"
    )


if __name__ == "__main__":
    main()
