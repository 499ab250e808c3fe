"""`python main.py export`: a trained run as a TensorFlow SavedModel that takes raw strings.

The archive (keras.export.ExportArchive) tracks the run's keras-hub
SentencePiece tokenizer, whose tensorflow-text ops run inside the graph, and
saves the model's variables with the endpoints that use them: a server feeds
strings and gets strings back, with no Python.

Signatures (every input and output has a leading batch dimension):

- causal LM: `serving_default(prompts)` greedy, `DEFAULT_MAX_NEW_TOKENS` new
  tokens; `generate(prompts, max_new_tokens, seed)` per row: greedy when
  seed < 0, else top-k sampling keyed by the row's seed. Both return
  `completions` (string [B]) and `token_ids` (int32 [B, T], -1 after a row's end).
- classify: `serving_default(texts)` returns `labels` (string [B]) and
  `probabilities` (float32 [B, classes]).

`serving.json` beside `saved_model.pb` records the signatures and limits.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

from utils.errors import UserError

DEFAULT_MAX_NEW_TOKENS = 32
MAX_NEW_TOKENS_LIMIT = 256
TOP_K = 10  # models.generation.make_sampler's default k
TEMPERATURE = 1.0
MANIFEST = "serving.json"


def default_out(run_dir: str | os.PathLike, quantize: str | None) -> pathlib.Path:
    """R/export for float32 weights, R/export-<mode> for quantized ones."""
    return pathlib.Path(run_dir) / ("export" if not quantize else f"export-{quantize}")


def load_trained(run_dir: str | os.PathLike):
    """The finished run to export (models/inference.py); UserError for an mlm or seq2seq run."""
    from models.inference import load_run
    from utils.run_dir import RunDir

    task = RunDir(run_dir).load_config().task
    if task == "mlm":  # before loading anything
        raise UserError(
            f"{run_dir}: a --task mlm run; nothing to serve (export a causal_lm or classify run)"
        )
    if task == "seq2seq":
        raise UserError(
            f"{run_dir}: a --task seq2seq run; export takes causal_lm and classify runs only "
            "(use python main.py generate to summarize)"
        )
    return load_run(run_dir)


def next_logits_fn(model: Any):
    """(window [B, seq_len], last [B]) -> the model's logits at each row's `last` position [B, V].

    Positions after `last` are masked, as models.generation.generate_ids does.
    """
    import tensorflow as tf

    def next_logits(window, last):
        mask = tf.sequence_mask(last + 1, tf.shape(window)[1], dtype=tf.int32)
        logits = model({"token_ids": window, "padding_mask": mask}, training=False)
        return tf.gather(logits, last, axis=1, batch_dims=1)

    return next_logits


def causal_lm_functions(model: Any, tokenizer: Any, seq_len: int) -> dict[str, Any]:
    """The two generation signatures as tf.functions."""
    import tensorflow as tf

    from data.prepare import special_ids
    from serving.graph import generation_loop

    eos = special_ids(tokenizer)["eos"]

    def run(prompts, max_new_tokens, seed):
        ids = generation_loop(
            next_logits_fn(model),
            tokenizer.tokenize(prompts),
            max_new_tokens,
            seed,
            seq_len=seq_len,
            limit=MAX_NEW_TOKENS_LIMIT,
            stop_id=eos,
            top_k=TOP_K,
            temperature=TEMPERATURE,
        )
        text = tokenizer.detokenize(tf.RaggedTensor.from_tensor(ids, padding=-1))
        return {"completions": text, "token_ids": ids}

    strings = tf.TensorSpec([None], tf.string, name="prompts")

    @tf.function(input_signature=[strings])
    def serving_default(prompts):
        batch = tf.shape(prompts)[:1]
        return run(prompts, tf.fill(batch, DEFAULT_MAX_NEW_TOKENS), tf.fill(batch, -1))

    @tf.function(
        input_signature=[
            strings,
            tf.TensorSpec([None], tf.int32, name="max_new_tokens"),
            tf.TensorSpec([None], tf.int32, name="seed"),
        ]
    )
    def generate(prompts, max_new_tokens, seed):
        tf.debugging.assert_equal(tf.shape(prompts), tf.shape(max_new_tokens))
        tf.debugging.assert_equal(tf.shape(prompts), tf.shape(seed))
        return run(prompts, max_new_tokens, seed)

    return {"serving_default": serving_default, "generate": generate}


def classify_functions(
    model: Any,
    tokenizer: Any,
    seq_len: int,
    labels: list[str],
    lowercase: bool,
    frame: dict[str, int | None],
) -> dict[str, Any]:
    """The classification signature: cleaned, tokenized, framed and cut to seq_len, as
    Classify.predict (`frame`: its pad id, and a preset's start and end ids)."""
    import tensorflow as tf

    from serving.graph import clean_text

    names = tf.constant(labels)
    pad, start, end = frame["pad_id"], frame.get("start_id"), frame.get("end_id")
    body = seq_len - (start is not None) - (end is not None)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="texts")])
    def serving_default(texts):
        ids = tf.cast(tokenizer.tokenize(clean_text(texts, lowercase)), tf.int32)[:, :body]
        rows = tf.shape(texts)[:1]
        parts = [ids]
        if start is not None:
            parts.insert(0, tf.RaggedTensor.from_tensor(tf.fill(tf.concat([rows, [1]], 0), start)))
        if end is not None:
            parts.append(tf.RaggedTensor.from_tensor(tf.fill(tf.concat([rows, [1]], 0), end)))
        rows = tf.concat(parts, axis=1).to_tensor(pad, shape=[None, seq_len])
        logits = model(
            {"token_ids": rows, "padding_mask": tf.cast(rows != pad, tf.int32)}, training=False
        )
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
        return {
            "labels": tf.gather(names, tf.argmax(probabilities, axis=-1)),
            "probabilities": probabilities,
        }

    return {"serving_default": serving_default}


