"""Use a trained run: load it in one call, generate text with keras-hub samplers.

from inference import load_run, generate
run = load_run("runs/exp1")
print(generate(run, ["Return the number of"], max_new_tokens=30, sampler="top_p", seed=1))
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np

from utils.errors import UserError

SAMPLERS = ("greedy", "top_k", "top_p")


@dataclasses.dataclass
class Run:
    """A trained run: its model, tokenizer and saved config."""

    path: pathlib.Path
    model: Any  # keras.Model
    tokenizer: Any  # keras_hub SentencePieceTokenizer
    config: dict[str, Any]  # config.json

    @property
    def seq_len(self) -> int:
        return int(self.config["config"]["model"]["seq_len"])

    @property
    def task(self) -> str:
        return self.config["config"]["task"]

    @property
    def labels(self) -> list[str]:
        return list(self.config["data"].get("labels", []))

    @property
    def vocab_size(self) -> int:
        from models.encoder import BACKBONE_NAME

        names = {layer.name for layer in self.model.layers}
        if BACKBONE_NAME in names:
            return int(self.model.get_layer(BACKBONE_NAME).vocabulary_size)
        return int(self.model.get_layer("token_embedding").input_dim)


def load_run(path: str | pathlib.Path) -> Run:
    """Load model.keras, tokenizer.model and config.json from a run directory.

    Raises UserError when the directory is not a finished run, or when the
    tokenizer's vocabulary does not match the model's.
    """
    from utils.run_dir import RunDir

    rd = RunDir(path)
    config = rd.read_config()
    for required in (rd.model, rd.tokenizer):
        if not required.is_file():
            raise UserError(f"{rd.path}: no {required.name} (has the run finished training?)")
    from utils.tf_env import import_tensorflow

    import_tensorflow()
    import keras

    import models.encoder
    import models.transformer  # noqa: F401
    from data.prepare import load_tokenizer

    tokenizer = load_tokenizer(rd.tokenizer)
    try:
        model = keras.saving.load_model(rd.model, compile=False)  # for inference
    except Exception as e:  # a damaged or foreign file: say which
        raise UserError(
            f"{rd.model}: cannot be loaded as a Keras model ({type(e).__name__}: {e})"
        ) from None
    run = Run(rd.path, model, tokenizer, config)
    if run.vocab_size != int(tokenizer.vocabulary_size()):
        raise UserError(
            f"{rd.path}: tokenizer.model has {tokenizer.vocabulary_size()} tokens but the model "
            f"was built for {run.vocab_size}; the tokenizer does not belong to this model"
        )
    return run


def make_sampler(
    name: str = "greedy",
    temperature: float = 1.0,
    seed: int | None = None,
    k: int = 10,
    p: float = 0.9,
):
    """A keras-hub sampler: greedy, top_k or top_p (nucleus); seeded for repeatable output."""
    import keras_hub

    if name == "greedy":
        return keras_hub.samplers.GreedySampler(temperature=temperature)
    if name == "top_k":
        return keras_hub.samplers.TopKSampler(k=k, seed=seed, temperature=temperature)
    if name == "top_p":
        return keras_hub.samplers.TopPSampler(p=p, k=None, seed=seed, temperature=temperature)
    raise UserError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")


def generate_ids(
    model,
    prompts: np.ndarray,
    max_new_tokens: int,
    sampler,
    seq_len: int,
    stop_id: int | None = None,
) -> np.ndarray:
    """Continue equal-length prompts token by token; returns [batch, max_new_tokens] ids.

    The model sees at most its context length (`seq_len`): each step feeds
    the last `seq_len` tokens (right-padded to a fixed shape, so the forward
    pass is traced once) and the sampler picks the next token from the
    logits at the last real position. Rows that produced `stop_id` keep
    producing it.
    """
    import tensorflow as tf

    prompts = np.asarray(prompts, dtype=np.int32)
    batch = prompts.shape[0]

    @tf.function(reduce_retracing=True)
    def next_logits(window, last):
        logits = model(
            {"token_ids": window, "padding_mask": tf.cast(window != 0, "int32")}, training=False
        )
        return tf.gather(logits, last, axis=1, batch_dims=0)[:, 0, :]

    tokens = prompts
    done = np.zeros(batch, dtype=bool)
    for _ in range(max_new_tokens):
        window = tokens[:, -seq_len:]
        length = window.shape[1]
        padded = np.zeros((batch, seq_len), np.int32)
        padded[:, :length] = window
        logits = next_logits(tf.constant(padded), tf.constant([length - 1]))
        probabilities = sampler.compute_probabilities(logits)
        chosen = np.asarray(sampler.get_next_token(probabilities), dtype=np.int32)
        if stop_id is not None:
            chosen = np.where(done, stop_id, chosen)
            done |= chosen == stop_id
        tokens = np.concatenate([tokens, chosen[:, None]], axis=1)
    return tokens[:, prompts.shape[1] :]


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
        run: from `load_run`.
        prompts: one or more texts (each is encoded with the run's tokenizer).
        max_new_tokens: tokens to generate (generation stops early at end-of-text).
        sampler: "greedy", "top_k" or "top_p".
        temperature: softens (>1) or sharpens (<1) the distribution.
        seed: makes top_k/top_p repeatable.
    """
    from data.prepare import EOS_ID

    if run.task != "causal_lm":
        raise UserError(f"{run.path}: a {run.task} run; generation needs a --task causal_lm run")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1; got {max_new_tokens}")
    if temperature <= 0:
        raise UserError(f"--temperature must be > 0; got {temperature}")
    chooser = make_sampler(sampler, temperature, seed)
    outputs = []
    for text in prompts:
        ids = [int(i) for i in run.tokenizer.tokenize(text)]
        if not ids:
            raise UserError("the prompt is empty after tokenization")
        new = generate_ids(
            run.model, np.array([ids]), max_new_tokens, chooser, run.seq_len, EOS_ID
        )[0]
        new = new[: int(np.argmax(new == EOS_ID))] if EOS_ID in new else new
        outputs.append(run.tokenizer.detokenize(new.astype(np.int32)) if len(new) else "")
    return outputs


