"""An exported SavedModel, loaded for serving: its signatures, a call on numpy arrays, metadata.

The export directory holds a SavedModel and `serving.json` (the task, the
signatures' inputs and outputs, generation defaults and limits). Whether a
directory is an export is checked before TensorFlow is imported, so a wrong
path fails in a fraction of a second with one line.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np

from utils.errors import UserError

# TensorFlow dtype name -> (the kind of JSON value it takes, numpy dtype, TF Serving's enum name)
DTYPES: dict[str, tuple[str, Any, str]] = {
    "string": ("string", object, "DT_STRING"),
    "int32": ("int", np.int32, "DT_INT32"),
    "int64": ("int", np.int64, "DT_INT64"),
    "float32": ("float", np.float32, "DT_FLOAT"),
    "float64": ("float", np.float64, "DT_DOUBLE"),
    "bool": ("bool", np.bool_, "DT_BOOL"),
}


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One input or output of a signature: its dtype name and shape (None: any size)."""

    dtype: str
    shape: tuple[int | None, ...]

    def metadata(self) -> dict[str, Any]:
        """TF Serving's TensorInfo JSON."""
        dims = [{"size": str(-1 if d is None else d), "name": ""} for d in self.shape]
        return {
            "dtype": DTYPES[self.dtype][2],
            "tensor_shape": {"dim": dims, "unknown_rank": False},
        }


@dataclasses.dataclass(frozen=True)
class Signature:
    name: str
    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]


def read_export(path: str | pathlib.Path) -> dict[str, Any]:
    """serving.json of the export at `path`; UserError naming what is missing otherwise."""
    path = pathlib.Path(path)
    hint = "write one with: python main.py export --run-dir RUN_DIR"
    if not path.is_dir():
        raise UserError(f"--export {path}: no such directory ({hint})")
    if not (path / "saved_model.pb").is_file():
        raise UserError(f"--export {path}: not an export, it has no saved_model.pb ({hint})")
    meta_path = path / "serving.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"--export {path}: not an export, it has no serving.json ({hint})"
        ) from None
    except (OSError, ValueError) as e:
        raise UserError(f"{meta_path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("signatures"), dict):
        raise UserError(f"{meta_path}: no 'signatures' object; is it an export of this project?")
    return meta


def _tensor(spec) -> Tensor:
    name = spec.dtype.name
    if name not in DTYPES:
        raise UserError(f"unsupported dtype {name} in the export's signatures")
    return Tensor(name, tuple(spec.shape.as_list()))


class ServedModel:
    """A loaded export: `signatures`, `meta` (serving.json) and `call` on numpy arrays."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self.meta = read_export(self.path)
        from utils.tf_env import import_tensorflow

        tf = import_tensorflow()
        import tensorflow_text  # noqa: F401  (registers the SentencePiece ops the graph uses)

        self._tf = tf
        try:
            self.loaded = tf.saved_model.load(str(self.path))
        except Exception as e:  # a damaged or foreign SavedModel: one line
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            raise UserError(f"--export {self.path}: cannot be loaded ({why})") from None
        self.signatures: dict[str, Signature] = {}
        for name, fn in self.loaded.signatures.items():
            _, kwargs = fn.structured_input_signature
            self.signatures[name] = Signature(
                name,
                {k: _tensor(s) for k, s in sorted(kwargs.items())},
                {k: _tensor(s) for k, s in sorted(fn.structured_outputs.items())},
            )
        if not self.signatures:
            raise UserError(f"--export {self.path}: the SavedModel has no signatures")

    @property
    def task(self) -> str:
        return str(self.meta.get("task", ""))

    def call(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch through `signature` (from the batcher's worker thread)."""
        fn = self.loaded.signatures[signature]
        spec = self.signatures[signature].inputs
        tensors = {k: self._tf.constant(v, dtype=spec[k].dtype) for k, v in inputs.items()}
        return {k: v.numpy() for k, v in fn(**tensors).items()}

    def example(self, signature: str) -> dict[str, np.ndarray]:
        """One valid row for `signature`: what warm-up runs before the first request."""
        values = {"string": b"warm up", "int": 0, "float": 0.0, "bool": False}
        row = {}
        for name, tensor in self.signatures[signature].inputs.items():
            kind, np_dtype, _ = DTYPES[tensor.dtype]
            value = {"max_new_tokens": 1, "seed": -1}.get(name, values[kind])
            shape = [1] + [d or 1 for d in tensor.shape[1:]]
            row[name] = np.full(shape, value, dtype=np_dtype)
        return row

    def metadata(self, model_name: str) -> dict[str, Any]:
        """GET /v1/models/NAME/metadata, shaped like TF Serving's answer."""
        defs = {
            sig.name: {
                "inputs": {
                    k: {**t.metadata(), "name": f"{sig.name}_{k}:0"} for k, t in sig.inputs.items()
                },
                "outputs": {k: {**t.metadata(), "name": f"{k}:0"} for k, t in sig.outputs.items()},
                "method_name": "tensorflow/serving/predict",
            }
            for sig in self.signatures.values()
        }
        return {
            "model_spec": {"name": model_name, "signature_name": "", "version": "1"},
            "metadata": {"signature_def": {"signature_def": defs}},
        }