def signatures_manifest(functions: dict[str, Any]) -> dict[str, Any]:
    """{name: {"inputs": {name: dtype}, "outputs": {name: dtype}}} from the traced functions."""
    out = {}
    for name, fn in functions.items():
        concrete = fn.get_concrete_function()
        inputs = {spec.name: spec.dtype.name for spec in concrete.structured_input_signature[0]}
        outputs = {k: v.dtype.name for k, v in concrete.structured_outputs.items()}
        out[name] = {"inputs": inputs, "outputs": outputs}
    return out


def is_export(path: pathlib.Path) -> bool:
    """Whether `path` holds an earlier export (which may be replaced)."""
    return (path / MANIFEST).is_file() and (path / "saved_model.pb").is_file()


def check_target(out: pathlib.Path) -> None:
    """UserError when `out` exists and is neither empty nor an earlier export."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise UserError(
            f"--out {out}: exists and is not an earlier export (no {MANIFEST}); "
            "choose another directory"
        )


def export_run(
    run_dir: str | os.PathLike, out: str | os.PathLike | None = None, quantize: str | None = None
) -> pathlib.Path:
    """Export the run in `run_dir` to `out` (default `default_out`); returns the directory.

    Written into a temporary directory beside `out` and renamed into place:
    a failure leaves nothing half-written, and an earlier export is replaced
    only by a complete one.
    """
    from serving.quantize import check_mode, quantize_model

    if quantize:
        check_mode(quantize)
    target = pathlib.Path(out) if out else default_out(run_dir, quantize)
    check_target(target)
    run = load_trained(run_dir)
    model, tokenizer, seq_len, task = run.model, run.tokenizer, run.seq_len, run.config.task
    quantized = quantize_model(model, quantize) if quantize else {}
    manifest: dict[str, Any] = {"task": task}
    if task == "causal_lm":
        functions = causal_lm_functions(model, tokenizer, seq_len)
        manifest.update(
            default_max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
            max_new_tokens_limit=MAX_NEW_TOKENS_LIMIT,
            top_k=TOP_K,
            temperature=TEMPERATURE,
        )
    else:
        labels = run.labels
        from data.prepare import special_ids
        from models.tasks.classify import framing

        frame = framing(run.config, special_ids(tokenizer))
        functions = classify_functions(
            model, tokenizer, seq_len, labels, run.config.data.lowercase, frame
        )
        manifest["labels"] = labels
    try:  # traces the signatures: where a quantized layer that cannot run in a graph fails
        manifest["signatures"] = signatures_manifest(functions)
    except Exception as e:
        raise_if_quantized(quantize, e)
        raise
    manifest.update(
        seq_len=seq_len,
        quantize=quantize,
        quantized_layers=quantized,
        source_run=str(pathlib.Path(run_dir).resolve()),
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    write_archive(tokenizer, functions, manifest, target, quantize)
    return target


def raise_if_quantized(mode: str | None, error: Exception) -> None:
    """A failure to trace or save a quantized model is the mode's: UserError naming it.

    (Without quantization the same failure is a bug, and keeps its traceback.)
    """
    if mode:
        first = (str(error).strip().splitlines() or [""])[0]
        raise UserError(
            f"--quantize {mode}: this model cannot be exported with {mode} weights "
            f"({type(error).__name__}: {first})"
        ) from None


def write_archive(
    tokenizer: Any,
    functions: dict[str, Any],
    manifest: dict[str, Any],
    target: pathlib.Path,
    mode: str | None,
) -> None:
    """ExportArchive + serving.json into a temporary sibling, then swapped into `target`."""
    import keras

    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        archive = keras.export.ExportArchive()
        # Not archive.track(model): add_endpoint already saves the variables the
        # signatures use, and Keras 3.15's track() saves every weight a second
        # time (as the Keras variable beside its tf.Variable), doubling the export.
        if not tokenizer.built:  # keras-hub tokenizers have no weights to build
            tokenizer.build(None)
        archive.track(tokenizer)  # its tensorflow-text SentencePiece resource
        for name, fn in functions.items():
            archive.add_endpoint(name, fn)
        try:
            archive.write_out(str(tmp), verbose=False)
        except Exception as e:
            raise_if_quantized(mode, e)
            raise
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        replace_directory(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_directory(new: pathlib.Path, target: pathlib.Path) -> None:
    """Rename `new` onto `target`; an existing (empty or export) `target` is moved aside first."""
    if not target.exists():
        os.replace(new, target)
        return
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.replace(target, old / "x")
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / "x", target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
