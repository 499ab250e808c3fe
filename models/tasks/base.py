"""The task base: what every task gives the training loop, evaluation and the CLI.

A task ties the data, the model and the loss together for the training loop
(train.py), which knows nothing task-specific, and owns what is done with a
trained model of its kind, so that no caller branches on the task's name:

- `prepare()`: the prepared data (a token stream, or labelled documents);
- `shards(split)`: this rank's samples of a split (data/load.py);
- `transform(dataset)`: per-batch preprocessing inside tf.data (MLM masking);
- `build_model()`: a Keras model, and `compile_args()`: its loss and metrics
  for `model.compile`; `fit_dataset(dataset)`: batches as `model.fit` takes them;
- `stats(model, inputs, targets, weights)`: summed loss and counts of a batch,
  so that averages stay exact over batches and ranks;
- `metrics(totals)`: the figures those sums give (loss, accuracy, ...);
- `evaluate(model, tokenizer, split)`, `report(results, run_dir)`,
  `quality(model, split)`: the numbers after training, how rank 0 shows and
  keeps them, and what a quantized copy is judged by;
- `generate(run, ...)`, `predict(run, ...)`: using a trained run (a task
  that cannot do one says so in one line).

Every batch of data/load.py is (inputs, targets, weights): weights are 0 for
rows that only pad a batch, and mark which targets count.

Training losses are Keras's own, with its default reduction (the sum over
the batch divided by its number of targets, padding included): the gradient
of k batches of B rows then averages exactly to the gradient of one batch of
k x B, so accumulation and data parallelism are exact.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from keras import ops

from data.load import Shards
from data.prepare import PAD_ID, SENTENCEPIECE_IDS, Prepared
from utils import distributed
from utils.config import Config
from utils.errors import UserError
from utils.metrics import Sums


def model_inputs(token_ids, pad_id: int | None = PAD_ID) -> dict:
    """The model's input dict for a batch of token ids; `pad_id` None: nothing is padding."""
    if pad_id is None:
        return {"token_ids": token_ids, "padding_mask": ops.ones_like(token_ids, "int32")}
    return {
        "token_ids": token_ids,
        "padding_mask": ops.cast(ops.not_equal(token_ids, pad_id), "int32"),
    }


def make_eval_fn(task: Task, model, xla: bool):
    """A compiled (inputs, targets, weights) -> sums function (no Horovod op, so XLA is allowed)."""
    return tf.function(
        lambda x, y, w: task.stats(model, x, y, w, training=False),
        jit_compile=xla,
        reduce_retracing=True,
    )


def evaluate_totals(task: Task, eval_fn, shards: Shards, max_batches: int = 0) -> dict[str, Any]:
    """The task's sums (losses, counts, confusion...) over a split, over batches and ranks."""
    sums = Sums()
    for x, y, w in task.transform(shards.eval_dataset(max_batches), training=False):
        sums.add({k: v.numpy() for k, v in eval_fn(x, y, w).items()})
    return distributed.allreduce_sums(sums.values)


def evaluate_shards(task: Task, eval_fn, shards: Shards, max_batches: int = 0) -> dict[str, float]:
    """Exact metrics over a split: sums over batches and ranks, then divided."""
    return task.metrics(evaluate_totals(task, eval_fn, shards, max_batches))


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


class Task:
    """What every task shares; subclasses say what is learned (see the module docstring)."""

    name = ""
    monitor, monitor_mode = "val_loss", "min"  # early stopping and best-weights
    samples = "samples"  # what one sample of a split is called in messages

    def __init__(self, config: Config, prepared: Prepared | None = None):
        self.config, self.prepared = config, prepared

    @property
    def special_ids(self) -> dict[str, int | None]:
        """pad/bos/eos ids of the prepared data's tokenizer (data/prepare.py `special_ids`)."""
        meta = getattr(self.prepared, "meta", None) or {}  # stand-ins in benchmarks have none
        return meta.get("special_ids", SENTENCEPIECE_IDS)

    @property
    def pad_id(self) -> int | None:
        """The id that marks padding in this task's data (None: a preset's LM never pads)."""
        return self.special_ids["pad"]

    # --- data ----------------------------------------------------------------

    def prepare(self, progress: bool, log, tokenizer=None) -> Prepared:
        raise NotImplementedError

    def shards(self, split: str) -> Shards:
        raise NotImplementedError

    def check_sizes(self) -> None:
        """UserError when a split is too small for training."""
        self._check_train_batches(self.samples)

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
            lambda x, y, w: (model_inputs(x, self.pad_id), y), num_parallel_calls=tf.data.AUTOTUNE
        )

    def _check_train_batches(self, what: str, shorter: str = "") -> None:
        train = self.shards("train")
        if train.steps_per_epoch == 0:
            raise UserError(
                f"the train split holds {train.num_samples} {what}, fewer than one global batch "
                f"(train.batch_size x train.accumulate_steps = {train.batch_size} x {train.world} ranks); "
                f"lower train.batch_size{shorter}, or add data"
            )

    # --- model and loss --------------------------------------------------------

    def build_model(self) -> keras.Model:
        raise NotImplementedError

    def compile_args(self) -> dict[str, Any]:
        raise NotImplementedError

    def epoch_figures(self, logs: dict[str, float]) -> dict[str, float]:
        """Figures derived from an epoch's logs, beside Keras's own (none by default)."""
        return {}

    def stats(self, model, inputs, targets, weights, training: bool) -> dict:
        raise NotImplementedError

    def metrics(self, totals: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    # --- after training --------------------------------------------------------

    def evaluate(self, model, tokenizer, split: str) -> dict[str, Any]:
        """Every metric of `split`, keys prefixed with the split, exact across ranks."""
        results = self.evaluate_split(model, tokenizer, split)
        return {f"{split}_{k}": v for k, v in results.items() if v is not None}

    def split_shards(self, split: str) -> Shards:
        """This rank's shards of `split`; UserError when the split is empty."""
        shards = self.shards(split)
        if shards.num_samples == 0:
            raise UserError(f"the {split} split has no {self.samples}: nothing to evaluate")
        return shards

    def evaluate_split(self, model, tokenizer, split: str) -> dict[str, Any]:
        """The task's metrics of `split` (unprefixed); rank 0 may add more."""
        eval_fn = make_eval_fn(self, model, self.config.train.xla)
        return evaluate_shards(self, eval_fn, self.split_shards(split))

    def report(self, results: dict[str, Any], run_dir) -> None:
        """Rank 0: print the results and merge them into metrics.json."""
        print(format_table(results), flush=True)
        run_dir.merge_metrics(results)

    def quality(self, model, split: str) -> dict[str, float]:
        """The figures a quantized copy of the model is judged by (evaluate --quantize)."""
        raise UserError(f"--quantize compares causal_lm and classify runs, not {self.name} runs")

    def after_training(self, run) -> None:
        """Rank 0, after the test metrics: anything worth showing (a sample, ...)."""

    # --- using a trained run -----------------------------------------------------

    def generate(self, run, prompts: list[str], **options) -> list[str]:
        raise UserError(f"{run.path}: a {self.name} run; generation needs a --task causal_lm run")

    def show_generated(self, prompt: str, text: str) -> str:
        """How `main.py generate` prints a prompt and what was generated for it."""
        return f"{prompt}\t{text}"

    def predict(self, run, texts: list[str], batch_size: int = 64) -> list:
        raise UserError(f"{run.path}: a {self.name} run; predict needs a --task classify run")

    def predict_file(self, run, path: str, out: str | None, text_column: str | None):
        raise UserError(f"{run.path}: a {self.name} run; predict needs a --task classify run")