def predict(
    run: Run, texts: list[str], batch_size: int = 64
) -> list[tuple[str, float, dict[str, float]]]:
    """Classify `texts` with a classification run: (label, its probability, every probability).

    Texts are cleaned as in preparation and cut to the run's context length.
    """
    import keras

    from data.clean import clean_text
    from tasks import model_inputs

    if run.task != "classify":
        raise UserError(f"{run.path}: a {run.task} run; predict needs a --task classify run")
    lowercase = run.config["config"]["data"]["lowercase"]
    results = []
    for start in range(0, len(texts), batch_size):
        batch = [clean_text(t, lowercase) for t in texts[start : start + batch_size]]
        rows = np.zeros((len(batch), run.seq_len), np.int32)
        for i, ids in enumerate(run.tokenizer.tokenize(batch)):
            ids = np.asarray(ids, np.int32)[: run.seq_len]
            rows[i, : len(ids)] = ids
        probabilities = keras.ops.convert_to_numpy(
            keras.ops.softmax(
                run.model(model_inputs(keras.ops.convert_to_tensor(rows)), training=False), axis=-1
            )
        )
        for p in probabilities:
            best = int(np.argmax(p))
            results.append(
                (
                    run.labels[best],
                    float(p[best]),
                    dict(zip(run.labels, map(float, p), strict=True)),
                )
            )
    return results


def predict_file(
    run: Run, path: str, out: str | None = None, text_column: str | None = None
) -> pathlib.Path:
    """Classify every record of a .jsonl/.csv file; write text, label, probability and p_<class>.

    The output format follows `out`'s extension (.csv or .jsonl; default
    <path>.predictions.jsonl), written atomically.
    """
    import csv
    import io
    import json

    from data.sources import open_source
    from utils.io import atomic_write_text

    column = text_column or run.config["config"]["data"]["text_column"]
    source = open_source(path, "auto", column)
    if source.__class__.__name__ not in ("JsonlFile", "CsvFile"):
        raise UserError(f"{path}: predict --data takes a .jsonl or .csv file")
    texts = [doc.text for doc in source.documents()]
    if not texts:
        raise UserError(f"{path}: no records to classify")
    rows = []
    for text, (label, probability, every) in zip(texts, predict(run, texts), strict=True):
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
