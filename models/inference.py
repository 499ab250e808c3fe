"""Use a trained run: load it in one call, then generate text or classify with its task.

    from models.inference import load_run, generate
    run = load_run("runs/exp1")
    print(generate(run, ["Return the number of"], max_new_tokens=30, sampler="top_p", seed=1))

`generate` and `predict` hand over to the run's task (models/tasks), which
says in one line when it cannot do either.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from models.tasks import Task, make_task
from utils.config import Config
from utils.errors import UserError
from utils.run_dir import RunDir


@dataclasses.dataclass
class Run:
    """A trained run: its model, tokenizer and saved config."""

    path: pathlib.Path
    model: Any  # keras.Model
    tokenizer: Any  # keras_hub SentencePieceTokenizer
    config: Config  # the run's config (config.json, validated as the command line is)
    record: dict[str, Any]  # config.json as written: the data's key and labels, the world, ...

    @property
    def task(self) -> Task:
        return make_task(self.config)

    @property
    def seq_len(self) -> int:
        return self.config.model.seq_len

    @property
    def labels(self) -> list[str]:
        return list(self.record["data"].get("labels", []))

    @property
    def vocab_size(self) -> int:
        from models.encoder import BACKBONE_NAME

        names = {layer.name for layer in self.model.layers}
        if BACKBONE_NAME in names:
            return int(self.model.get_layer(BACKBONE_NAME).vocabulary_size)
        if "token_embedding" in names:
            return int(self.model.get_layer("token_embedding").input_dim)
        from models.presets import backbone_of  # a model on a keras-hub preset's backbone

        return int(backbone_of(self.model).token_embedding.input_dim)


def load_run(path: str | pathlib.Path) -> Run:
    """Load model.keras, tokenizer.model and config.json from a run directory.

    Raises UserError when the directory is not a finished run, or when the
    tokenizer's vocabulary does not match the model's.
    """
    rd = RunDir(path)
    config = rd.load_config()
    for required in (rd.model, rd.tokenizer):
        if not required.is_file():
            raise UserError(f"{rd.path}: no {required.name} (has the run finished training?)")
    import keras

    import models.encoder
    import models.transformer  # noqa: F401  (registers the model classes)
    from data.prepare import load_tokenizer

    tokenizer = load_tokenizer(rd.tokenizer)
    try:
        model = keras.saving.load_model(rd.model, compile=False)  # for inference
    except Exception as e:  # a damaged or foreign file: say which
        raise UserError(
            f"{rd.model}: cannot be loaded as a Keras model ({type(e).__name__}: {e})"
        ) from None
    run = Run(rd.path, model, tokenizer, config, rd.read_config())
    if run.vocab_size != int(tokenizer.vocabulary_size()):
        raise UserError(
            f"{rd.path}: {rd.tokenizer.name} has {tokenizer.vocabulary_size()} tokens but the model "
            f"was built for {run.vocab_size}; the tokenizer does not belong to this model"
        )
    return run


def generate(
    run: Run,
    prompts: list[str],
    max_new_tokens: int = 40,
    sampler: str = "greedy",
    temperature: float = 1.0,
    seed: int | None = None,
) -> list[str]:
    """Continue each text prompt; returns the generated continuations (text).

    Args:
        run: from `load_run` (a causal LM run).
        prompts: one or more texts (each is encoded with the run's tokenizer).
        max_new_tokens: tokens to generate (generation stops early at end-of-text).
        sampler: "greedy", "top_k" or "top_p" (keras-hub samplers).
        temperature: softens (>1) or sharpens (<1) the distribution.
        seed: makes top_k/top_p repeatable.
    """
    return run.task.generate(run, prompts, max_new_tokens, sampler, temperature, seed)


def predict(
    run: Run, texts: list[str], batch_size: int = 64
) -> list[tuple[str, float, dict[str, float]]]:
    """Classify `texts` with a classification run: (label, its probability, every probability)."""
    return run.task.predict(run, texts, batch_size)


def predict_file(
    run: Run, path: str, out: str | None = None, text_column: str | None = None
) -> pathlib.Path:
    """Classify every record of a .jsonl/.csv file into `out` (see Classify.predict_file)."""
    return run.task.predict_file(run, path, out, text_column)
