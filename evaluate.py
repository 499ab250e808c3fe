"""Evaluate a trained run: loss, perplexity and next-token accuracy on a split.

    python evaluate.py --run-dir runs/exp1 [--split test]
    horovodrun -np 2 python evaluate.py --run-dir runs/exp1

The same as `python main.py evaluate ...`. Under Horovod the split is
sharded across ranks and the sums are allreduced, so the figures are exact
and equal to a single-process run. Results are merged into metrics.json.
"""

from __future__ import annotations

import pathlib
import sys

from utils.errors import UserError


def run(run_dir: pathlib.Path, split: str = "test") -> dict[str, float]:
    """Evaluate the model in `run_dir` on `split` of its data; print and record the metrics."""
    from utils.run_dir import RunDir

    rd = RunDir(run_dir)
    saved = rd.read_config()
    if not rd.model.is_file():
        raise UserError(f"{run_dir}: no model.keras (the run has not finished training)")
    from utils import distributed

    config = saved["config"]
    distributed.init(threads=config["train"]["threads"])
    import keras

    import train
    from data.prepare import load_prepared

    prepared = load_prepared(saved["data"]["dir"])
    if (
        not rd.tokenizer.is_file()
        or rd.tokenizer.read_bytes() != prepared.tokenizer_path.read_bytes()
    ):
        raise UserError(
            f"{run_dir}: tokenizer.model differs from the prepared data's ({prepared.dir})"
        )
    model = keras.saving.load_model(rd.model)
    vocab = model.get_layer("token_embedding").input_dim
    if vocab != prepared.vocab_size:
        raise UserError(
            f"{run_dir}: the model has a {vocab}-token vocabulary, the tokenizer {prepared.vocab_size}"
        )
    seq_len, batch = config["model"]["seq_len"], config["train"]["batch_size"]
    windows = train.make_windows(prepared.tokens(split), seq_len, batch)
    if windows.num_samples == 0:
        raise UserError(
            f"the {split} split has fewer than {seq_len + 1} tokens: nothing to evaluate"
        )
    metrics = train.evaluate_lm(train.make_eval_fn(model, config["train"]["xla"]), windows)
    results = {f"{split}_{k}": v for k, v in metrics.items()}
    if distributed.is_chief():
        rd.merge_metrics(results)
        width = max(map(len, results))
        for key, value in results.items():
            print(f"{key:<{width}}  {value:,.4f}")
    return results


def main(argv: list[str] | None = None) -> None:
    from main import main as cli

    cli(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
